"""A classifier reachable only through its answers: ``QueryOnly``.

Many classifiers worth protecting are a remote endpoint, a compiled binary or a vendor model:
the defender can send images and read back probabilities (often rounded) or only a label, a
limited number of times, and never sees a gradient. ``QueryOnly`` puts a model behind exactly
that interface, so that the code training a shield for it (``defenses.aaa`` with a
``query_method``) is shown to use nothing else:

- it answers a batch of images with probabilities (``output="probs"``, rounded to ``decimals``
  if given) or with labels (``output="label"``), and counts every image as one query;
- past ``budget`` queries it refuses the whole batch (``QueryBudgetError``) before running it;
- the wrapped model is not a registered submodule (``parameters()`` is empty, a state dict does
  not contain it), and a backward pass that reaches an answer raises ``QueryGradientError``
  instead of flowing into the model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AeshieldError, ConfigError

OUTPUTS = ("probs", "label")


class QueryBudgetError(AeshieldError, RuntimeError):
    """The query budget of a ``QueryOnly`` classifier is spent."""


class QueryGradientError(AeshieldError, RuntimeError):
    """A gradient was asked of a ``QueryOnly`` classifier."""


class _NoGradient(torch.autograd.Function):
    """The identity on a query's answer, whose backward refuses: a loss built on answers can
    be computed, but a gradient that would have to pass through the classifier cannot."""

    @staticmethod
    def forward(ctx, answer: torch.Tensor, _input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return answer.clone()

    @staticmethod
    def backward(ctx, *_grads):  # type: ignore[override]
        raise QueryGradientError(
            "a gradient reached a QueryOnly classifier, which only answers queries; estimate it "
            "from queries (aeshield.attacks.estimate.EstimatedGradient) or train through a "
            "distilled surrogate (AAAConfig(query_method='nes' | 'spsa' | 'surrogate'))")


class QueryOnly(nn.Module):
    """``model`` behind a query interface (see the module docstring).

    Args:
        model: any classifier from images to logits; it is put in eval mode.
        output: ``"probs"`` (softmax probabilities, ``(N, K)`` floats) or ``"label"`` (the
            predicted class, ``(N,)`` int64).
        budget: the most images it will answer in all (``None``: unlimited).
        decimals: round the probabilities to this many decimals, as real endpoints do.

    ``queries`` counts the images answered so far; ``state_dict`` keeps it (a resumed run
    continues the count).
    """

    def __init__(self, model: nn.Module, output: str = "probs", budget: int | None = None,
                 decimals: int | None = None) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ConfigError(f"QueryOnly output must be one of {OUTPUTS}, got {output!r}")
        if budget is not None and budget < 0:
            raise ConfigError(f"QueryOnly budget must be a number of queries >= 0 (or None), got {budget}")
        if decimals is not None and (output != "probs" or decimals < 0):
            raise ConfigError("QueryOnly decimals rounds probabilities: give it with output='probs', >= 0")
        # Not a submodule: parameters(), state_dict() and .to() of the wrapper must not reach it.
        object.__setattr__(self, "_model", model.eval())
        self.output, self.budget, self.decimals = output, budget, decimals
        self.register_buffer("queries", torch.zeros((), dtype=torch.long))

    @property
    def spent(self) -> int:
        return int(self.queries)

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.spent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        if self.budget is not None and self.spent + n > self.budget:
            raise QueryBudgetError(
                f"the query budget is spent: {self.spent:,} of {self.budget:,} images answered, "
                f"{n:,} more asked; raise the budget or ask fewer (smaller data or query settings)")
        model = self._model
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(x.detach())
        finally:
            model.train(training)
        self.queries += n
        if self.output == "label":
            return logits.argmax(1)
        probs = logits.float().softmax(1).to(logits.dtype)
        if self.decimals is not None:
            probs = torch.round(probs, decimals=self.decimals)
        if x.requires_grad and torch.is_grad_enabled():
            return _NoGradient.apply(probs, x)
        return probs

    def extra_repr(self) -> str:
        return (f"output={self.output!r}, budget={self.budget}, decimals={self.decimals}, "
                f"model={type(self._model).__name__}")


def log_probs(answer: torch.Tensor, floor: float = 1e-12) -> torch.Tensor:
    """Log-probabilities from a ``"probs"`` answer, usable as logits (softmax gives the answer
    back, cross-entropy on them is the cross-entropy of the answer); rounded zeros are floored."""
    return answer.clamp_min(floor).log()


__all__ = ["OUTPUTS", "QueryBudgetError", "QueryGradientError", "QueryOnly", "log_probs"]
