"""Carlini and Wagner (2017) L2 attack.

Threat model: white-box, L2. The attack minimizes ``||delta||_2^2 + c * f(x + delta)`` with
the logit-margin loss ``f = max(z_y - max_{j != y} z_j, -kappa)``, in the tanh change of
variables that keeps every iterate inside the pixel box. ``c`` is either fixed (e.g. c=100 as
in the AAA paper) or found per example by binary search. A result counts as an adversarial
example only if it is misclassified and, when ``max_l2`` is set, its L2 distance is below it;
examples without such a result are returned unchanged, so the output always lies in the
threat model ``ThreatModel("L2", max_l2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..inputs import check_count, check_positive
from ..models.fast_conv import fast_input_gradients
from ..threat import Norm
from .gradient import _check_inputs, _checked_forward
from .registry import AuditHook, Stage, register


def _to_tanh_space(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    unit = ((x - lo) / (hi - lo)).clamp(1e-6, 1 - 1e-6)
    return torch.atanh(unit * 2 - 1)


def _from_tanh_space(w: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return (torch.tanh(w) + 1) / 2 * (hi - lo) + lo


def cw_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, c: float = 100.0,
          steps: int = 100, lr: float = 0.01, kappa: float = 0.0,
          binary_search_steps: int = 1, max_l2: float | None = None,
          bounds: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Carlini-Wagner L2 (untargeted). ``binary_search_steps > 1`` searches c per example,
    starting at ``c``; ``binary_search_steps == 1`` keeps c fixed.

    Returns, per example, the smallest-L2 adversarial input found (within ``max_l2`` if set),
    or ``x`` itself where none was found.
    """
    y = _check_inputs(x, y, bounds)
    check_count("steps", steps)
    check_count("binary_search_steps", binary_search_steps)
    check_positive("lr", lr)
    check_positive("c", c)
    lo, hi = bounds
    x = x.detach()
    n = x.shape[0]
    c_now = torch.full((n,), float(c), device=x.device)
    c_low = torch.zeros(n, device=x.device)
    c_high = torch.full((n,), float("inf"), device=x.device)
    best = x.clone()
    best_l2 = torch.full((n,), float("inf"), device=x.device)
    limit = float("inf") if max_l2 is None else float(max_l2)
    w0 = _to_tanh_space(x, lo, hi)
    one_hot: torch.Tensor | None = None

    for _ in range(binary_search_steps):
        w = w0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=lr)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        for _ in range(steps):
            with torch.enable_grad(), fast_input_gradients(model):
                x_adv = _from_tanh_space(w, lo, hi)
                if one_hot is None:  # the first forward checks the output and the labels' range
                    logits = _checked_forward(model, x_adv, y)
                    one_hot = torch.nn.functional.one_hot(y, logits.shape[1]).bool()
                else:
                    logits = model(x_adv)
                true = logits[one_hot]
                other = logits.masked_fill(one_hot, float("-inf")).amax(1)
                f = (true - other).clamp_min(-kappa)
                l2_sq = (x_adv - x).flatten(1).pow(2).sum(1)
                loss = (l2_sq + c_now * f).sum()
                optimizer.zero_grad(set_to_none=True)
                (grad,) = torch.autograd.grad(loss, w)
            w.grad = grad
            optimizer.step()
            with torch.no_grad():
                l2 = l2_sq.sqrt()
                success = (logits.argmax(1) != y) & (l2 < limit)
                improved = success & (l2 < best_l2)
                best[improved] = x_adv.detach()[improved]
                best_l2[improved] = l2[improved]
                found |= success
            if binary_search_steps == 1 and max_l2 is not None and bool(found.all()):
                break  # every example already has an adversarial point inside the budget
        if binary_search_steps > 1:
            c_high = torch.where(found, torch.minimum(c_high, c_now), c_high)
            c_low = torch.where(found, c_low, torch.maximum(c_low, c_now))
            c_now = torch.where(torch.isinf(c_high), c_now * 10, (c_low + c_high) / 2)
    return best


@dataclass(frozen=True)
class CWSettings:
    c: float = 100.0
    steps: int = 100
    lr: float = 0.01
    kappa: float = 0.0
    binary_search_steps: int = 1
    command_line: ClassVar[tuple[str, ...]] = ("steps",)


# The threat model's eps is the L2 success budget (``max_l2``): a point farther away is no success.
@register("cw-l2", settings=CWSettings, reference="Carlini and Wagner 2017", norms=(Norm.L2,),
          audit=AuditHook(Stage.WHITE_BOX, lambda budget, threat: {"steps": budget.cw_steps}))
def _run_cw(model, x, y, threat, generator, **settings):
    return cw_l2(model, x, y, max_l2=threat.eps, bounds=threat.bounds, **settings)
