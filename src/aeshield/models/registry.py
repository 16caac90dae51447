"""Name -> factory tables for the CLI and configs. Library users may import classes directly."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

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
              "conv denoising AE for 28x28 grey images"),
    ModelSpec("conv-ae-small", lambda: ae.ConvAutoencoder(width=16, code=8), "mnist",
              "autoencoder", "narrow conv AE"),
    ModelSpec("conv-ae-wide", lambda: ae.ConvAutoencoder(width=64), "mnist", "autoencoder",
              "conv AE at twice conv-ae's width (capacity for adversarial training)"),
    ModelSpec("unet", ae.UNetAutoencoder, "cifar10", "autoencoder", "U-Net AE for 32x32 RGB"),
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
              "U-Net AE at 1/4 width for CPU"),
    ModelSpec("draw", draw.draw_mnist, "mnist", "autoencoder",
              "DRAW, recurrent VAE without attention: 64 glimpses, LSTM 256, z=100 (DBP paper)"),
    ModelSpec("draw-attn", draw.draw_attn_mnist, "mnist", "autoencoder",
              "DRAW with Gaussian-filterbank attention, read 2x2, write 5x5 (DBP paper)"),
]
MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def list_models(pattern: str = "*", kind: str | None = None) -> list[str]:
    return sorted(n for n, s in MODELS.items()
                  if fnmatch.fnmatch(n, pattern) and (kind is None or s.kind == kind))


def create_model(name: str) -> nn.Module:
    """Build an untrained model by registry name."""
    try:
        spec = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    return spec.factory()
