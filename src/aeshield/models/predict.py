"""Labels from any model, and the label that means "rejected"."""

from __future__ import annotations

import torch
from torch import nn

REJECT = -1  # the label a pipeline with a detector answers for an input it refuses


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Labels from any model: its own ``predict`` (which may reject) or the logits' arg-max."""
    from ..inputs import check_count, checked_logits, validate_images

    check_count("batch_size", batch_size)
    if hasattr(model, "predict"):
        return model.predict(x, batch_size=batch_size)
    validate_images(x)
    labels = [checked_logits(model, batch).argmax(1) for batch in x.split(batch_size)]
    return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=x.device)
