"""Confidence intervals: accuracies (Wilson), paired accuracy differences (Newcombe), means
(Student t) and ratios of paired means (bootstrap)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import torch


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved at 0 and 1, unlike Wald)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    z = _z_value(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def _z_value(confidence: float) -> float:
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), on the side where it converges fast."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _regularized_beta(1 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - (
        math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction


def t_quantile(probability: float, df: int) -> float:
    """The Student t distribution's quantile (no SciPy needed for one number): bisection on
    its CDF, ``1 - I_{df / (df + t^2)}(df / 2, 1 / 2) / 2`` for t > 0."""
    if not 0.5 <= probability < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= probability < 1 and df >= 1, got {probability}, {df}")

    def cdf(t: float) -> float:
        return 1 - 0.5 * _regularized_beta(df / (df + t * t), df / 2, 0.5)

    lo, hi = 0.0, 1.0
    while cdf(hi) < probability:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if cdf(mid) < probability:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * hi:
            break
    return (lo + hi) / 2


def paired_ratio_interval(numerator: torch.Tensor, denominator: torch.Tensor, resamples: int = 2000,
                          seed: int = 0) -> dict:
    """``mean(numerator) / mean(denominator)`` over the same examples, with a 95% percentile
    bootstrap interval that resamples examples (both means from one resample, so the pairing
    is kept: two models measured on the same images vary together)."""
    a = torch.as_tensor(numerator, dtype=torch.float64).flatten()
    b = torch.as_tensor(denominator, dtype=torch.float64).flatten()
    if a.numel() != b.numel() or a.numel() == 0:
        raise ValueError(f"paired_ratio_interval needs two equally long, non-empty samples, got "
                         f"{a.numel()} and {b.numel()}")
    if b.mean() == 0:
        raise ValueError("paired_ratio_interval: the denominator's mean is 0, the ratio is undefined")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.numel(), (resamples, a.numel()), generator=gen)
    ratios = a[idx].mean(1) / b[idx].mean(1)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"ratio": float(a.mean() / b.mean()), "ci95": [lo, hi], "n": a.numel(),
            "ci_method": f"percentile bootstrap over paired examples, {resamples} resamples"}


def paired_difference_interval(first: torch.Tensor, second: torch.Tensor,
                               confidence: float = 0.95) -> dict:
    """``accuracy(first) - accuracy(second)`` for two models' correct/incorrect flags on the
    same examples, with Newcombe's score interval for paired proportions (his method 10:
    Wilson intervals of both margins, combined with the pairs' correlation). Paired, so two
    models that err on the same hard images get the narrow interval they deserve."""
    a = torch.as_tensor(first).flatten().bool()
    b = torch.as_tensor(second).flatten().bool()
    if a.numel() != b.numel() or a.numel() == 0:
        raise ValueError(f"paired_difference_interval needs two equally long, non-empty flag "
                         f"vectors, got {a.numel()} and {b.numel()}")
    n = a.numel()
    both, only_first = int((a & b).sum()), int((a & ~b).sum())
    only_second, neither = int((~a & b).sum()), int((~a & ~b).sum())
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    l1, u1 = wilson_interval(both + only_first, n, confidence)
    l2, u2 = wilson_interval(both + only_second, n, confidence)
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    # Newcombe's correlation estimate: AD - BC, shrunk by N/2 towards 0 when positive (and 0
    # inside that band), as his method 10 and its worked examples use it.
    association = both * neither - only_first * only_second
    if association > n / 2:
        association -= n / 2
    elif association >= 0:
        association = 0
    phi = association / math.sqrt(margins) if margins else 0.0
    diff = p1 - p2
    lo = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {"difference": diff, "ci95": [max(-1.0, lo), min(1.0, hi)], "n": n,
            "discordant": [only_first, only_second],
            "ci_method": "Newcombe paired score interval (method 10)"}


def mean_interval(values: Sequence[float] | torch.Tensor, confidence: float = 0.95) -> dict:
    """Mean, standard deviation and the Student t interval of the mean (``n - 1`` degrees of
    freedom: honest for a few seeds, and the normal interval's twin for many values)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    return mean_interval_from_summary(float(v.mean()), float(v.std()) if n > 1 else 0.0, n, confidence)


def mean_interval_from_summary(mean: float, std: float, n: int, confidence: float = 0.95) -> dict:
    """``mean_interval`` of ``n`` values with this mean and (n - 1) standard deviation."""
    half = t_quantile(1 - (1 - confidence) / 2, n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "n": n, "ci95": [mean - half, mean + half],
            "ci_method": f"Student t, mean +- t({1 - (1 - confidence) / 2:g}, n-1) sd / sqrt(n)"}


# What ``mean_interval`` stored before 2026-12-04 (commit 2515016): too narrow over few values.
NORMAL_MEAN_INTERVAL = "normal approximation, mean +- 1.96 sd / sqrt(n)"


def restate_mean_intervals(record: Any) -> tuple[Any, int]:
    """``record`` (stored JSON) with every 95% mean interval of the normal approximation
    restated as ``mean_interval`` states it now, from its own mean, sd and n (exactly what
    recomputing from the values would give), and how many it restated."""
    if isinstance(record, dict):
        if record.get("ci_method") == NORMAL_MEAN_INTERVAL and {"mean", "std", "n"} <= record.keys():
            restated = mean_interval_from_summary(float(record["mean"]), float(record["std"]), int(record["n"]))
            return {**record, **restated}, 1
        count, out = 0, {}
        for key, value in record.items():
            out[key], k = restate_mean_intervals(value)
            count += k
        return out, count
    if isinstance(record, list):
        items = [restate_mean_intervals(v) for v in record]
        return [v for v, _ in items], sum(k for _, k in items)
    return record, 0
