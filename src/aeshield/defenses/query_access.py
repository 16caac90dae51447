"""Training a shield for a classifier reachable only through queries (issue 28).

AAA needs the gradient of its loss through the classifier twice per step: for the adversary's
step and for the shield's update. For a ``models.query.QueryOnly`` classifier,
``QuerySettings.query_method`` chooses where it comes from:

- ``"nes"`` / ``"spsa"``: estimated from queries (``attacks.estimate.EstimatedGradient``),
  ``2 * query_samples`` queries per image per estimate, inside the usual saddle point. The
  shield G stays white-box to its trainer, so only the classifier's part of the chain is
  estimated, at G's output, and autograd carries it through G.
- ``"surrogate"``: a local model (``surrogate``, a model-zoo name) is first distilled from the
  classifier's answers on the training images (one query each), then AAA trains end to end
  through it while it is refreshed: every ``surrogate_refresh`` steps the classifier is asked
  about the reconstructions G produced from the step's adversarial images (the inputs the
  classifier sees behind the shield, where the surrogate's gradients are used), and the
  surrogate takes one step on those answers and an equal replay of training answers. Works
  with probabilities (soft cross-entropy) and with labels only (cross-entropy).

Classifiers that are not ``QueryOnly`` stay white-box, so native and query-only classifiers
can be mixed in one ensemble. Every query is counted by its ``QueryOnly``; the trainer reports
the total in its history and result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.estimate import METHODS as ESTIMATORS
from ..attacks.estimate import EstimatedGradient
from ..errors import ConfigError
from ..models.query import QueryOnly
from ..records import added_later

logger = logging.getLogger(__name__)

QUERY_METHODS = (*ESTIMATORS, "surrogate")


@dataclass(frozen=True, kw_only=True)
class QuerySettings:
    """How a trainer reaches ``QueryOnly`` classifiers (inherited by ``AAAConfig``; keyword-only
    and ``records.added_later``, so configs without them read and hash as before).

    - ``query_method``: None (every classifier must be white-box), "nes", "spsa" or "surrogate";
    - ``query_samples``, ``query_sigma``: antithetic pairs per estimate and the finite-difference
      radius (pixels) of "nes"/"spsa";
    - ``surrogate``: the model-zoo architecture of "surrogate"'s local model;
      ``surrogate_epochs``, ``surrogate_lr``: its distillation on the training images' answers;
      ``surrogate_refresh``: query the reconstructions every this many steps (0: never).
    """

    query_method: str | None = added_later(None)
    query_samples: int = added_later(10)
    query_sigma: float = added_later(0.01)
    surrogate: str | None = added_later(None)
    surrogate_epochs: int = added_later(2)
    surrogate_lr: float = added_later(1e-3)
    surrogate_refresh: int = added_later(1)


def check_query(config) -> None:
    """The query settings of a trainer's config; called from its ``__post_init__``."""
    name = type(config).__name__
    if config.query_method is None:
        return
    if config.query_method not in QUERY_METHODS:
        raise ConfigError(f"{name}: unknown query_method {config.query_method!r}; use one of {QUERY_METHODS}")
    if config.query_method == "surrogate":
        if not config.surrogate:
            raise ConfigError(f"{name}: query_method 'surrogate' needs surrogate=<model-zoo name>, the "
                              "architecture of the local model (aeshield models lists them)")
        if config.surrogate_epochs < 0 or config.surrogate_refresh < 0 or not config.surrogate_lr > 0:
            raise ConfigError(f"{name}: surrogate_epochs and surrogate_refresh must be >= 0 and "
                              "surrogate_lr > 0")
    elif config.query_samples < 1 or not config.query_sigma > 0:
        raise ConfigError(f"{name}: query_samples must be >= 1 and query_sigma > 0")


def answer_loss(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """The surrogate's distillation loss: soft cross-entropy to probabilities, or cross-entropy
    to labels."""
    if answer.dtype == torch.long:
        return F.cross_entropy(logits, answer)
    return -(answer * logits.log_softmax(1)).sum(1).mean()


class DistilledSurrogate(nn.Module):
    """A local ``model`` fitted to a ``QueryOnly`` classifier's answers (see the module
    docstring); its forward is the local model's logits, differentiable.

    ``fit`` distills on training images (one query each; the answers are kept for replay),
    ``observe_later`` queues images to ask about, and ``settle`` asks and takes one step (the
    trainer calls it before a step's forward, never between a forward and its backward).
    """

    def __init__(self, target: QueryOnly, model: nn.Module, *, lr: float = 1e-3, refresh: int = 1,
                 seed: int = 0) -> None:
        super().__init__()
        self.target = target
        self.model = model
        self.refresh = refresh
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.images: torch.Tensor | None = None  # the distillation set and its answers, for replay
        self.answers: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _update(self, x: torch.Tensor, answer: torch.Tensor) -> float:
        flags = [p.requires_grad for p in self.model.parameters()]
        training = self.model.training
        self.model.train()
        self.model.requires_grad_(True)
        try:
            with torch.enable_grad():
                loss = answer_loss(self.model(x), answer)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        finally:
            self.model.train(training)
            for p, flag in zip(self.model.parameters(), flags):
                p.requires_grad_(flag)
        return float(loss.detach())

    def fit(self, x: torch.Tensor, *, epochs: int, batch_size: int) -> dict:
        """Ask the classifier about every image of ``x`` once, then ``epochs`` epochs on the answers."""
        self.images = x
        self.answers = torch.cat([self.target(part) for part in x.split(1024)])
        with torch.no_grad():
            classes = int(self.model.eval()(x[:1]).shape[1])
        answered = int(self.answers.max()) + 1 if self.answers.dtype == torch.long else self.answers.shape[1]
        if answered > classes:
            raise ConfigError(f"the surrogate has {classes} outputs but the classifier answers "
                              f"{answered} classes; choose a surrogate architecture with {answered}")
        loss = float("nan")
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=self.generator).to(x.device)
            for idx in order.split(batch_size):
                loss = self._update(x[idx], self.answers[idx])
        self.model.eval()
        return {"surrogate_fit_loss": loss, "surrogate_agreement": self.agreement(x[:2048], self.answers[:2048])}

    @torch.no_grad()
    def agreement(self, x: torch.Tensor, answers: torch.Tensor) -> float:
        """How often the surrogate's label is the classifier's on ``x`` (answers already paid for)."""
        labels = answers if answers.dtype == torch.long else answers.argmax(1)
        training = self.model.training
        self.model.eval()
        try:
            return float((self.model(x).argmax(1) == labels).float().mean())
        finally:
            self.model.train(training)

    def observe_later(self, x: torch.Tensor) -> None:
        """Queue ``x`` (e.g. a step's reconstructions) for the next ``settle``, every
        ``refresh``-th call."""
        self.calls += 1
        if self.refresh and self.calls % self.refresh == 0:
            self._pending = x.detach()

    def settle(self) -> None:
        """Ask about the queued images and take one step on them and an equal training replay."""
        if self._pending is None:
            return
        x, self._pending = self._pending, None
        answer = self.target(x)
        if self.images is not None and self.answers is not None:
            idx = torch.randint(self.images.shape[0], (x.shape[0],), generator=self.generator).to(x.device)
            x = torch.cat([x, self.images[idx]])
            answer = torch.cat([answer, self.answers[idx]])
        self._update(x, answer)
        self.model.eval()

    def checkpoint_state(self) -> dict:
        self.settle()
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "generator": self.generator.get_state(), "calls": torch.tensor(self.calls),
                 "queries": self.target.queries.clone()}
        if self.answers is not None:
            state["answers"] = self.answers
        return state

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.calls = int(state["calls"])
        self.target.queries.copy_(state["queries"])
        if "answers" in state:
            self.answers = state["answers"]
        self._pending = None


class QueryAccess:
    """The classifiers a trainer uses in place of the ones it was given (``QueryOnly`` ones
    replaced per ``query_method``) and the state to checkpoint with them."""

    def __init__(self, given: Sequence[nn.Module], used: Sequence[nn.Module]) -> None:
        self.given, self.used = list(given), list(used)

    @property
    def queries(self) -> int:
        return sum(c.spent for c in self.given if isinstance(c, QueryOnly))

    def settle(self) -> None:
        for c in self.used:
            if isinstance(c, DistilledSurrogate):
                c.settle()

    def after_step(self, classifier: nn.Module, reconstruction: torch.Tensor) -> None:
        if isinstance(classifier, DistilledSurrogate):
            classifier.observe_later(reconstruction)

    def report(self) -> dict:
        return {"queries": float(self.queries)}

    @property
    def any_query_only(self) -> bool:
        return any(isinstance(c, QueryOnly) for c in self.given)

    def state_dict(self) -> dict:
        state: dict = {}
        for k, u in enumerate(self.used):
            if isinstance(u, DistilledSurrogate):
                state[f"surrogate_{k}"] = u.checkpoint_state()
            elif isinstance(u, EstimatedGradient):  # its generator and its classifier's query count
                state[f"estimator_{k}"] = u.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        for k, u in enumerate(self.used):
            if isinstance(u, DistilledSurrogate) and f"surrogate_{k}" in state:
                u.restore(state[f"surrogate_{k}"])
            elif isinstance(u, EstimatedGradient) and f"estimator_{k}" in state:
                u.load_state_dict(state[f"estimator_{k}"])


def query_access(classifiers: Sequence[nn.Module], config, x: torch.Tensor, *, fit: bool) -> QueryAccess:
    """Replace each ``QueryOnly`` classifier per ``config.query_method``; ``fit`` distills the
    surrogates now (False when a checkpoint will restore them)."""
    used: list[nn.Module] = []
    for k, classifier in enumerate(classifiers):
        if not isinstance(classifier, QueryOnly):
            used.append(classifier)
            continue
        method = config.query_method
        if method is None:
            raise ConfigError("a QueryOnly classifier gives no gradients: set query_method to 'nes', "
                              "'spsa' (gradients estimated from queries) or 'surrogate' (a distilled "
                              "local model)")
        if method in ESTIMATORS:
            used.append(EstimatedGradient(classifier, samples=config.query_samples, sigma=config.query_sigma,
                                          method=method, seed=config.seed + 100 + k))
            continue
        from ..models import create_model

        torch.manual_seed(config.seed + 200 + k)
        local = create_model(config.surrogate, tuple(x.shape[1:])).to(x.device)
        surrogate = DistilledSurrogate(classifier, local, lr=config.surrogate_lr, refresh=config.surrogate_refresh,
                                       seed=config.seed + 300 + k)
        if fit:
            before = classifier.spent
            stats = surrogate.fit(x, epochs=config.surrogate_epochs, batch_size=config.batch_size)
            logger.info("surrogate %s distilled from classifier %d on %d queries: agreement %.3f on "
                        "training images", config.surrogate, k, classifier.spent - before,
                        stats["surrogate_agreement"])
        used.append(surrogate)
    return QueryAccess(classifiers, used)


__all__ = ["QUERY_METHODS", "DistilledSurrogate", "QueryAccess", "QuerySettings", "answer_loss",
           "check_query", "query_access"]
