"""Sanity checks of a robustness evaluation: signs that the attacks, not the model, failed.

Carlini et al. (2019), "On Evaluating Adversarial Robustness", section 5, and the flags of the
reference AutoAttack (Croce and Hein 2020, ``flags_doc.md``) list the symptoms of a broken
evaluation, most often gradient masking (Athalye, Carlini and Wagner 2018):

* an unbounded adversary does not reach ~0% accuracy;
* accuracy goes *up* when the budget (eps) or the number of attack steps goes up;
* a black-box or transfer attack succeeds where every white-box attack failed;
* the input gradients are zero, or no better than a random direction;
* a 10x longer attack still changes the result;
* the model is random and the attacks did not average over its randomness (EOT).

Each check is split into a *measurement* (runs attacks through the harness, on a subset) and a
pure *judgement* (``judge_*``: numbers in, ``CheckResult`` out), so that the decision rules can
be tested on synthetic numbers and re-applied to stored measurements. Every judgement returns
``PASS``, ``FLAG`` or ``SKIP`` with a one-line explanation and, for ``FLAG``, what to do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..attacks.eot import EOT
from ..attacks.losses import margin
from ..threat import Norm, ThreatModel
from ..models.predict import predict
from .harness import AttackSpec, adapt_model, attack_generator, craft, evaluate, handled
from ..records import Accuracy, EvalRecord

PASS, FLAG, SKIP = "PASS", "FLAG", "SKIP"

# Check names, in report order.
RANDOMNESS = "randomness-eot"
GRADIENTS = "gradients"
UNBOUNDED = "unbounded-eps"
EPS_MONOTONE = "monotone-eps"
STEPS_MONOTONE = "monotone-steps"
BLACKBOX = "blackbox-vs-whitebox"
LONGER = "longer-attack"
CHECK_ORDER = (RANDOMNESS, GRADIENTS, UNBOUNDED, EPS_MONOTONE, STEPS_MONOTONE, BLACKBOX, LONGER)


@dataclass
class CheckResult:
    """The verdict of one sanity check.

    ``n`` is the number of examples the check ran on (checks may use a subset of the
    evaluation set); ``details`` holds the measured numbers behind the verdict.
    """

    name: str
    verdict: str
    explanation: str
    details: dict = field(default_factory=dict)
    n: int | None = None

    def __post_init__(self) -> None:
        if self.verdict not in (PASS, FLAG, SKIP):
            raise ValueError(f"verdict must be PASS, FLAG or SKIP, got {self.verdict!r}")

    @property
    def flagged(self) -> bool:
        return self.verdict == FLAG

    def line(self) -> str:
        on = f" (on {self.n} examples)" if self.n is not None else ""
        return f"[{self.verdict}] {self.name}{on}: {self.explanation}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CheckResult:
        return cls(d["name"], d["verdict"], d["explanation"], d.get("details", {}), d.get("n"))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


# ---- judgements (pure) --------------------------------------------------------------------
def judge_randomness(random: bool, *, max_logit_change: float, declared: bool,
                     eot_samples: int | None, n: int | None = None) -> CheckResult:
    """PASS when the pipeline is deterministic, or random and attacked through EOT.

    FLAG when it is random and the gradient attacks did not use EOT (``eot_samples`` is None or
    1): one random draw gives a noisy gradient and overstates robustness.
    """
    details = {"random": random, "declared_stochastic": declared,
               "max_logit_change": max_logit_change, "eot_samples": eot_samples}
    if not random:
        return CheckResult(RANDOMNESS, PASS, "deterministic: the same input twice gives the same "
                           "logits, so no EOT is needed", details, n)
    how = ("detected (the same input twice gave different logits, max relative change "
           f"{max_logit_change:.2g})" if max_logit_change > 0 else "declared (purifier.stochastic)")
    if not eot_samples or eot_samples < 2:
        return CheckResult(RANDOMNESS, FLAG, f"randomness {how} but the gradient attacks used no "
                           "EOT; rerun with eot_samples >= 8 (an EOT wrap) so that gradients "
                           "average over the randomness", details, n)
    note = "" if declared else "; the purifier does not declare stochastic=True, consider setting it"
    return CheckResult(RANDOMNESS, PASS, f"randomness {how}; every gradient attack ran through "
                       f"EOT with {eot_samples} samples{note}", details, n)


def judge_gradients(zero_fraction: float, uninformative_fraction: float | None, *, n: int,
                    shielded: bool, zero_tol: float = 0.05, uninformative_tol: float = 0.5
                    ) -> CheckResult:
    """FLAG when more than ``zero_tol`` of the inputs have an exactly zero (or non-finite)
    input gradient, or more than ``uninformative_tol`` of them gain less loss from a step
    along the gradient than from the best of a few random steps of the same size."""
    details = {"zero_fraction": zero_fraction, "uninformative_fraction": uninformative_fraction,
               "zero_tol": zero_tol, "uninformative_tol": uninformative_tol}
    fix = ("the audit also ran BPDA variants (wrap='bpda'); trust the result only if they or "
           "Square found what the plain attacks missed" if shielded else
           "wrap the non-differentiable part in BPDA (aeshield.attacks.BPDA) with a "
           "differentiable stand-in, or put it in a Purifier inside Shielded so the audit can")
    if zero_fraction > zero_tol:
        return CheckResult(GRADIENTS, FLAG, f"the input gradient is zero for {_pct(zero_fraction)} of "
                           "the inputs (gradient masking: quantization, thresholding or saturation); "
                           + fix, details, n)
    if uninformative_fraction is not None and uninformative_fraction > uninformative_tol:
        return CheckResult(GRADIENTS, FLAG, "a step along the input gradient raises the loss less "
                           "than a random step for " + _pct(uninformative_fraction) + " of the inputs "
                           "(shattered or vanishing gradients); " + fix, details, n)
    extra = ("" if uninformative_fraction is None else
             f", and the gradient beats random directions on {_pct(1 - uninformative_fraction)}")
    return CheckResult(GRADIENTS, PASS, f"non-zero input gradients on {_pct(1 - zero_fraction)} of the "
                       f"inputs{extra}", details, n)


def judge_unbounded(accuracy: Accuracy, eps: float, *, tol: float = 0.02) -> CheckResult:
    """FLAG when an adversary with an unbounded budget leaves more than ``tol`` accuracy,
    beyond sampling noise (the Wilson 95% lower bound is above ``tol`` too)."""
    details = {"eps": eps, "accuracy": accuracy.to_dict(), "tol": tol}
    if accuracy.value <= tol or accuracy.interval[0] <= tol:
        return CheckResult(UNBOUNDED, PASS, f"accuracy falls to {accuracy.format()} (%, Wilson 95%) at "
                           f"eps={eps:g}, an unbounded adversary", details, accuracy.n)
    return CheckResult(UNBOUNDED, FLAG, f"accuracy is still {accuracy.format()} (%, Wilson 95%) at eps={eps:g}, "
                       "where any image can be reached: the attack, not the model, is failing "
                       "(masked gradients, a detector that the attack ignores, or too few steps); "
                       "try BPDA, EOT, more steps, or an adaptive loss", details, accuracy.n)


def judge_monotone(name: str, parameter: str, values: Sequence[float],
                   accuracies: Sequence[Accuracy], *, tol: float = 0.02,
                   random: bool = False) -> CheckResult:
    """FLAG when accuracy at a larger ``parameter`` value exceeds the accuracy at a smaller one
    by more than ``tol`` *and* beyond sampling noise (the larger value's Wilson 95% lower bound
    is above the smaller value's accuracy). The same examples are used at every value."""
    pairs = sorted(zip(values, accuracies), key=lambda p: p[0])
    curve = [{parameter: v, "accuracy": a.to_dict()} for v, a in pairs]
    worst = None
    for i in range(len(pairs)):
        for j in range(i + 1, len(pairs)):
            (vi, ai), (vj, aj) = pairs[i], pairs[j]
            rise = aj.value - ai.value
            if rise > tol and aj.interval[0] > ai.value and (worst is None or rise > worst[0]):
                worst = (rise, vi, ai, vj, aj)
    n = accuracies[0].n if accuracies else None
    details = {"curve": curve, "tol": tol}
    if len(pairs) < 2:
        return CheckResult(name, SKIP, f"needs at least two {parameter} values", details, n)
    if worst is None:
        return CheckResult(name, PASS, f"accuracy does not increase with {parameter} "
                           f"({', '.join(f'{v:g}: {_pct(a.value)}' for v, a in pairs)})", details, n)
    rise, vi, ai, vj, aj = worst
    details["worst_rise"] = rise
    if random:
        advice = ("the pipeline is random and its EOT gradient is too noisy for small steps: "
                  "raise eot_samples (standard/paper budget) and check again")
        return CheckResult(name, FLAG, f"accuracy rises from {_pct(ai.value)} at {parameter}={vi:g} "
                           f"to {_pct(aj.value)} at {parameter}={vj:g}; " + advice, details, n)
    advice = ("the attack is not working at large eps (masked gradients or a bad step size); "
              "check the gradients and try BPDA/EOT" if parameter == "eps" else
              "more iterations should never help the defender: the loss landscape is being "
              "masked (or the step size is wrong); try more restarts, BPDA, EOT or Square")
    return CheckResult(name, FLAG, f"accuracy rises from {_pct(ai.value)} at {parameter}={vi:g} to "
                       f"{_pct(aj.value)} at {parameter}={vj:g}; " + advice, details, n)


def judge_blackbox(record: EvalRecord, blackbox: Sequence[str], *, tol: float = 0.01) -> CheckResult:
    """FLAG when the black-box and transfer attacks, run after every white-box attack in the
    cascade, fool more than ``tol`` of the examples that all white-box attacks missed."""
    bb = [a for a in record.attacks if a.name in set(blackbox)]
    if not bb:
        return CheckResult(BLACKBOX, SKIP, "no black-box or transfer attack ran", {}, record.n)
    newly = sum(a.newly_fooled for a in bb)
    frac = newly / record.n if record.n else 0.0
    details = {"newly_fooled": newly, "fraction": frac, "tol": tol,
               "per_attack": {a.name: a.newly_fooled for a in bb}}
    names = ", ".join(a.name for a in bb)
    if frac > tol:
        top = max(bb, key=lambda a: a.newly_fooled)
        return CheckResult(BLACKBOX, FLAG, f"black-box/transfer attacks fooled {newly} examples "
                           f"({_pct(frac)}) that every white-box attack missed ({top.name}: "
                           f"{top.newly_fooled}); the white-box attacks are being masked, so the "
                           "defense's gradients mislead: use BPDA/EOT or an adaptive attack", details,
                           record.n)
    return CheckResult(BLACKBOX, PASS, f"{names} added {newly} examples ({_pct(frac)}) after the "
                       "white-box attacks", details, record.n)


def sign_test(b: int, c: int) -> float:
    """Two-sided exact sign test (McNemar) p-value for ``b`` versus ``c`` discordant pairs."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


def judge_longer(short: Accuracy, long: Accuracy, *, only_long: int, only_short: int, factor: int,
                 tol: float = 0.01, alpha: float = 0.05) -> CheckResult:
    """FLAG when a ``factor``-times longer attack moves accuracy by ``tol`` (1 point) or more
    *and* beyond sampling noise: of the examples that exactly one of the two attacks fooled,
    ``only_long`` were fooled only by the long one and ``only_short`` only by the short one;
    the change counts if an exact two-sided sign test on them gives ``p < alpha``."""
    moved = short.value - long.value
    p = sign_test(only_long, only_short)
    details = {"factor": factor, "short": short.to_dict(), "long": long.to_dict(),
               "fooled_only_by_long": only_long, "fooled_only_by_short": only_short,
               "sign_test_p": p, "tol": tol, "alpha": alpha}
    summary = (f"{_pct(short.value)} -> {_pct(long.value)}; fooled only by the long attack "
               f"{only_long}, only by the normal one {only_short}, sign test p={p:.2g}")
    if abs(moved) >= tol and p < alpha:
        if moved > 0:
            return CheckResult(LONGER, FLAG, f"a {factor}x longer attack lowers accuracy by "
                               f"{100 * moved:.1f} points ({summary}): the attacks have not converged. "
                               "The audit's headline counts what the longer run fooled, but it too may "
                               "stop short, so read it as an upper bound; use a larger budget "
                               "(standard/paper)", details, short.n)
        return CheckResult(LONGER, FLAG, f"a {factor}x longer attack raises accuracy by "
                           f"{-100 * moved:.1f} points ({summary}): accuracy should never rise with "
                           "attack length; suspect masked or noisy gradients (more EOT samples) or "
                           "a step-size problem", details, short.n)
    why = (f"less than {100 * tol:g} point" if abs(moved) < tol else
           f"{100 * abs(moved):.1f} points, within sampling noise")
    return CheckResult(LONGER, PASS, f"a {factor}x longer attack moves accuracy by {why} ({summary})",
                       details, short.n)


# ---- measurements -------------------------------------------------------------------------
@torch.no_grad()
def detect_randomness(model: nn.Module, x: torch.Tensor, trials: int = 3) -> tuple[bool, float]:
    """Run ``x`` through ``model`` ``trials`` times; random if any logit changes.

    Returns ``(random, max_change)`` with the largest change relative to the logits' scale.
    """
    model.eval()
    first = model(x)
    scale = first.abs().max().clamp_min(1e-12)
    change = 0.0
    for _ in range(trials - 1):
        change = max(change, float(((model(x) - first).abs().max() / scale).item()))
    return change > 1e-5, change


def _random_unit(shape: torch.Size, norm: Norm, gen: torch.Generator) -> torch.Tensor:
    if norm is Norm.LINF:
        return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
    d = torch.randn(shape, generator=gen)
    return d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (len(shape) - 1)))


def gradient_statistics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                        *, random_directions: int = 4, seed: int = 0, eot_samples: int | None = None,
                        batch_size: int = 250) -> dict:
    """Input-gradient health on ``(x, y)`` under the margin (CW) loss, which does not saturate.

    * ``zero_fraction``: share of inputs whose gradient is exactly zero or not finite.
    * ``uninformative_fraction``: share of inputs where one step of size eps/2 along the
      gradient (its sign for L-inf) raises the loss no more than the best of
      ``random_directions`` random steps of the same size; ``None`` if eps is 0.
    * ``median_grad_norm``: median L2 norm of the gradient.

    A random model is measured through ``EOT(model, eot_samples)``.
    """
    model.eval()
    net = EOT(model, eot_samples) if eot_samples and eot_samples > 1 else model
    gen = torch.Generator().manual_seed(seed)
    step = threat.eps / 2
    zero, useless, norms = [], [], []
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        xg = xb.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = margin(net(xg), yb)
            (grad,) = torch.autograd.grad(loss.sum(), xg)
        flat = grad.flatten(1)
        finite = torch.isfinite(flat).all(1)
        zero.append((flat.abs().sum(1) == 0) | ~finite)
        norms.append(torch.where(finite, flat.norm(dim=1), torch.zeros_like(finite, dtype=flat.dtype)))
        if step > 0:
            with torch.no_grad():
                direction = grad.sign() if threat.norm is Norm.LINF else grad / flat.norm(
                    dim=1).clamp_min(1e-30).view(-1, *([1] * (xb.dim() - 1)))
                base = loss.detach()
                along = margin(net(threat.with_eps(step).project(xb + step * direction, xb)), yb) - base
                best_random = torch.full_like(base, float("-inf"))
                for _ in range(random_directions):
                    r = _random_unit(xb.shape, threat.norm, gen).to(xb.device, xb.dtype)
                    gain = margin(net(threat.with_eps(step).project(xb + step * r, xb)), yb) - base
                    best_random = torch.maximum(best_random, gain)
                useless.append(along <= best_random)
    zero_t = torch.cat(zero)
    return {"zero_fraction": float(zero_t.float().mean()),
            "uninformative_fraction": float(torch.cat(useless).float().mean()) if useless else None,
            "median_grad_norm": float(torch.cat(norms).median()), "n": int(zero_t.numel()),
            "step": step, "random_directions": random_directions}


SpecFactory = Callable[[float, int], "AttackSpec | Sequence[AttackSpec]"]
"""``make_spec(eps, steps)``: the reference attack at a given eps and length, one spec or a
cascade of specs (an example is robust only if it survives all of them)."""


def _cascade(specs: AttackSpec | Sequence[AttackSpec]) -> list[AttackSpec]:
    return [specs] if isinstance(specs, AttackSpec) else list(specs)


def _reference_record(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                      make_spec: SpecFactory, eps: float, steps: int, *, seed: int, batch_size: int,
                      surrogate: nn.Module | None = None) -> EvalRecord:
    return evaluate(model, x, y, _cascade(make_spec(eps, steps)), threat.with_eps(eps), seed=seed,
                    batch_size=batch_size, surrogate=surrogate, progress=False)


def unbounded_eps(threat: ThreatModel, shape: torch.Size | Sequence[int]) -> float:
    """A radius that reaches every image in the box: 1 box-width for L-inf, the box diagonal
    (width times the square root of the pixel count) for L2."""
    width = threat.bounds[1] - threat.bounds[0]
    if threat.norm is Norm.LINF:
        return float(width)
    return float(width * math.sqrt(math.prod(shape[1:])))


def sweep_records(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                  make_spec: SpecFactory, points: Sequence[tuple[float, int]], *, seed: int = 0,
                  batch_size: int = 500, surrogate: nn.Module | None = None) -> list[EvalRecord]:
    """The reference attack ``make_spec(eps, steps)``, without the rest of the battery, at each
    ``(eps, steps)`` point: one record per point, with its per-example flags."""
    return [_reference_record(model, x, y, threat, make_spec, eps, steps, seed=seed,
                              batch_size=batch_size, surrogate=surrogate)
            for eps, steps in points]


def run_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
              make_spec: SpecFactory, points: Sequence[tuple[float, int]], *, seed: int = 0,
              batch_size: int = 500, surrogate: nn.Module | None = None) -> list[Accuracy]:
    """Robust accuracy of the reference attack at each ``(eps, steps)`` point (``sweep_records``)."""
    return [r.robust for r in sweep_records(model, x, y, threat, make_spec, points, seed=seed,
                                            batch_size=batch_size, surrogate=surrogate)]


def run_unbounded(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                  make_spec: SpecFactory, steps: int, *, max_factor: int = 10, seed: int = 0,
                  batch_size: int = 500) -> tuple[CheckResult, dict]:
    """The unbounded-eps check and its sweep point: ``make_spec`` at ``unbounded_eps``.

    The step rule scales steps with eps, so at eps = 1 they are 1/eps times coarser than at the
    audited eps, and a detector rejects every iterate of such steps (measured on MagNet-MNIST:
    20 steps of 0.125 left 100% of 100 images correct or rejected, 100 steps of 0.025 left 0%).
    So a failed run is repeated with steps no coarser than at the audited eps (at most
    ``max_factor`` times as many) before the check blames the attack.
    """
    eps_max = unbounded_eps(threat, x.shape)
    coarse_record = _reference_record(model, x, y, threat, make_spec, eps_max, steps, seed=seed,
                                      batch_size=batch_size)
    coarse = coarse_record.robust
    result = judge_unbounded(coarse, eps_max)
    sweep = {"eps": eps_max, "steps": steps, "accuracy": coarse.to_dict()}
    if not result.flagged or threat.eps <= 0:
        return result, sweep
    fine_steps = steps * min(max_factor, math.ceil(eps_max / threat.eps - 1e-9))
    if fine_steps == steps:
        return result, sweep
    fine_record = _reference_record(model, x, y, threat, make_spec, eps_max, fine_steps, seed=seed,
                                    batch_size=batch_size)
    # Both runs are attacks on the same examples: an example either one fooled is fooled.
    both = Accuracy.from_flags(coarse_record.flags() & fine_record.flags())
    result = judge_unbounded(both, eps_max)
    fine = {"steps": fine_steps, "accuracy": fine_record.robust.to_dict()}
    result.details["coarse"] = dict(sweep)
    result.details["fine"] = dict(fine)
    result.explanation += (f" (worst case of {steps} and {fine_steps} steps; {steps} steps alone "
                           f"left {coarse.format()}, {fine_steps} alone {fine_record.robust.format()})")
    return result, {"eps": eps_max, "steps": fine_steps, "accuracy": both.to_dict(), "coarse": sweep,
                    "fine": fine}


def longer_records(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                   make_spec: SpecFactory, steps: int, *, factor: int = 10, seed: int = 0,
                   batch_size: int = 500) -> tuple[EvalRecord, EvalRecord]:
    """The records of ``steps`` and ``factor * steps`` steps of the same attack, from the same
    seed, on the same examples, at the audited eps."""
    return tuple(_reference_record(model, x, y, threat, make_spec, threat.eps, s, seed=seed,
                                   batch_size=batch_size) for s in (steps, factor * steps))


def compare_longer(short: EvalRecord, long: EvalRecord) -> tuple[Accuracy, Accuracy, int, int]:
    """``(short, long, fooled only by long, fooled only by short)`` of two records on the same
    examples."""
    s, l_ = short.flags(), long.flags()
    return short.robust, long.robust, int((s & ~l_).sum()), int((~s & l_).sum())


def one_query_vs_retries(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                         make_spec: SpecFactory, steps: int, *, draws: int = 32, seed: int = 0,
                         batch_size: int = 500) -> dict:
    """How a random pipeline's robustness depends on how often the attacker may query it.

    Runs the reference attack once at the audited eps and scores each adversarial input over
    ``draws`` fresh draws of the pipeline's randomness; with a cascade of specs an example's rate
    is its lowest over them. Returns the accuracy judged by the first draw alone (as every run
    of the audit judges), the expected accuracy (mean handled rate: an attacker with one query), the
    majority-vote accuracy, the accuracy when every one of the draws must hold (an attacker who
    retries the same input ``draws`` times), and how many examples are coin flips (rate strictly
    between 0.1 and 0.9).
    """
    model.eval()
    per_draw = []  # per attack of the cascade: (draws, n) handled flags
    for index, spec in enumerate(_cascade(make_spec(threat.eps, steps))):
        attack_model = adapt_model(model, spec)
        x_adv = torch.cat([craft(attack_model, spec, xb, yb, threat, attack_generator(seed, index, b))
                           for b, (xb, yb) in enumerate(zip(x.split(batch_size), y.split(batch_size)))])
        per_draw.append(torch.stack([handled(predict(model, x_adv, batch_size), y) for _ in range(draws)]))
    rate = torch.stack([h.float().mean(0) for h in per_draw]).min(0).values
    first = torch.stack([h[0] for h in per_draw]).all(0)  # the one draw every run of the audit uses
    gen = torch.Generator().manual_seed(seed)
    boot = torch.randint(0, len(rate), (1000, len(rate)), generator=gen)
    means = rate.cpu()[boot].mean(1)
    return {"eps": threat.eps, "steps": steps, "draws": draws, "n": int(len(rate)),
            "one_draw": Accuracy.from_flags(first.cpu()).to_dict(),
            "expected": float(rate.mean()),
            "expected_interval": [float(means.quantile(0.025)), float(means.quantile(0.975))],
            "majority": Accuracy.from_flags((rate >= 0.5).cpu()).to_dict(),
            "every_draw": Accuracy.from_flags((rate == 1).cpu()).to_dict(),
            "coin_flips": int(((rate > 0.1) & (rate < 0.9)).sum())}


def run_longer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
               make_spec: SpecFactory, steps: int, *, factor: int = 10, seed: int = 0,
               batch_size: int = 500) -> tuple[Accuracy, Accuracy, int, int]:
    """``compare_longer`` of ``longer_records``."""
    return compare_longer(*longer_records(model, x, y, threat, make_spec, steps, factor=factor,
                                          seed=seed, batch_size=batch_size))
