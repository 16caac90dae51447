"""Component-aware adaptive attacks on shielded pipelines (white-box, L-inf or L2).

They know that the model is ``Shielded(purifier, classifier)`` and use its parts:

* ``reconstruction_pgd``: PGD on ``CE(F(G(x')), y) + beta * ||G(x') - x||^2``, which also
  pushes the shield's reconstruction away from the clean image it should restore.
* ``latent_pgd``: PGD that pulls the shield's code ``E(x')`` toward the code of an image of
  another class (Sabour et al.'s feature adversaries, applied to the autoencoder's latent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gradient import pgd


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    purifier = getattr(model, "purifier", None)
    classifier = getattr(model, "classifier", None)
    if purifier is None or classifier is None:
        raise TypeError("this adaptive attack needs a Shielded(purifier, classifier) model")
    return purifier, classifier


def reconstruction_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, beta: float = 0.05,
                       **pgd_settings) -> torch.Tensor:
    """PGD whose loss adds the shield's reconstruction error w.r.t. the clean input.

    ``beta`` weighs the per-image sum of squared errors against the cross-entropy.
    """
    purifier, classifier = _parts(model)
    clean = x.detach()

    def objective(_model: nn.Module, x_adv: torch.Tensor, y_adv: torch.Tensor):
        reconstruction = purifier(x_adv)
        logits = classifier(reconstruction)
        error = (reconstruction - clean).pow(2).flatten(1).sum(1)
        return F.cross_entropy(logits, y_adv, reduction="none") + beta * error, logits

    # early_stop=False keeps the whole batch in every call, so `clean` lines up with `x_adv`.
    return pgd(model, x, y, objective=objective, early_stop=False, **pgd_settings)


def other_class_targets(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """For each image, an image of the batch with a different label (deterministic)."""
    n = y.shape[0]
    target = torch.arange(n, device=y.device)
    for shift in range(1, n):
        rolled = torch.roll(torch.arange(n, device=y.device), -shift)
        unset = y[target] == y
        if not unset.any():
            break
        candidate_ok = y[rolled] != y
        target = torch.where(unset & candidate_ok, rolled, target)
    return x[target]


def latent_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **pgd_settings) -> torch.Tensor:
    """PGD that minimizes ``||E(x') - E(x_t)||^2`` for a target image ``x_t`` of another class."""
    purifier, classifier = _parts(model)
    encode = getattr(purifier, "encode", None)
    if encode is None:
        raise TypeError(f"{type(purifier).__name__} exposes no encode(); the latent attack needs one")
    with torch.no_grad():
        target_code = encode(other_class_targets(x, y)).flatten(1)

    decode = getattr(purifier, "decode", None)

    def objective(_model: nn.Module, x_adv: torch.Tensor, y_adv: torch.Tensor):
        code = encode(x_adv)
        logits = classifier(decode(code) if decode is not None else purifier(x_adv))
        return -(code.flatten(1) - target_code).pow(2).sum(1), logits

    return pgd(model, x, y, objective=objective, early_stop=False, **pgd_settings)
