"""Confidence intervals: accuracies (Wilson), paired accuracy differences (Newcombe), means
(normal) and ratios of paired means (bootstrap)."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    # Inverse normal CDF by bisection on erf: no SciPy needed for one number.
    target = 1 - (1 - confidence) / 2
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < target:
            lo = mid
        else:
            hi = mid
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
    phi = (both * neither - only_first * only_second) / math.sqrt(margins) if margins else 0.0
    diff = p1 - p2
    lo = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {"difference": diff, "ci95": [max(-1.0, lo), min(1.0, hi)], "n": n,
            "discordant": [only_first, only_second],
            "ci_method": "Newcombe paired score interval (method 10)"}


def mean_interval(values: Sequence[float] | torch.Tensor, confidence_z: float = 1.96) -> dict:
    """Mean, standard deviation and a normal-approximation 95% interval of the mean."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = float(v.mean())
    std = float(v.std()) if n > 1 else 0.0
    half = confidence_z * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "n": n, "ci95": [mean - half, mean + half],
            "ci_method": "normal approximation, mean +- 1.96 sd / sqrt(n)"}
