"""Autoencoders used as shields (purifiers).

Each maps an image in [0, 1] to an image of the same shape in [0, 1] (sigmoid output).

Any image size: both architectures halve the resolution twice with stride-2 layers and double
it twice on the way back, which gives back the input's size exactly only when height and width
are multiples of 4. Other sizes are padded at the bottom and right (by repeating the edge pixels,
at most 3 rows and columns, so no artificial dark border is learnt) and the output is cropped
back: one architecture for every size, no new layers per size. At multiples of 4 (28x28,
32x32) nothing is padded and the module is exactly the one it always was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_MULTIPLE = 4  # two stride-2 stages


def _pad_to_multiple(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = -h % _MULTIPLE, -w % _MULTIPLE
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


def _crop(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    return x[..., : size[0], : size[1]]


def _conv_bn(cin: int, cout: int, stride: int = 1, norm: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU())
    return layers


class ConvAutoencoder(nn.Module):
    """Convolutional denoising autoencoder, for 28x28 images by default (AAA's MNIST/Fashion-MNIST G).

    Strided 4x4 convolutions take 28 -> 14 -> 7 (``width`` and ``2*width`` channels) to a
    ``code``-channel 7x7 bottleneck; transposed convolutions mirror them back. No layer runs at
    full resolution with many channels, which keeps the shield cheap next to the classifier
    during adversarial training. BatchNorm keeps early adversarial training from collapsing
    to a constant output.

    ``size`` ((H, W), optional) is the image size it is built for: ``decode`` crops its output to
    it, so ``decode(encode(x))`` has ``x``'s size for any size (see the module's docstring).
    """

    def __init__(self, in_channels: int = 1, width: int = 32, code: int = 16,
                 size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.size = tuple(size) if size is not None else None
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, w, 4, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, code, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.ReLU(), nn.Conv2d(code, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.ConvTranspose2d(w, in_channels, 4, stride=2, padding=1),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(_pad_to_multiple(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return _crop(torch.sigmoid(self.decoder(z)), self.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _crop(self.decode(self.encode(x)), x.shape[-2:])


class UNetAutoencoder(nn.Module):
    """A small U-Net (skip connections between encoder and decoder), for 32x32 colour images by
    default; any channel count and size (padded and cropped, see the module's docstring)."""

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(*_conv_bn(in_channels, w), *_conv_bn(w, w))
        self.enc2 = nn.Sequential(*_conv_bn(w, 2 * w, stride=2), *_conv_bn(2 * w, 2 * w))
        self.enc3 = nn.Sequential(*_conv_bn(2 * w, 4 * w, stride=2), *_conv_bn(4 * w, 4 * w))
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = nn.Sequential(*_conv_bn(4 * w, 2 * w), *_conv_bn(2 * w, 2 * w))
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = nn.Sequential(*_conv_bn(2 * w, w), *_conv_bn(w, w))
        self.out = nn.Conv2d(w, in_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc3(self.enc2(self.enc1(_pad_to_multiple(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = _pad_to_multiple(x)
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([self.up2(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return _crop(torch.sigmoid(self.out(d1)), size)
