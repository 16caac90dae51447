"""Shared fixtures: tiny models and a small real-data classifier trained once per session."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aeshield.models.classifiers import Classifier, MNIST_STATS


def tiny_mlp(hidden: int = 64) -> Classifier:
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(),
                                    nn.Linear(hidden, 10)), *MNIST_STATS, in_shape=(1, 28, 28))


@pytest.fixture(scope="session")
def mnist_small():
    """2,000 real MNIST training and 500 test images (fetched through the real fetcher)."""
    from aeshield.data import load_dataset

    train = load_dataset("mnist", "train").subset(2000, seed=0)
    test = load_dataset("mnist", "test").subset(500, seed=0)
    return train, test


def fit(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int,
        lr: float = 3e-3) -> nn.Module:
    """Plain Adam training in fixed batch order: how a test makes a small classifier that works."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for xb, yb in zip(images.split(batch_size), labels.split(batch_size)):
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_mlp(mnist_small):
    """A small MLP trained for a few epochs on real MNIST: ~90% clean accuracy."""
    train, _ = mnist_small
    torch.manual_seed(0)
    return fit(tiny_mlp(), train.images, train.labels, epochs=8, batch_size=100)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
