"""AUDDC: area under the distortion-distance curve (Gondim-Ribeiro, Tabacof and Valle 2018).

For one (original, target) pair attacked at many trade-off constants, each run gives a point
``(x, y)``: ``x`` the normalized distortion ``||delta|| / ||x - x_t||`` and ``y`` the
normalized distance between the adversarial reconstruction and the target's. The curve is the
attacker's best distance at each distortion budget (the running minimum of ``y`` over
increasing ``x``, so an unconverged run at a larger budget cannot raise it), restricted to
``x in [0, 1]``, started at ``(0, y of the smallest distortion)`` and extended to ``x = 1`` at
its lowest ``y``. The area under it lies in [0, 1] when ``y <= 1``; higher means the
autoencoder is harder to steer, i.e. more robust.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def auddc(distortion: Sequence[float] | torch.Tensor, distance: Sequence[float] | torch.Tensor) -> float:
    """Area under one pair's distortion-distance curve (see the module docstring)."""
    x = torch.as_tensor(distortion, dtype=torch.float64).flatten()
    y = torch.as_tensor(distance, dtype=torch.float64).flatten()
    if x.numel() == 0 or x.shape != y.shape:
        raise ValueError(f"need matching, non-empty distortion and distance, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("distortion and distance must be finite")
    order = torch.argsort(x, stable=True)
    x, y = x[order], torch.cummin(y[order], dim=0).values
    keep = x <= 1
    if not keep.any():  # every run needed more distortion than the pair's own distance
        return float(y[0])
    x, y = x[keep], y[keep]
    xs = torch.cat([torch.zeros(1, dtype=x.dtype), x, torch.ones(1, dtype=x.dtype)])
    ys = torch.cat([y[:1], y, y[-1:]])
    return float(torch.trapezoid(ys, xs))


def auddc_batch(distortion: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """AUDDC of every pair: rows of (P, M) tensors -> (P,)."""
    return torch.tensor([auddc(d, s) for d, s in zip(distortion, distance)])

