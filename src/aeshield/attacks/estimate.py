"""Gradients estimated from queries: NES and SPSA with antithetic samples.

For a function ``f`` of an input ``x`` that can only be evaluated, both estimators average
finite differences along random directions ``u``::

    g(x) ~ 1/q * sum_i (f(x + sigma u_i) - f(x - sigma u_i)) / (2 sigma) * u_i

NES (Wierstra et al. 2014, as used by Ilyas et al. 2018, "Black-box adversarial attacks with
limited queries and information") draws ``u`` from a standard normal; SPSA (Spall 1992, as used
by Uesato et al. 2018, "Adversarial risk and the dangers of evaluating against weak attacks")
from Rademacher signs. Each estimate costs ``2 * samples`` evaluations of ``f`` per example,
all sent as one batch (chunked by ``chunk`` rows).

``EstimatedGradient`` turns a ``QueryOnly`` classifier into a differentiable one: its forward
is the answer's log-probabilities (one query per image), its backward estimates the
vector-Jacobian product from ``2 * samples`` more queries per image. Anything built on autograd
then runs unchanged on estimated gradients: a PGD step through it is the NES attack, and AAA's
shield update through it is the paper's proposed query-only training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..models.query import QueryOnly, log_probs

METHODS = ("nes", "spsa")


def directions(shape: tuple[int, ...], method: str, generator: torch.Generator | None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random directions of ``shape``: standard normal (NES) or Rademacher signs (SPSA)."""
    if method == "nes":
        return torch.randn(shape, generator=generator, dtype=dtype).to(device)
    if method == "spsa":
        return (torch.randint(0, 2, shape, generator=generator).to(dtype) * 2 - 1).to(device)
    raise ConfigError(f"unknown gradient estimator {method!r}; use one of {METHODS}")


def estimate_gradient(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, samples: int,
                      sigma: float, method: str = "nes", generator: torch.Generator | None = None,
                      weights: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """The antithetic estimate of the gradient of ``f`` at each example of ``x``.

    ``f`` maps a batch ``(M, ...)`` to one value per example ``(M,)``, or to a vector per
    example ``(M, K)`` with ``weights`` ``(N, K)``: then the estimate is of the gradient of
    ``weights[i] . f(x[i])``, the vector-Jacobian product that backpropagation needs. ``f`` is
    called on ``x + sigma u`` and ``x - sigma u`` for ``samples`` directions per example
    (``2 * samples * N`` rows in all, at most ``chunk`` rows per call), the directions drawn
    from ``generator``.
    """
    if samples < 1 or not sigma > 0:
        raise ConfigError(f"a gradient estimate needs samples >= 1 and sigma > 0, got {samples}, {sigma}")
    n, rest = x.shape[0], tuple(x.shape[1:])
    u = directions((samples, n, *rest), method, generator, x.device, x.dtype)
    probes = torch.cat([x.unsqueeze(0) + sigma * u, x.unsqueeze(0) - sigma * u]).reshape(-1, *rest)
    with torch.no_grad():
        values = torch.cat([f(part) for part in probes.split(chunk)])
    if weights is not None:
        values = (values.reshape(2, samples, n, -1) * weights).sum(-1)
    values = values.reshape(2, samples, n)
    slopes = (values[0] - values[1]) / (2 * sigma)  # (samples, n)
    return (slopes.reshape(samples, n, *([1] * len(rest))) * u).mean(0)


class _Estimated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "EstimatedGradient") -> torch.Tensor:  # type: ignore[override]
        ctx.module = module
        ctx.save_for_backward(x)
        with torch.no_grad():
            return log_probs(module.classifier(x))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return ctx.module.vjp(x.detach(), grad_output.detach()), None


class EstimatedGradient(nn.Module):
    """A ``QueryOnly`` classifier (``output="probs"``) made differentiable by estimated
    gradients (see the module docstring).

    Args:
        classifier: the query-only classifier; every query is counted by it.
        samples: antithetic direction pairs per estimate (``2 * samples`` queries per image).
        sigma: the finite-difference radius, in pixel units.
        method: ``"nes"`` or ``"spsa"``.
        seed: seeds the directions; ``state_dict`` keeps the generator's state, so a resumed
            run draws what an uninterrupted one would.
    """

    def __init__(self, classifier: QueryOnly, samples: int = 10, sigma: float = 0.01,
                 method: str = "nes", seed: int = 0) -> None:
        super().__init__()
        if not isinstance(classifier, QueryOnly):
            raise ConfigError("EstimatedGradient wraps a QueryOnly classifier")
        if classifier.output != "probs":
            raise ConfigError("gradient estimation needs probabilities: a QueryOnly classifier with "
                              "output='label' gives a loss that is flat almost everywhere; use "
                              "query_method='surrogate' for label-only classifiers")
        if method not in METHODS:
            raise ConfigError(f"unknown gradient estimator {method!r}; use one of {METHODS}")
        if samples < 1 or not sigma > 0:
            raise ConfigError(f"EstimatedGradient needs samples >= 1 and sigma > 0, got {samples}, {sigma}")
        self.classifier = classifier
        self.samples, self.sigma, self.method = samples, sigma, method
        self.generator = torch.Generator().manual_seed(seed)

    def vjp(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The estimated gradient of ``weights . log p(x)`` per example (``weights``: ``(N, K)``)."""
        return estimate_gradient(lambda probes: log_probs(self.classifier(probes)), x, samples=self.samples,
                                 sigma=self.sigma, method=self.method, generator=self.generator,
                                 weights=weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return _Estimated.apply(x, self)
        return log_probs(self.classifier(x))

    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


__all__ = ["METHODS", "EstimatedGradient", "directions", "estimate_gradient"]
