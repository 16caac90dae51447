"""First-order L-inf / L2 attacks: FGSM, BIM and PGD with random restarts.

Threat model: white-box, the adversary knows the whole ``model`` (shield, classifier and any
wrapper such as BPDA or EOT) and its gradients. Every attack is a plain function
``attack(model, x, y, **settings) -> x_adv`` whose result lies in ``ThreatModel(norm, eps)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..distributed import rows_rand, rows_randn
from ..inputs import check_count, check_positive, checked_logits, validate_images, validate_labels
from ..models.fast_conv import fast_input_gradients
from ..threat import Norm, ThreatModel
from .losses import LossFn, get_loss, misclassified
from .registry import ball, register


def _check_inputs(x: torch.Tensor, y: torch.Tensor, bounds: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Raise ``InputError`` for images or labels an attack cannot take; returns int64 labels."""
    validate_images(x, bounds=bounds)
    return validate_labels(y, x.shape[0])


def _checked_forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``model(x)``, turning the errors of images or labels the model cannot take (another
    channel count or size, a label beyond its classes) into one clear ``InputError``."""
    logits = checked_logits(model, x)
    validate_labels(y, x.shape[0], num_classes=logits.shape[1])
    return logits


Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def logit_objective(loss: str | LossFn) -> Objective:
    """The usual objective: a per-example loss of the model's logits."""
    loss_fn = get_loss(loss)
    checked = False

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        nonlocal checked
        if checked:
            logits = model(x)
        else:  # the first call checks the model's output and the labels' range, once
            logits = _checked_forward(model, x, y)
            checked = True
        return loss_fn(logits, y), logits
    return objective


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of the summed per-example objective w.r.t. ``x`` only (parameters get no
    ``.grad``); returns ``(grad, logits, per_example_objective)``, all detached."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), fast_input_gradients(model):
        per_example, logits = objective(model, x, y)
        (grad,) = torch.autograd.grad(per_example.sum(), x)
    return grad, logits.detach(), per_example.detach()


def _step(x: torch.Tensor, grad: torch.Tensor, step_size: float, norm: Norm) -> torch.Tensor:
    if norm is Norm.LINF:
        return x + step_size * grad.sign()
    g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    return x + step_size * grad / g_norm


def _step_project(x_adv: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, step_size: float,
                  threat: ThreatModel, work: torch.Tensor) -> torch.Tensor:
    """``threat.project(_step(x_adv, grad, step_size, norm), x0)`` with the same floating-point
    operations in the same order (so the same bits), done in place in ``work`` (a scratch tensor
    of ``x_adv``'s shape, overwritten): one new tensor per step, the returned iterate, instead of
    seven. ``x_adv`` and ``grad`` are left as they are; nothing records a graph."""
    with torch.no_grad():
        if threat.norm is Norm.LINF:
            torch.sign(grad, out=work).mul_(step_size).add_(x_adv)
            work.sub_(x0).clamp_(-threat.eps, threat.eps)
        else:
            shape = (-1, *([1] * (x_adv.dim() - 1)))
            g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
            torch.mul(grad, step_size, out=work).div_(g_norm).add_(x_adv).sub_(x0)
            factor = (threat.eps / work.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            work.mul_(factor.view(shape))
        return torch.add(x0, work).clamp_(*threat.bounds)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy_rows_(dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor, scratch: torch.Tensor) -> None:
    """``dst[rows] = src[rows]`` for a per-example bool mask ``rows``, in place and bit for bit:
    ``dst ^= (dst ^ src) & -rows`` on the bits (``scratch``, of ``dst``'s shape, is overwritten).
    Three passes without a host sync; a third of the time of ``torch.where`` or a masked copy on
    a CPU, where that cost is paid every PGD step."""
    itype = _SAME_SIZE_INT[dst.element_size()]
    ones = rows.to(itype).neg_().view(-1, *([1] * (dst.dim() - 1)))  # all bits set where rows
    bits = dst.view(itype)
    torch.bitwise_xor(bits, src.view(itype), out=scratch.view(itype)).bitwise_and_(ones)
    bits.bitwise_xor_(scratch.view(itype))


def _random_start(x: torch.Tensor, threat: ThreatModel, generator: torch.Generator) -> torch.Tensor:
    shape = x.shape
    if threat.norm is Norm.LINF:
        delta = (rows_rand(shape, generator) * 2 - 1) * threat.eps
    else:
        direction = rows_randn(shape, generator)
        direction /= direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        radius = rows_rand((shape[0],), generator).view(-1, *([1] * (x.dim() - 1)))
        delta = direction * radius * threat.eps
    return threat.project(x + delta.to(x.device, x.dtype), x)


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    # A fixed default seed, never the clock: the same call gives the same answer.
    return generator if generator is not None else torch.Generator().manual_seed(0)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3,
         norm: str | Norm = Norm.LINF, loss: str | LossFn = "ce",
         bounds: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one step of size ``eps``.

    For L2, one step of length ``eps`` along the normalized gradient.
    """
    y = _check_inputs(x, y, bounds)
    threat = ThreatModel(norm, eps, bounds)
    if eps == 0:
        return x.clone()
    grad, _, _ = input_gradient(model, x, y, logit_objective(loss))
    return threat.project(_step(x, grad, eps, threat.norm), x).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3,
        norm: str | Norm = Norm.LINF, step_size: float = 0.01, steps: int = 40,
        restarts: int = 1, random_start: bool = True, loss: str | LossFn = "ce",
        bounds: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None,
        early_stop: bool = True, objective: Objective | None = None) -> torch.Tensor:
    """Projected Gradient Descent (Madry et al. 2018) with random restarts.

    Each restart runs ``steps`` projected steps of ``step_size`` (sign of the gradient for
    L-inf, normalized gradient for L2) from a uniform random point of the eps-ball
    (``random_start``). Per example, the first iterate that fools the model is kept, over all
    steps and restarts, so a later step or restart can never turn a fooled example back to
    robust; examples that are never fooled return the iterate of highest loss.
    ``early_stop`` stops attacking an example once it is fooled (same result, less compute).
    ``objective(model, x, y) -> (per_example_loss, logits)`` replaces the logit ``loss`` for
    adaptive attacks (reconstruction-augmented, latent-space, detector-aware).

    Args:
        model: any ``nn.Module`` from images in ``bounds`` to logits, in the mode to attack.
        x: ``(N, C, H, W)`` float images; y: ``(N,)`` int64 labels.
    Returns:
        ``x_adv`` with ``ThreatModel(norm, eps, bounds).contains(x_adv, x)`` for every example.

    Example:
        >>> x_adv = pgd(model, x, y, eps=0.3, step_size=0.01, steps=40, restarts=5)
    """
    y = _check_inputs(x, y, bounds)
    check_count("steps", steps)
    check_count("restarts", restarts)
    check_positive("step_size", step_size, allow_zero=True)  # 0 with a random start: uniform noise in the ball
    threat = ThreatModel(norm, eps, bounds)
    if eps == 0:
        return x.clone()
    objective = objective or logit_objective(loss)
    gen = _default_generator(generator)
    x = x.detach()
    n = x.shape[0]
    best = x.clone()
    best_loss = torch.full((n,), float("-inf"), device=x.device)
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)

    for restart in range(restarts):
        # ``active`` indexes the examples still attacked (None: all of them). The restart works on
        # its own rows of best / best_loss / fooled (the tensors themselves when all are active),
        # written back when examples leave (early stop) and at its end.
        active = None
        if early_stop and restart > 0:
            remaining = (~fooled).nonzero().squeeze(1)
            if remaining.numel() == 0:
                break
            if remaining.numel() < n:
                active = remaining
        if active is None:
            x0, y0, b_x, b_loss, b_fooled = x, y, best, best_loss, fooled
        else:
            x0, y0, b_x, b_loss, b_fooled = (t[active] for t in (x, y, best, best_loss, fooled))
        start_random = random_start or restart > 0
        x_adv = _random_start(x0, threat, gen) if start_random else x0.clone()
        work = torch.empty_like(x_adv)
        for step in range(steps + 1):
            if step < steps:
                grad, logits, per_loss = input_gradient(model, x_adv, y0, objective)
            else:
                with torch.no_grad():
                    per_loss, logits = objective(model, x_adv, y0)
            with torch.no_grad():
                # The first fooling iterate is kept; then the iterate of highest loss among the
                # examples not yet fooled. Masked writes, no index lists: nothing waits on a GPU.
                hit = misclassified(logits, y0) & ~b_fooled
                b_fooled |= hit
                better = (per_loss > b_loss) & ~b_fooled
                _copy_rows_(b_x, x_adv, hit | better, work)
                torch.where(better, per_loss.to(b_loss.dtype), b_loss, out=b_loss)
            if step == steps:
                break
            if early_stop and bool(b_fooled.any()):
                keep = ~b_fooled
                if active is None:  # the rows of best / fooled are already the tensors themselves
                    active = keep.nonzero().squeeze(1)
                else:
                    done = active[b_fooled]
                    best[done], best_loss[done], fooled[done] = b_x[b_fooled], b_loss[b_fooled], True
                    active = active[keep]
                if active.numel() == 0:
                    break
                x0, y0, x_adv, grad, b_x, b_loss, b_fooled = (
                    t[keep] for t in (x0, y0, x_adv, grad, b_x, b_loss, b_fooled))
                work = work[:active.numel()]
            x_adv = _step_project(x_adv, grad, x0, step_size, threat, work)
        if active is not None and active.numel():
            best[active], best_loss[active], fooled[active] = b_x, b_loss, b_fooled
    return threat.project(best, x)


def bim(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3,
        norm: str | Norm = Norm.LINF, step_size: float | None = None, steps: int = 10,
        loss: str | LossFn = "ce", bounds: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Basic Iterative Method (Kurakin et al. 2017): PGD from the clean input, no restarts.

    ``step_size`` defaults to ``eps / steps``, so that the steps together just reach the
    edge of the ball.
    """
    check_count("steps", steps)
    step = eps / steps if step_size is None else step_size
    return pgd(model, x, y, eps=eps, norm=norm, step_size=step, steps=steps, restarts=1,
               random_start=False, loss=loss, bounds=bounds)


def pgd_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threat: ThreatModel,
              step_size: float, steps: int, generator: torch.Generator,
              loss: str | LossFn = "ce") -> torch.Tensor:
    """Madry's training-time PGD: random start, ``steps`` steps, the last iterate.

    Unlike ``pgd`` it neither keeps the first fooling iterate nor stops early, because
    adversarial training wants the highest-loss point, not the first misclassified one.
    """
    objective = logit_objective(loss)
    x = x.detach()
    x_adv = _random_start(x, threat, generator)
    work = torch.empty_like(x_adv)
    for _ in range(steps):
        grad, _, _ = input_gradient(model, x_adv, y, objective)
        x_adv = _step_project(x_adv, grad, x, step_size, threat, work)
    return x_adv


def noisy_fgsm_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threat: ThreatModel,
                     step_size: float, noise: float, generator: torch.Generator,
                     loss: str | LossFn = "ce") -> torch.Tensor:
    """N-FGSM (de Jorge et al. 2022, "Make Some Noise"), a training-time attack: uniform noise
    in ``[-noise, noise]`` per pixel, then one FGSM step of ``step_size`` from the noisy point,
    clipped to the pixel box only. Not projected to the eps-ball on purpose: the authors find
    that the noise larger than eps and the missing projection are what keep single-step
    training from overfitting catastrophically, so the training perturbation can reach
    ``noise + step_size`` (evaluation stays in the ball). L-inf only."""
    if threat.norm is not Norm.LINF:
        raise ValueError(f"N-FGSM is an L-inf method; got a {threat.norm.value} threat model")
    x = x.detach()
    noisy = (x + (rows_rand(x.shape, generator) * 2 - 1).to(x.device, x.dtype) * noise).clamp_(*threat.bounds)
    grad, _, _ = input_gradient(model, noisy, y, logit_objective(loss))
    with torch.no_grad():
        return noisy.add_(grad.sign_(), alpha=step_size).clamp_(*threat.bounds)


def step_size_rule(eps: float, steps: int, factor: float = 2.5) -> float:
    """PGD step size ``factor * eps / steps``: the common 2.5 eps / steps rule, so that the
    steps together cross the ball 2.5 times; rounded so that records stay readable."""
    return float(f"{factor * eps / max(steps, 1):.6g}")


# ---- registration ---------------------------------------------------------------------------
# The eval command's shared options (--steps, --step-size, --restarts) that each attack takes.
@dataclass(frozen=True)
class FGSMSettings:
    loss: str = "ce"
    command_line: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class BIMSettings:
    step_size: float | None = None
    steps: int = 10
    loss: str = "ce"
    command_line: ClassVar[tuple[str, ...]] = ("steps", "step_size")


@dataclass(frozen=True)
class PGDSteps:
    """The settings of the PGD loop that every PGD-based attack takes."""

    step_size: float = 0.01
    steps: int = 40
    restarts: int = 1
    random_start: bool = True
    command_line: ClassVar[tuple[str, ...]] = ("steps", "step_size", "restarts")


@dataclass(frozen=True)
class PGDSettings(PGDSteps):
    loss: str = "ce"
    early_stop: bool = True


@register("fgsm", settings=FGSMSettings, reference="Goodfellow, Shlens and Szegedy 2015")
def _run_fgsm(model, x, y, threat, generator, **settings):
    return fgsm(model, x, y, **ball(threat), **settings)


@register("bim", settings=BIMSettings, reference="Kurakin, Goodfellow and Bengio 2017")
def _run_bim(model, x, y, threat, generator, **settings):
    return bim(model, x, y, **ball(threat), **settings)


@register("pgd", settings=PGDSettings, reference="Madry et al. 2018")
def _run_pgd(model, x, y, threat, generator, **settings):
    return pgd(model, x, y, **ball(threat), generator=generator, **settings)
