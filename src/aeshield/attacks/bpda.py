"""Backward Pass Differentiable Approximation (Athalye, Carlini and Wagner 2018).

``BPDA(component)`` behaves exactly like ``component`` in the forward pass, and in the
backward pass like ``surrogate`` (the identity by default). Wrap a non-differentiable or
gradient-masking component (quantization, an arg-min selection, a purifier whose gradient
vanishes) and every attack can go through it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class BPDA(nn.Module):
    def __init__(self, component: nn.Module | Callable[[torch.Tensor], torch.Tensor],
                 surrogate: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.component = component
        self.surrogate = surrogate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.component(x)
        if not torch.is_grad_enabled() or not x.requires_grad:
            return out
        approx = x if self.surrogate is None else self.surrogate(x)
        if approx.shape != out.shape:
            raise ValueError(f"BPDA surrogate output {tuple(approx.shape)} does not match the "
                             f"component's {tuple(out.shape)}")
        # (approx - approx.detach()) is exactly zero forward, so the value is exactly `out`,
        # while the gradient is the surrogate's.
        return out + (approx - approx.detach())
