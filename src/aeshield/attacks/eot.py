"""Expectation over Transformation (Athalye et al. 2018) as a model wrapper.

``EOT(model, samples=n)`` evaluates a random ``model`` on ``n`` draws in one batched pass and
returns the mean of the per-draw log-probabilities. The cross-entropy of that mean is the
mean cross-entropy over draws up to a normalizing term, so an attack on the wrapper follows the
expected gradient instead of the gradient of one random draw.
"""

from __future__ import annotations

import torch
from torch import nn


class EOT(nn.Module):
    def __init__(self, model: nn.Module, samples: int = 8) -> None:
        super().__init__()
        if samples < 1:
            raise ValueError(f"EOT needs samples >= 1, got {samples}")
        self.model = model
        self.samples = samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        batch = x.repeat(self.samples, *([1] * (x.dim() - 1)))
        logp = torch.log_softmax(self.model(batch), dim=1)
        return logp.view(self.samples, n, -1).mean(0)
