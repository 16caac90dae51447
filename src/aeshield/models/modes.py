"""Train/eval modes: what an attack or an evaluation may change in a model, and what it must
give back.

Attacks and the audit only ever read a model. ``preserved_modes`` restores every submodule's
``training`` flag on exit, so a BatchNorm layer's running statistics cannot be moved by a
wrapper that switches modes (torchattacks restores the mode it found; a ``Shielded`` built
from loaded, eval-mode parts therefore starts in eval mode too).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block, then put every submodule of ``model`` back in the mode it had."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, each submodule's mode restored afterwards."""
    with preserved_modes(model):
        model.eval()
        yield model


def frozen_for_use(model: nn.Module) -> nn.Module:
    """``model`` ready to be used, not trained: eval mode, parameters without gradients."""
    model.eval()
    model.requires_grad_(False)
    return model
