"""Component-aware adaptive attacks on shielded pipelines (white-box, L-inf or L2).

They know that the model is ``Shielded(purifier, classifier)`` and use its parts:

* ``reconstruction_pgd``: PGD on ``CE(F(G(x')), y) + beta * ||G(x') - x||^2``, which also
  pushes the shield's reconstruction away from the clean image it should restore.
* ``latent_pgd``: PGD that pulls the shield's code ``E(x')`` toward the code of an image of
  another class (Sabour et al.'s feature adversaries, applied to the autoencoder's latent).
* ``detector_pgd``: PGD that seeks inputs misclassified *and* not rejected by a detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .eot import EOT
from .gradient import PGDSteps, pgd, step_size_rule
from .losses import get_loss
from .registry import AuditHook, Stage, ball, register


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


def _detector_view(net: nn.Module, detector, x_adv: torch.Tensor, y_adv: torch.Tensor, loss_fn):
    """What a detector-aware attack sees of one batch: per-draw classifier losses and scaled
    detector excesses ``(s - t) / |t|``, both ``(draws, n)``; whether any draw rejects; and the
    logits that decide the label. On an ``EOT`` wrapper each draw's logits and score come from the same random
    pipeline (one repeated batch, whose draws random purifiers cache per tensor), and the
    mean log-probabilities decide."""
    threshold = float(detector.threshold)
    scale = abs(threshold) if torch.isfinite(torch.tensor(threshold)) and threshold != 0 else 1.0
    draws, n = (net.samples, x_adv.shape[0]) if isinstance(net, EOT) else (1, x_adv.shape[0])
    batch = x_adv.repeat(draws, *([1] * (x_adv.dim() - 1))) if draws > 1 else x_adv
    logits = (net.model if isinstance(net, EOT) else net)(batch)
    score = detector.score(batch)
    losses = loss_fn(logits, y_adv.repeat(draws)).view(draws, n)
    excess = ((score - threshold) / scale).view(draws, n)
    rejected = (score > threshold).view(draws, n).any(0).detach()
    if isinstance(net, EOT):
        decisive = torch.log_softmax(logits, 1).view(draws, n, -1).mean(0).detach()
    else:
        decisive = logits.detach()
    return losses, excess, rejected, decisive


def _success_logits(decisive: torch.Tensor, rejected: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The logits PGD judges success by: a rejected point is no success, so it is shown as
    classified correctly."""
    return torch.where(rejected[:, None], F.one_hot(y, decisive.shape[1]).to(decisive.dtype), decisive)


def _detector_of(model: nn.Module, attack: str):
    detector = _unwrap_detector(model)
    if detector is None:
        raise TypeError(f"{attack} needs a Shielded model with a detector")
    return detector


def detector_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, weight: float = 10.0,
                 loss: str = "ce", **pgd_settings) -> torch.Tensor:
    """Detector-aware PGD: seek inputs that are misclassified *and* not rejected.

    Maximizes ``CE(logits, y) - weight * relu(s(x) - t) / |t|`` where ``s`` is the detector's
    differentiable score and ``t`` its threshold (Carlini and Wagner 2017, "Adversarial
    examples are not easily detected"). An iterate counts as a success only if it is
    misclassified and its score is at or below the threshold, so PGD keeps searching past
    points that the detector would reject. Threat model: white-box, L-inf or L2.

    On an ``EOT`` wrapper the whole objective is averaged over its draws, the detector term
    included, and an iterate counts as a success only if the mean log-probabilities
    misclassify it and no draw rejects it.
    """
    detector = _detector_of(model, "detector-pgd")
    loss_fn = get_loss(loss)

    def objective(net: nn.Module, x_adv: torch.Tensor, y_adv: torch.Tensor):
        losses, excess, rejected, decisive = _detector_view(net, detector, x_adv, y_adv, loss_fn)
        return (losses - weight * torch.relu(excess)).mean(0), _success_logits(decisive, rejected, y_adv)

    return pgd(model, x, y, objective=objective, **pgd_settings)


def _per_example_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.flatten(1) * b.flatten(1)).sum(1).view(-1, *([1] * (a.dim() - 1)))


def _orthogonal_to(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``g`` without its component along ``h``, per example."""
    return g - _per_example_dot(g, h) / _per_example_dot(h, h).clamp_min(1e-20) * h


def orthogonal_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str = "ce",
                   orthogonal: bool = True, weight: float = 10.0, **pgd_settings) -> torch.Tensor:
    """Orthogonal PGD (Bryniarski, Hingun, Pachuca, Wang, Carlini 2022, "Evading adversarial
    example detectors using orthogonal projected gradient descent"): a detector-aware attack
    that never lets one goal's gradient undo the other's.

    While an iterate is still classified correctly it steps up the classifier's loss along
    the part of that gradient orthogonal to the detector score's gradient (to first order the
    step leaves the score alone); once it is misclassified but rejected, it steps down the
    detector's score orthogonally to the classifier's gradient (the label stays wrong). A
    weighted sum of the two (``detector_pgd``) lets the larger gradient win, which on MagNet
    leaves iterates shuttling in and out of the rejected region. ``orthogonal=False`` is the
    paper's *selective* variant (the raw gradients). Success, restarts, the first fooling
    iterate kept and EOT averaging are as in ``detector_pgd``. ``weight`` does not steer the
    steps: it only scores them, as ``detector_pgd``'s objective with that weight, to pick the
    iterate returned for an example never fooled. Threat model: white-box, L-inf or L2.
    """
    detector = _detector_of(model, "orthogonal-pgd")
    loss_fn = get_loss(loss)

    def objective(net: nn.Module, x_adv: torch.Tensor, y_adv: torch.Tensor):
        losses, excess, rejected, decisive = _detector_view(net, detector, x_adv, y_adv, loss_fn)
        shown = _success_logits(decisive, rejected, y_adv)
        classifier_loss, score = losses.mean(0), excess.mean(0)
        progress = (losses - weight * torch.relu(excess)).mean(0).detach()
        if not x_adv.requires_grad:  # the last iterate is only scored
            return progress, shown
        g_cls, = torch.autograd.grad(classifier_loss.sum(), x_adv, retain_graph=True)
        g_det, = torch.autograd.grad(score.sum(), x_adv)
        up, down = ((_orthogonal_to(g_cls, g_det), -_orthogonal_to(g_det, g_cls)) if orthogonal
                    else (g_cls, -g_det))
        wrong = decisive.argmax(1) != y_adv
        direction = torch.where(wrong.view(-1, *([1] * (x_adv.dim() - 1))), down, up).detach()
        # PGD steps along the gradient of what the objective returns: make that ``direction``
        # while the returned value stays the attack's progress.
        surrogate = (direction * x_adv).flatten(1).sum(1)
        return surrogate - surrogate.detach() + progress, shown

    return pgd(model, x, y, objective=objective, **pgd_settings)


# ---- registration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ReconstructionSettings(PGDSteps):
    beta: float = 0.05
    # The eval command has always run the component attacks with one restart.
    command_line: ClassVar[tuple[str, ...]] = ("steps", "step_size")


@dataclass(frozen=True)
class LatentSettings(PGDSteps):
    command_line: ClassVar[tuple[str, ...]] = ("steps", "step_size")


@dataclass(frozen=True)
class DetectorSettings(PGDSteps):
    weight: float = 10.0
    loss: str = "ce"
    early_stop: bool = True


@dataclass(frozen=True)
class OrthogonalSettings(DetectorSettings):
    orthogonal: bool = True


def has_purifier(model: nn.Module) -> bool:
    """A ``Shielded`` pipeline with a purifier (not the identity)."""
    purifier = getattr(model, "purifier", None)
    return (purifier is not None and not isinstance(purifier, nn.Identity)
            and getattr(model, "classifier", None) is not None)


def has_encoder(model: nn.Module) -> bool:
    """A purifier with a latent space: ``encode`` exists only where it makes sense (a MagNet
    ensemble of random members has none)."""
    return has_purifier(model) and callable(getattr(model.purifier, "encode", None))


def has_detector(model: nn.Module) -> bool:
    return getattr(model, "detector", None) is not None


def _adaptive_settings(budget, threat) -> dict:
    return {"steps": budget.adaptive_steps,
            "step_size": step_size_rule(threat.eps, budget.adaptive_steps, budget.step_factor),
            "restarts": 1}


def _detector_settings(budget, threat) -> dict:
    return {"loss": "ce", "steps": budget.adaptive_steps,
            "step_size": step_size_rule(threat.eps, budget.adaptive_steps, budget.step_factor),
            "restarts": budget.pgd_restarts}


# The component attacks need the pipeline's parts, so they cannot go through EOT's wrapper.
@register("recon-pgd", settings=ReconstructionSettings, applies=has_purifier,
          reference="Tramer, Carlini, Brendel and Madry 2020 (reconstruction-augmented loss)",
          audit=AuditHook(Stage.ADAPTIVE, _adaptive_settings, through_eot=False))
def _run_reconstruction(model, x, y, threat, generator, **settings):
    return reconstruction_pgd(model, x, y, **ball(threat), generator=generator, **settings)


@register("latent-pgd", settings=LatentSettings, applies=has_encoder,
          reference="Sabour, Cao, Faghri and Fleet 2016 (feature adversaries)",
          audit=AuditHook(Stage.ADAPTIVE, _adaptive_settings, through_eot=False))
def _run_latent(model, x, y, threat, generator, **settings):
    return latent_pgd(model, x, y, **ball(threat), generator=generator, **settings)


@register("detector-pgd", settings=DetectorSettings, applies=has_detector,
          reference="Carlini and Wagner 2017 (adversarial examples are not easily detected)",
          audit=AuditHook(Stage.ADAPTIVE, _detector_settings))
def _run_detector(model, x, y, threat, generator, **settings):
    return detector_pgd(model, x, y, **ball(threat), generator=generator, **settings)


# Neither detector-aware attack dominates the other: on MagNet-MNIST the orthogonal one fools
# twice as many, on PuVAE's RMSE detector the weighted sum does better.
@register("orthogonal-pgd", settings=OrthogonalSettings, applies=has_detector,
          reference="Bryniarski, Hingun, Pachuca, Wang and Carlini 2022",
          audit=AuditHook(Stage.ADAPTIVE, _detector_settings))
def _run_orthogonal(model, x, y, threat, generator, **settings):
    return orthogonal_pgd(model, x, y, **ball(threat), generator=generator, **settings)
