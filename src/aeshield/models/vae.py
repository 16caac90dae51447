"""Conditional variational autoencoder ``q(z|x,y)``, ``p(x|z,y)`` (PuVAE's generator).

Hwang et al. (2019), "PuVAE: A Variational Autoencoder to Purify Adversarial Examples": for
MNIST and Fashion-MNIST a convolutional encoder with 7x7 dilated convolutions, fully connected
layers of 1024 units and a code of 32 (MNIST) or 128 (Fashion-MNIST) dimensions, and a
transposed-convolution decoder. For CIFAR-10 the seed paper uses a code of 1024 dimensions;
here that is the same encoder/decoder on 3x32x32 inputs (an assumption: the seed paper's
CIFAR-10 layer list is not reproduced here beyond z = 1024). ``width`` and ``hidden`` shrink
it for CPU profiles.

The class enters the encoder's first fully connected layer and the decoder's first layer.
Concatenating a one-hot ``y`` to a linear layer's input is the same function as adding a
learned per-class vector to its output, which is how it is written here: the convolutional
features of ``x`` are computed once and shared by the N class-conditional reconstructions
that PuVAE needs at inference.
"""

from __future__ import annotations

import torch
from torch import nn


class ConditionalVAE(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, z_dim: int = 32,
                 width: int = 32, hidden: int = 1024, size: int = 28) -> None:
        super().__init__()
        if size % 4:
            raise ValueError(f"image size must be a multiple of 4, got {size}")
        w, s = width, size // 4
        self.in_shape = (in_channels, size, size)
        self.num_classes = num_classes
        self.z_dim = z_dim
        # 7x7 kernels with dilation 2 (a 13x13 receptive field each), stride 2: size -> size/4.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 7, stride=2, padding=6, dilation=2), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 7, stride=2, padding=6, dilation=2), nn.ReLU(),
            nn.Flatten(),
        )
        self.enc_x = nn.Linear(2 * w * s * s, hidden)
        self.enc_y = nn.Embedding(num_classes, hidden)
        self.mu = nn.Linear(hidden, z_dim)
        self.logvar = nn.Linear(hidden, z_dim)
        self.dec_z = nn.Linear(z_dim, hidden)
        self.dec_y = nn.Embedding(num_classes, hidden)
        self.body = nn.Sequential(
            nn.ReLU(), nn.Linear(hidden, 2 * w * s * s), nn.ReLU(), nn.Unflatten(1, (2 * w, s, s)),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(w, in_channels, 4, stride=2, padding=1),
        )

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of ``q(z | x, y)`` for labels ``y`` of shape (N,)."""
        h = torch.relu(self.enc_x(self.features(x)) + self.enc_y(y))
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(self.dec_z(z) + self.dec_y(y)))

    def forward(self, x: torch.Tensor, y: torch.Tensor, sample: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction, mu, logvar)``; ``sample=False`` decodes the mean."""
        mu, logvar = self.encode(x, y)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.decode(z, y), mu, logvar

    def reconstruct_all(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """One reconstruction per class: ``(N, K, C, H, W)``, the encoder's features shared."""
        n, k = x.shape[0], self.num_classes
        feats = self.enc_x(self.features(x))                                # (N, hidden)
        classes = torch.arange(k, device=x.device)
        h = torch.relu(feats[:, None, :] + self.enc_y(classes)[None])       # (N, K, hidden)
        mu = self.mu(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * self.logvar(h)) if sample else mu
        out = self.decode(z.reshape(n * k, -1), classes.repeat(n))
        return out.view(n, k, *x.shape[1:])


def cvae_mnist() -> ConditionalVAE:
    return ConditionalVAE(z_dim=32)


def cvae_fmnist() -> ConditionalVAE:
    return ConditionalVAE(z_dim=128)


def cvae_mnist_quick() -> ConditionalVAE:
    return ConditionalVAE(z_dim=32, width=16, hidden=256)


def cvae_fmnist_quick() -> ConditionalVAE:
    return ConditionalVAE(z_dim=128, width=16, hidden=256)


def cvae_cifar10() -> ConditionalVAE:
    return ConditionalVAE(in_channels=3, size=32, z_dim=1024)


def cvae_cifar10_quick() -> ConditionalVAE:
    return ConditionalVAE(in_channels=3, size=32, z_dim=1024, width=16, hidden=512)
