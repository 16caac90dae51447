"""AAA: adversarially trained autoencoder augmentation.

Vaishnavi, Eykholt, Prakash and Rahmati, "Towards Model-Agnostic Adversarial Defenses using
Adversarially Trained Autoencoders". A denoising autoencoder ``G`` is placed in front of one or
more frozen, naturally trained classifiers ``F_k`` and trained on the saddle point

    min_G  E[ max_{||delta||_inf <= eps}  L(F_k(G(x + delta)), y) ]

where the inner maximization is L-inf PGD on ``CE(F_k(G(x + delta)), y)``, run end to end, and
the outer loss is one of ``xent`` (CE), ``mse`` (per-image sum of squared errors to the clean
input, averaged over the batch) or ``xent+mse`` (CE + lambda * mse). With several classifiers
(ensemble training) each step draws one ``F_k`` at random. Threat model of the result:
white-box L-inf against the whole pipeline ``F(G(.))``. ``schedule`` "fast", "nfgsm" or "free"
replaces the inner PGD by FGSM from a random start or from a larger noise, or by minibatch
replay (``defenses.schedules``); the model they update is G, the adversary still attacks
``F_k(G(.))`` end to end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..attacks.gradient import pgd_train
from ..errors import ConfigError
from ..threat import ThreatModel
from ..inputs import check_training_config
from ..models.query import QueryOnly
from ..records import config_dict
from ..train.loop import LoopConfig, LoopResult, fit
from .adversarial_training import cosine_lr, total_updates
from .base import AutoencoderPurifier, Shielded
from .registry import Defense, Trained, pick, seeded_build
from .query_access import QuerySettings, check_query, query_access
from .schedules import (ScheduleSettings, check_schedule, combine, craft, schedule_state, single_step,
                        updates_per_batch, warn_if_never_robust)

logger = logging.getLogger(__name__)

LOSS_VARIANTS = ("xent", "mse", "xent+mse")


@dataclass(frozen=True)
class AAAConfig(ScheduleSettings, QuerySettings):
    """Settings of one AAA training run (paper defaults for MNIST, CPU-sized epochs); the
    attack schedule's keyword-only settings (``schedule``, ``replays``, ``fgsm_step_factor``,
    ``guard_*``) come from ``schedules.ScheduleSettings``, those for query-only classifiers
    (``query_method``, ``query_*``, ``surrogate*``) from ``query_access.QuerySettings``."""

    loss: str = "xent+mse"
    # lambda weighs the per-image sum of squared errors (about 5-20 on MNIST) against the
    # cross-entropy (about 0.1-2): 0.01 keeps both terms of the same order.
    lam: float = 0.01
    eps: float = 0.3
    step_size: float = 0.01
    attack_steps: int = 40
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    plateau_patience: int = 5
    early_stop_patience: int | None = None
    warmup_steps: int = 100  # clean reconstruction steps that start G near the identity
    val_attack_steps: int = 10
    checkpoint_every: int = 50
    # "eval": craft x_adv with G's BatchNorm running statistics (they do not move during the
    # attack); "train": craft with batch statistics, exactly the function that is then updated.
    craft_mode: str = "eval"
    # Half-cosine lr annealing to 0 over the run (replaces the plateau schedule, which never
    # fires on a few-epoch CPU budget).
    cosine_lr: bool = False

    def __post_init__(self) -> None:
        check_training_config(self)
        check_schedule(self)
        check_query(self)
        if self.loss not in LOSS_VARIANTS:
            raise ValueError(f"unknown AAA loss {self.loss!r}; use one of {LOSS_VARIANTS}")
        if self.craft_mode not in ("eval", "train"):
            raise ValueError(f"craft_mode must be 'eval' or 'train', got {self.craft_mode!r}")


@contextmanager
def frozen(*modules: nn.Module):
    """Eval mode and no parameter gradients for the duration; restores both afterwards."""
    saved = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in modules]
    try:
        for m in modules:
            m.eval()
            m.requires_grad_(False)
        yield
    finally:
        for m, training, flags in saved:
            m.train(training)
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)


def aaa_loss(kind: str, logits: torch.Tensor, y: torch.Tensor, reconstruction: torch.Tensor,
             clean: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict]:
    xent = F.cross_entropy(logits, y)
    mse = (reconstruction - clean).pow(2).flatten(1).sum(1).mean()
    total = {"xent": xent, "mse": mse, "xent+mse": xent + lam * mse}[kind]
    return total, {"xent": xent.detach(), "mse": mse.detach()}


class _Visits:
    """The per-classifier step counts, checkpointed with the loop so that a resumed run counts
    the steps before the kill too."""

    def __init__(self, visits: list[int]) -> None:
        self.visits = visits

    def state_dict(self) -> dict:
        return {"visits": torch.tensor(self.visits, dtype=torch.long)}

    def load_state_dict(self, state: dict) -> None:
        self.visits[:] = [int(v) for v in state["visits"]]


@dataclass
class AAAResult:
    config: dict
    history: list[dict] = field(default_factory=list)
    visits: list[int] = field(default_factory=list)  # training steps per classifier
    loop: LoopResult | None = None
    queries: int = 0  # images sent to the QueryOnly classifiers, distillation included


def train_aaa(autoencoder: nn.Module, classifiers: list[nn.Module], x: torch.Tensor,
              y: torch.Tensor, config: AAAConfig, *, x_val: torch.Tensor | None = None,
              y_val: torch.Tensor | None = None, checkpoint: str | Path | None = None,
              progress: bool = True) -> AAAResult:
    """Train ``autoencoder`` in front of the frozen ``classifiers`` (updated in place).

    The classifiers stay in eval mode with ``requires_grad`` off for the whole run, so their
    weights, BatchNorm statistics and dropout never change; only G's parameters are optimized.
    A ``models.query.QueryOnly`` classifier is reached through ``config.query_method``
    (``defenses.query_access``); the queries it answered are in ``result.queries`` and in each
    epoch's history.
    """
    if not classifiers:
        raise ValueError("AAA needs at least one classifier to train against")
    resuming = bool(checkpoint and Path(checkpoint).exists())
    access = query_access(classifiers, config, x, fit=not resuming)
    if access.any_query_only and distributed.world().distributed:
        raise ConfigError("query-only AAA runs on one process: each rank would refresh its own surrogate "
                          "from its own queries; start it without torchrun")
    classifiers = access.used
    threat = ThreatModel("Linf", config.eps)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=config.lr)
    visits = [0] * len(classifiers)
    result = AAAResult(config=config_dict(config), visits=visits)

    with frozen(*classifiers):
        if config.warmup_steps and not resuming:
            _warmup(autoencoder, optimizer, x, config)

        total = total_updates(x.shape[0], config.batch_size, config.epochs) * updates_per_batch(config)
        free, guard = schedule_state(config, lambda: [Shielded(autoencoder.eval(), c) for c in classifiers],
                                     {"autoencoder": autoencoder}, optimizer, x, y, x_val, y_val)

        def set_lr() -> None:
            if config.cosine_lr:
                # The warm-up's updates are in the optimizer's count (also after a resume,
                # which restores that count), so the schedule starts after them.
                cosine_lr(optimizer, config.lr, total, offset=config.warmup_steps)

        def outer(x_adv: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor, classifier: nn.Module):
            reconstruction = autoencoder(x_adv)
            logits = classifier(reconstruction)
            loss, metrics = aaa_loss(config.loss, logits, yb, reconstruction, xb, config.lam)
            metrics["adv_acc"] = (logits.argmax(1) == yb).float().mean()
            access.after_step(classifier, reconstruction)
            return loss, metrics

        def step(xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator):
            access.settle()  # a surrogate's refresh, between this step's forward and the last's backward
            if guard is not None:  # before the lr is set: a restore puts back the optimizer's old lr
                guard.tick()
            if free is None:
                set_lr()
            k = int(torch.randint(len(classifiers), (1,), generator=gen))
            visits[k] += 1
            classifier = classifiers[k]
            if free is not None:  # crafts in training mode: one pass gives both gradients
                autoencoder.train()

                def replay_threat() -> ThreatModel:
                    set_lr()
                    return threat
                return free.step(xb, lambda x_adv: outer(x_adv, xb, yb, classifier), optimizer, replay_threat)
            autoencoder.train(config.craft_mode == "train")
            x_adv = craft(Shielded(autoencoder, classifier), xb, yb, schedule=config.schedule, threat=threat,
                          step_size=config.step_size, steps=config.attack_steps,
                          **single_step(config, guard), generator=gen)
            autoencoder.train()
            return outer(x_adv, xb, yb, classifier)

        val_fn: Callable[[], dict] | None = None
        if x_val is not None and y_val is not None:
            def validate() -> dict:
                return validate_aaa(autoencoder, classifiers, x_val, y_val, config)
            val_fn = validate
        extra = {"visits": _Visits(visits), **{k: v for k, v in (("free", free), ("guard", guard)) if v is not None}}
        if access.any_query_only:
            extra["query_access"] = access
        if guard is not None and not resuming:
            guard.baseline()

        loop = LoopConfig(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                          checkpoint_every=config.checkpoint_every,
                          plateau_patience=config.plateau_patience,
                          early_stop_patience=config.early_stop_patience,
                          val_metric="val_adv_loss", precision=config.precision)
        result.loop = fit({"autoencoder": autoencoder}, optimizer, step, x, y, loop,
                          val_fn=combine(guard.check if guard is not None else None, val_fn,
                                         access.report if access.any_query_only else None),
                          checkpoint=checkpoint, progress=progress, extra=extra)
    result.history = result.loop.history
    if guard is not None:
        warn_if_never_robust(result.history)
    result.queries = access.queries
    autoencoder.eval()
    return result


def _warmup(autoencoder: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
            config: AAAConfig) -> None:
    gen = torch.Generator().manual_seed(config.seed + 1)
    autoencoder.train()
    for _ in range(config.warmup_steps):
        idx = torch.randint(x.shape[0], (config.batch_size,), generator=gen).to(x.device)
        xb = x[idx]
        noisy = (xb + config.eps * (torch.rand(xb.shape, generator=gen).to(x.device) * 2 - 1)).clamp(0, 1)
        loss = (autoencoder(noisy) - xb).pow(2).flatten(1).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    autoencoder.eval()


@torch.no_grad()
def _clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def validate_aaa(autoencoder: nn.Module, classifiers: list[nn.Module], x: torch.Tensor,
                 y: torch.Tensor, config: AAAConfig) -> dict:
    """Clean and PGD accuracy and the adversarial loss on a validation batch, per classifier."""
    autoencoder.eval()
    threat = ThreatModel("Linf", config.eps)
    gen = torch.Generator().manual_seed(12345)
    # Fewer validation steps than training steps: take Madry's 2.5 * eps / steps step size.
    step_size = max(config.step_size, 2.5 * config.eps / max(1, config.val_attack_steps))
    out: dict[str, float] = {}
    adv_losses = []
    for k, classifier in enumerate(classifiers):
        model = Shielded(autoencoder, classifier)
        x_adv = pgd_train(model, x, y, threat=threat, step_size=step_size,
                          steps=config.val_attack_steps, generator=gen)
        with torch.no_grad():
            reconstruction = autoencoder(x_adv)
            logits = classifier(reconstruction)
            loss, _ = aaa_loss(config.loss, logits, y, reconstruction, x, config.lam)
        adv_losses.append(float(loss))
        out[f"val_clean_acc_{k}"] = _clean_accuracy(model, x, y)
        out[f"val_adv_acc_{k}"] = float((logits.argmax(1) == y).float().mean())
    out["val_adv_loss"] = sum(adv_losses) / len(adv_losses)
    return out


# ---- the defense: config, build, train ------------------------------------------------------
@dataclass(frozen=True)
class AAAShieldConfig:
    """An AAA shield: the autoencoder (a model-zoo name) and how it is trained."""

    architecture: str = "conv-ae"
    training: AAAConfig = field(default_factory=AAAConfig)


def build(config: AAAShieldConfig, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """The autoencoder, for images of ``input_shape`` (default: its architecture's dataset's)."""
    from ..models import create_model

    return create_model(config.architecture, input_shape)


def train(config: AAAShieldConfig, classifiers: list[nn.Module], data, *, val=None,
          checkpoint: str | Path | None = None, progress: bool = True, device: str = "cpu") -> Trained:
    """A new autoencoder (its initial weights from the training seed too) trained by
    ``train_aaa`` against ``classifiers``."""
    autoencoder = seeded_build(build, config, config.training.seed, device, input_shape=data.images.shape[1:])
    result = train_aaa(autoencoder, list(classifiers), data.images, data.labels, config.training,
                       x_val=None if val is None else val.images,
                       y_val=None if val is None else val.labels, checkpoint=checkpoint,
                       progress=progress)
    details = {"visits": result.visits, **({"queries": result.queries} if result.queries else {})}
    # What the query-only classifiers answered: a label-only shield is a different claim.
    answers = sorted({c.output for c in classifiers if isinstance(c, QueryOnly)})
    if answers:
        details["query_output"] = answers[0] if len(answers) == 1 else answers
    return Trained(autoencoder, result.history, details)


def _from_sidecar(side: dict) -> AAAShieldConfig:
    # A cached file keeps the training config; a shipped one the experiment's shield spec.
    return AAAShieldConfig(architecture=side["architecture"],
                           training=pick(AAAConfig, side.get("config"), side.get("shield_spec")))


DEFENSE = Defense(
    name="aaa", config=AAAShieldConfig, train=train, build=build,
    purifier=lambda module, config: AutoencoderPurifier(module),
    training_threat=lambda config: ThreatModel("Linf", config.training.eps),
    from_sidecar=_from_sidecar,
    reference="Vaishnavi et al., Towards Model-Agnostic Adversarial Defenses using "
              "Adversarially Trained Autoencoders")
