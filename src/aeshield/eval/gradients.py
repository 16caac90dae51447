"""Gradient analyses: how much class information and how much structure an input gradient
carries (S2SNet, Table 1), and how smooth an autoencoder is (DBP, Table 1).

- ``gradient_map``: ``|d loss / d x|`` per image, summed over channels and scaled to [0, 1]
  per image, so that maps of losses with different scales compare by their *shape*.
- ``pairwise_ssim``: mean SSIM between the maps of several losses on the same images
  (``pytorch_msssim.ssim``, a maintained SSIM implementation, 7x7 Gaussian window).
- ``label_ssim``: SSIM between the maps of the same pipeline for the true label and for a
  random other label: near 1 means the gradient does not depend on the class (structure),
  low means it carries the class signal.
- DBP's smoothness numbers live in :mod:`aeshield.defenses.dbp` (``jacobian_frobenius``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..stats import mean_interval

LossOf = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y) -> per-example loss


def ce_loss(model: nn.Module) -> LossOf:
    return lambda x, y: F.cross_entropy(model(x), y, reduction="none")


def reconstruction_loss(autoencoder: nn.Module) -> LossOf:
    return lambda x, _y: (autoencoder(x) - x).pow(2).flatten(1).sum(1)


def gradient_map(loss: LossOf, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``|d loss / d x|`` summed over channels, each map scaled to [0, 1]: (N, 1, H, W)."""
    maps = []
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        xb = xb.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss(xb, yb).sum(), xb)
        m = g.abs().sum(1, keepdim=True)
        peak = m.flatten(1).amax(1).clamp_min(1e-20).view(-1, 1, 1, 1)
        maps.append((m / peak).detach())
    return torch.cat(maps)


def ssim(a: torch.Tensor, b: torch.Tensor, win_size: int = 7) -> torch.Tensor:
    """Per-image SSIM of two batches of [0, 1] maps (N, C, H, W) -> (N,)."""
    from pytorch_msssim import ssim as _ssim

    return _ssim(a.double(), b.double(), data_range=1.0, size_average=False, win_size=win_size).float()


def pairwise_ssim(maps: Mapping[str, torch.Tensor]) -> dict[str, dict[str, dict]]:
    """Mean SSIM (with spread and interval) between every pair of named gradient maps."""
    names = list(maps)
    return {a: {b: mean_interval(ssim(maps[a], maps[b])) for b in names} for a in names}


def random_other_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random label different from ``y`` for every example."""
    shift = torch.randint(1, num_classes, y.shape, generator=generator).to(y.device)
    return (y + shift) % num_classes


def label_ssim(loss: LossOf, x: torch.Tensor, y: torch.Tensor, y_other: torch.Tensor) -> dict:
    """Mean SSIM between the gradient maps for the true labels and for ``y_other``."""
    return mean_interval(ssim(gradient_map(loss, x, y), gradient_map(loss, x, y_other)))
