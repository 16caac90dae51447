"""Component-aware adaptive attacks on shielded pipelines (white-box, L-inf or L2).

They know that the model is ``Shielded(purifier, classifier)`` and use its parts:

* ``reconstruction_pgd``: PGD on ``CE(F(G(x')), y) + beta * ||G(x') - x||^2``, which also
  pushes the shield's reconstruction away from the clean image it should restore.
* ``latent_pgd``: PGD that pulls the shield's code ``E(x')`` toward the code of an image of
  another class (Sabour et al.'s feature adversaries, applied to the autoencoder's latent).
* ``detector_pgd``: PGD that seeks inputs misclassified *and* not rejected by a detector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .eot import EOT
from .gradient import pgd
from .losses import margin


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


def _unwrap_detector(model: nn.Module):
    """The detector of a Shielded model, also through an EOT wrapper."""
    for m in (model, getattr(model, "model", None)):
        detector = getattr(m, "detector", None)
        if detector is not None:
            return detector
    return None


def detector_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, weight: float = 10.0,
                 loss: str = "ce", **pgd_settings) -> torch.Tensor:
    """Detector-aware PGD: seek inputs that are misclassified *and* not rejected.

    Maximizes ``CE(logits, y) - weight * relu(s(x) - t) / |t|`` where ``s`` is the detector's
    differentiable score and ``t`` its threshold (Carlini and Wagner 2017, "Adversarial
    examples are not easily detected"). An iterate counts as a success only if it is
    misclassified and its score is at or below the threshold, so PGD keeps searching past
    points that the detector would reject. Threat model: white-box, L-inf or L2.

    On an ``EOT`` wrapper the whole objective is averaged over its draws, the detector term
    included: each draw's logits and score come from the same random pipeline (one repeated
    batch, whose draws random purifiers cache per tensor), and an iterate counts as a success
    only if the mean log-probabilities misclassify it and no draw rejects it.
    """
    detector = _unwrap_detector(model)
    if detector is None:
        raise TypeError("detector-pgd needs a Shielded model with a detector")
    threshold = float(detector.threshold)
    scale = abs(threshold) if torch.isfinite(torch.tensor(threshold)) and threshold != 0 else 1.0
    loss_fn = {"ce": lambda z, t: F.cross_entropy(z, t, reduction="none"),
               "margin": margin}[loss]

    def eot_objective(net: EOT, x_adv: torch.Tensor, y_adv: torch.Tensor):
        draws, n = net.samples, x_adv.shape[0]
        batch = x_adv.repeat(draws, *([1] * (x_adv.dim() - 1)))
        logits = net.model(batch)
        score = detector.score(batch)
        excess = torch.relu(score - threshold) / scale
        per_example = (loss_fn(logits, y_adv.repeat(draws)) - weight * excess).view(draws, n).mean(0)
        rejected = (score > threshold).view(draws, n).any(0).detach()
        mean_logp = torch.log_softmax(logits, 1).view(draws, n, -1).mean(0).detach()
        shown = torch.where(rejected[:, None], F.one_hot(y_adv, mean_logp.shape[1]).to(mean_logp.dtype),
                            mean_logp)
        return per_example, shown

    def objective(net: nn.Module, x_adv: torch.Tensor, y_adv: torch.Tensor):
        if isinstance(net, EOT):
            return eot_objective(net, x_adv, y_adv)
        logits = net(x_adv)
        score = detector.score(x_adv)
        excess = torch.relu(score - threshold) / scale
        per_example = loss_fn(logits, y_adv) - weight * excess
        rejected = (score > threshold).detach()
        # A rejected point is no success: show PGD a logit vector that classifies it correctly.
        shown = torch.where(rejected[:, None], F.one_hot(y_adv, logits.shape[1]).to(logits.dtype),
                            logits.detach())
        return per_example, shown

    return pgd(model, x, y, objective=objective, **pgd_settings)
