"""Name -> factory tables for the CLI and configs. Library users may import classes directly."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from . import autoencoders as ae
from . import classifiers as cl
from . import vae
from . import draw


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    dataset: str
    kind: str  # "classifier" or "autoencoder"
    description: str
    # (C, H, W) -> the model for images of that shape, for an architecture that adapts to the
    # data; None: only its dataset's shape.
    adapt: Callable[[tuple[int, int, int]], nn.Module] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The image shape of its dataset: the shape ``factory()`` is built for."""
        from ..data import DATASETS

        return tuple(DATASETS[self.dataset].shape)


def _conv_ae(width: int = 32, code: int = 16):
    return lambda shape: ae.ConvAutoencoder(in_channels=shape[0], width=width, code=code, size=shape[1:])


def _unet(width: int = 32):
    return lambda shape: ae.UNetAutoencoder(in_channels=shape[0], width=width)


_SPECS = [
    ModelSpec("mnist-a", cl.mnist_a, "mnist", "classifier", "Madry MNIST conv net (AAA native A)"),
    ModelSpec("mnist-b", cl.mnist_b, "mnist", "classifier", "1 conv + 2 fc (AAA native B)"),
    ModelSpec("mnist-c", cl.mnist_c, "mnist", "classifier", "fully connected (AAA transfer C)"),
    ModelSpec("fmnist-native", cl.fmnist_native, "fashion-mnist", "classifier",
              "DAA-style conv net (AAA Fashion-MNIST native)"),
    ModelSpec("fmnist-transfer", cl.fmnist_transfer, "fashion-mnist", "classifier",
              "fully connected (AAA Fashion-MNIST transfer)"),
    ModelSpec("puvae-a-mnist", cl.puvae_a, "mnist", "classifier", "PuVAE paper classifier A"),
    ModelSpec("puvae-a-fmnist", lambda: cl.puvae_a(cl.FMNIST_STATS), "fashion-mnist",
              "classifier", "PuVAE paper classifier A"),
    ModelSpec("puvae-b", cl.puvae_b, "cifar10", "classifier", "PuVAE paper classifier B"),
    ModelSpec("fmnist-b", lambda: cl.mnist_b(cl.FMNIST_STATS), "fashion-mnist", "classifier",
              "MNIST-B's architecture for Fashion-MNIST (cheap PuVAE quick-profile classifier)"),
    ModelSpec("puvae-b-quick", lambda: cl.puvae_b(width=0.125), "cifar10", "classifier",
              "PuVAE classifier B at 1/8 width (CIFAR-10 transfer classifier for CPU)"),
    ModelSpec("cifar-d", cl.cifar_d, "cifar10", "classifier", "WRN-28-10 (Madry CIFAR challenge)"),
    ModelSpec("cifar-d-quick", lambda: cl.cifar_d(depth=10, widen=1), "cifar10", "classifier",
              "reduced ResNet D for CPU"),
    ModelSpec("cifar-e", cl.cifar_e, "cifar10", "classifier", "VGG-19 with BatchNorm"),
    ModelSpec("cifar-e-quick", lambda: cl.cifar_e(width=0.125), "cifar10", "classifier",
              "VGG-19 at 1/8 width for CPU"),
    ModelSpec("cifar-f", cl.cifar_f, "cifar10", "classifier", "4 conv + 1 fc"),
    ModelSpec("cifar-f-quick", lambda: cl.cifar_f(width=0.5), "cifar10", "classifier",
              "4 conv + 1 fc at half width"),
    ModelSpec("conv-ae", ae.ConvAutoencoder, "mnist", "autoencoder",
              "conv denoising AE for 28x28 grey images (adapts to any size and channels)", _conv_ae()),
    ModelSpec("conv-ae-small", lambda: ae.ConvAutoencoder(width=16, code=8), "mnist",
              "autoencoder", "narrow conv AE", _conv_ae(width=16, code=8)),
    ModelSpec("conv-ae-wide", lambda: ae.ConvAutoencoder(width=64), "mnist", "autoencoder",
              "conv AE at twice conv-ae's width (capacity for adversarial training)", _conv_ae(width=64)),
    ModelSpec("unet", ae.UNetAutoencoder, "cifar10", "autoencoder",
              "U-Net AE for 32x32 RGB (adapts to any size and channels)", _unet()),
    ModelSpec("cvae-mnist", vae.cvae_mnist, "mnist", "autoencoder", "PuVAE conditional VAE, z=32"),
    ModelSpec("cvae-fmnist", vae.cvae_fmnist, "fashion-mnist", "autoencoder",
              "PuVAE conditional VAE, z=128"),
    ModelSpec("cvae-mnist-quick", vae.cvae_mnist_quick, "mnist", "autoencoder",
              "PuVAE conditional VAE, z=32, narrow (CPU)"),
    ModelSpec("cvae-fmnist-quick", vae.cvae_fmnist_quick, "fashion-mnist", "autoencoder",
              "PuVAE conditional VAE, z=128, narrow (CPU)"),
    ModelSpec("cvae-cifar10", vae.cvae_cifar10, "cifar10", "autoencoder",
              "PuVAE conditional VAE for 3x32x32, z=1024"),
    ModelSpec("cvae-cifar10-quick", vae.cvae_cifar10_quick, "cifar10", "autoencoder",
              "PuVAE conditional VAE for 3x32x32, z=1024, narrow (CPU)"),
    ModelSpec("unet-quick", lambda: ae.UNetAutoencoder(width=8), "cifar10", "autoencoder",
              "U-Net AE at 1/4 width for CPU", _unet(width=8)),
    ModelSpec("draw", draw.draw_mnist, "mnist", "autoencoder",
              "DRAW, recurrent VAE without attention: 64 glimpses, LSTM 256, z=100 (DBP paper)"),
    ModelSpec("draw-attn", draw.draw_attn_mnist, "mnist", "autoencoder",
              "DRAW with Gaussian-filterbank attention, read 2x2, write 5x5 (DBP paper)"),
]
MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def list_models(pattern: str = "*", kind: str | None = None) -> list[str]:
    return sorted(n for n, s in MODELS.items()
                  if fnmatch.fnmatch(n, pattern) and (kind is None or s.kind == kind))


def adaptable(kind: str = "autoencoder") -> list[str]:
    """The architectures of ``kind`` that adapt to any image shape."""
    return sorted(n for n, s in MODELS.items() if s.kind == kind and s.adapt is not None)


def create_model(name: str, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Build an untrained model by registry name, for images of ``input_shape`` (C, H, W).

    At its dataset's shape (or without ``input_shape``) it is the architecture's one module; an
    architecture that adapts (``ModelSpec.adapt``) is built for any other shape; one that does
    not is refused with a ``ConfigError`` naming the shape it takes.
    """
    try:
        spec = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    if input_shape is None or tuple(input_shape) == spec.input_shape:
        return spec.factory()
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"{name}: input_shape must be (C, H, W), got {tuple(input_shape)}")
    if spec.adapt is None:
        others = ", ".join(adaptable(spec.kind)) or "none"
        raise ConfigError(f"architecture {name!r} takes {'x'.join(map(str, spec.input_shape))} (CxHxW) images "
                          f"only, not {'x'.join(map(str, shape))}; for other shapes use one of: {others}")
    return spec.adapt(shape)
