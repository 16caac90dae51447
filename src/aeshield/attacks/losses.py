"""Per-example attack losses on logits; every one is to be maximized by an untargeted attack."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner logit margin ``max_{j != y} z_j - z_y`` (positive once misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce and Hein 2020): scale-invariant margin."""
    sorted_logits, _ = logits.sort(dim=1)
    denom = (sorted_logits[:, -1] - sorted_logits[:, -3]).clamp_min(1e-12)
    return margin(logits, y) / denom


LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "margin": margin, "cw": margin, "dlr": dlr}


def get_loss(name: str | LossFn) -> LossFn:
    if callable(name):
        return name
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown attack loss {name!r}; use one of {sorted(LOSSES)}") from None


def misclassified(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.argmax(1) != y
