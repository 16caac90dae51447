"""The classifiers of the source papers.

Every classifier maps images in [0, 1] (NCHW) to logits; input normalization lives inside
the model so that attacks and shields always work in pixel space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` stored as buffers, so it moves and saves with the model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``normalize`` followed by ``body``; ``in_shape`` documents the expected input."""

    def __init__(self, body: nn.Module, mean: Sequence[float], std: Sequence[float],
                 in_shape: tuple[int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.in_shape = tuple(in_shape)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


MNIST_STATS = ((0.1307,), (0.3081,))
FMNIST_STATS = ((0.2860,), (0.3530,))
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def _gray(body: nn.Module, stats: tuple) -> Classifier:
    return Classifier(body, *stats, in_shape=(1, 28, 28))


def mnist_a(width: int = 1, stats: tuple = MNIST_STATS) -> Classifier:
    """Madry et al. (2018) MNIST model: conv32@5x5+pool, conv64@5x5+pool, fc1024, fc10."""
    c1, c2, h = 32 * width, 64 * width, 1024
    return _gray(nn.Sequential(
        nn.Conv2d(1, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 7 * 7, h), nn.ReLU(), nn.Linear(h, 10),
    ), stats)


def mnist_b(stats: tuple = MNIST_STATS) -> Classifier:
    """One convolution (64@8x8, stride 2) and two fully connected layers."""
    return _gray(nn.Sequential(
        nn.Conv2d(1, 64, 8, stride=2, padding=3), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 14 * 14, 128), nn.ReLU(), nn.Linear(128, 10),
    ), stats)


def mnist_c(stats: tuple = MNIST_STATS) -> Classifier:
    """Fully connected only: 784-512-256-10."""
    return _gray(nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
        nn.Linear(256, 10),
    ), stats)


def fmnist_native() -> Classifier:
    """Fashion-MNIST conv net in the style of Zheng et al.'s DAA model (Madry-like, 3x3 convs)."""
    return _gray(nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.Linear(256, 10),
    ), FMNIST_STATS)


def fmnist_transfer() -> Classifier:
    """Fashion-MNIST transfer classifier: fully connected only."""
    return mnist_c(stats=FMNIST_STATS)


def puvae_a(stats: tuple = MNIST_STATS) -> Classifier:
    """PuVAE paper classifier A: conv64@5x5, conv64@5x5 s2, dropout, fc128, dropout, fc10."""
    return _gray(nn.Sequential(
        nn.Conv2d(1, 64, 5, padding=2), nn.ReLU(),
        nn.Conv2d(64, 64, 5, stride=2, padding=2), nn.ReLU(), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(64 * 14 * 14, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10),
    ), stats)


def puvae_b(width: float = 1.0) -> Classifier:
    """PuVAE paper classifier B (CIFAR-10): conv64, conv128, conv256 s2, dropout, fc512, fc256, fc10."""
    c = [max(8, int(w * width)) for w in (64, 128, 256)]
    return Classifier(nn.Sequential(
        nn.Conv2d(3, c[0], 3, padding=1), nn.ReLU(),
        nn.Conv2d(c[0], c[1], 3, padding=1), nn.ReLU(),
        nn.Conv2d(c[1], c[2], 3, stride=2, padding=1), nn.ReLU(), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(c[2] * 16 * 16, 512), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10),
    ), *CIFAR_STATS, in_shape=(3, 32, 32))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


def cifar_d(depth: int = 28, widen: int = 10) -> Classifier:
    """CIFAR-10 classifier D: a pre-activation wide ResNet as in Madry's CIFAR-10 challenge
    (WRN-28-10 for the paper profile; e.g. depth=10, widen=1 for a CPU-sized variant)."""
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False)]
    cin = widths[0]
    for stage, stride in zip(range(1, 4), (1, 2, 2)):
        for i in range(n):
            layers.append(_BasicBlock(cin, widths[stage], stride if i == 0 else 1))
            cin = widths[stage]
    layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(cin, 10)]
    return Classifier(nn.Sequential(*layers), *CIFAR_STATS, in_shape=(3, 32, 32))


_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"]


def cifar_e(width: float = 1.0) -> Classifier:
    """CIFAR-10 classifier E: VGG-19 with BatchNorm (``width`` scales every layer)."""
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG19:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            cout = max(4, int(v * width))
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
    layers += [nn.Flatten(), nn.Linear(cin, 10)]
    return Classifier(nn.Sequential(*layers), *CIFAR_STATS, in_shape=(3, 32, 32))


def cifar_f(width: float = 1.0) -> Classifier:
    """CIFAR-10 classifier F: four convolutions and one fully connected layer."""
    c = [max(4, int(w * width)) for w in (32, 64, 128, 128)]
    return Classifier(nn.Sequential(
        nn.Conv2d(3, c[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c[0], c[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(c[3] * 4 * 4, 10),
    ), *CIFAR_STATS, in_shape=(3, 32, 32))
