"""Confidence intervals: accuracies (Wilson) and ratios of paired means (bootstrap)."""

from __future__ import annotations

import math

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
