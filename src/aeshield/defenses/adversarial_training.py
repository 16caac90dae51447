"""Madry et al. (2018) PGD adversarial training of a classifier: the baseline AAA is compared to.

Each step replaces the batch by L-inf PGD examples (random start, ``attack_steps`` steps) and
minimizes their cross-entropy. Threat model of the result: white-box L-inf at ``eps``.
``schedule`` "fast", "nfgsm" or "free" trades the PGD inner loop for FGSM from a random start,
FGSM from a larger noise or minibatch replay (``defenses.schedules``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.gradient import pgd_train
from ..inputs import check_training_config
from ..threat import ThreatModel
from ..train.loop import LoopConfig, LoopResult, fit
from .registry import Defense, Trained, pick
from .schedules import (ScheduleSettings, check_schedule, combine, craft, schedule_state, single_step,
                        updates_per_batch, warn_if_never_robust)


@dataclass(frozen=True)
class AdversarialTrainingConfig(ScheduleSettings):
    """Settings of one Madry training run; the attack schedule's keyword-only settings come
    from ``schedules.ScheduleSettings``."""

    eps: float = 0.3
    step_size: float = 0.01
    attack_steps: int = 40
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    plateau_patience: int = 5
    checkpoint_every: int = 50
    val_attack_steps: int = 10
    # Grow eps linearly from 0 over this many steps (0: off). On short budgets, PGD training at
    # full eps from the start can collapse to the uniform prediction (loss stuck at log 10);
    # measured on the quick MNIST profile for classifiers B and C.
    eps_ramp_steps: int = 0
    # Anneal the lr from ``lr`` to 0 along a half cosine over the whole run instead of the
    # plateau schedule, which never fires on a few-epoch CPU budget.
    cosine_lr: bool = False

    def __post_init__(self) -> None:
        check_training_config(self)
        check_schedule(self)


def steps_taken(optimizer: torch.optim.Optimizer) -> int:
    """Updates the optimizer has made; its state is checkpointed, so schedules that read this
    continue exactly where a killed run stopped."""
    states = [s for s in optimizer.state.values() if "step" in s]
    return int(states[0]["step"]) if states else 0


def cosine_lr(optimizer: torch.optim.Optimizer, base_lr: float, total_steps: int,
              offset: int = 0) -> float:
    """Set (and return) the lr of the next update: ``base_lr * (1 + cos(pi * t / total)) / 2``,
    where ``t`` counts the optimizer's updates after the first ``offset`` (e.g. a warm-up that
    used the same optimizer)."""
    t = min(max(steps_taken(optimizer) - offset, 0), total_steps)
    lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * t / max(1, total_steps)))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def total_updates(n: int, batch_size: int, epochs: int) -> int:
    return epochs * math.ceil(n / batch_size)


def ramp(optimizer: torch.optim.Optimizer, ramp_steps: int) -> float:
    """Fraction of the full eps for the next step: (steps taken + 1) / ramp_steps, at most 1.

    The count is read from the optimizer's state, which checkpoints restore, so a resumed run
    continues the same schedule.
    """
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (steps_taken(optimizer) + 1) / ramp_steps)


def adversarial_training(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         config: AdversarialTrainingConfig, *, x_val: torch.Tensor | None = None,
                         y_val: torch.Tensor | None = None, checkpoint: str | Path | None = None,
                         progress: bool = True) -> LoopResult:
    """Adversarially train ``model`` in place (it may start from natural weights)."""
    threat = ThreatModel("Linf", config.eps)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    total = total_updates(x.shape[0], config.batch_size, config.epochs) * updates_per_batch(config)
    free, guard = schedule_state(config, lambda: [model.eval()], {"model": model}, optimizer, x, y, x_val, y_val)

    def prepare() -> ThreatModel:
        """The lr and the (ramped) ball of the next update."""
        if config.cosine_lr:
            cosine_lr(optimizer, config.lr, total)
        return ThreatModel("Linf", config.eps * ramp(optimizer, config.eps_ramp_steps))

    def outer(x_adv: torch.Tensor, yb: torch.Tensor):
        logits = model(x_adv)
        loss = F.cross_entropy(logits, yb)
        return loss, {"loss": loss.detach(), "adv_acc": (logits.argmax(1) == yb).float().mean()}

    def step(xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator):
        if guard is not None:  # before the lr is set: a restore puts back the optimizer's old lr
            guard.tick()
        if free is not None:
            model.train()
            return free.step(xb, lambda x_adv: outer(x_adv, yb), optimizer, prepare)
        if config.cosine_lr:
            cosine_lr(optimizer, config.lr, total)
        model.eval()  # craft without touching BatchNorm statistics or dropout masks
        scale = ramp(optimizer, config.eps_ramp_steps)
        x_adv = craft(model, xb, yb, schedule=config.schedule, threat=ThreatModel("Linf", config.eps * scale),
                      step_size=config.step_size * scale, steps=config.attack_steps,
                      **single_step(config, guard), generator=gen)
        model.train()
        return outer(x_adv, yb)

    val_fn: Callable[[], dict] | None = None
    if x_val is not None and y_val is not None:
        def validate() -> dict:
            model.eval()
            val_step = max(config.step_size, 2.5 * config.eps / max(1, config.val_attack_steps))
            x_adv = pgd_train(model, x_val, y_val, threat=threat, step_size=val_step,
                              steps=config.val_attack_steps, generator=torch.Generator().manual_seed(12345))
            with torch.no_grad():
                logits_adv, logits = model(x_adv), model(x_val)
            return {"val_adv_loss": float(F.cross_entropy(logits_adv, y_val)),
                    "val_adv_acc": float((logits_adv.argmax(1) == y_val).float().mean()),
                    "val_clean_acc": float((logits.argmax(1) == y_val).float().mean())}
        val_fn = validate
    extra = {k: v for k, v in (("free", free), ("guard", guard)) if v is not None}
    if guard is not None and not (checkpoint and Path(checkpoint).exists()):
        guard.baseline()

    loop = LoopConfig(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                      checkpoint_every=config.checkpoint_every,
                      plateau_patience=config.plateau_patience, val_metric="val_adv_loss",
                      precision=config.precision)
    result = fit({"model": model}, optimizer, step, x, y, loop,
                 val_fn=combine(guard.check if guard is not None else None, val_fn),
                 checkpoint=checkpoint, progress=progress, extra=extra or None)
    if guard is not None:
        warn_if_never_robust(result.history)
    model.eval()
    return result


# ---- the defense: config, build, train ------------------------------------------------------
@dataclass(frozen=True)
class AdversarialTrainingDefenseConfig:
    """A classifier (a model-zoo name) adversarially trained: not a shield, the classifier
    itself is the defended model."""

    architecture: str
    training: AdversarialTrainingConfig = field(default_factory=AdversarialTrainingConfig)


def build(config: AdversarialTrainingDefenseConfig) -> nn.Module:
    from ..models import create_model

    return create_model(config.architecture)


def train(config: AdversarialTrainingDefenseConfig, classifiers: list[nn.Module], data, *, val=None,
          checkpoint: str | Path | None = None, progress: bool = True, device: str = "cpu") -> Trained:
    """Start from the weights of ``classifiers[0]`` (a natural classifier of
    ``config.architecture``; none: from scratch) and train with ``adversarial_training``."""
    model = build(config).to(device)
    if classifiers:
        model.load_state_dict(classifiers[0].state_dict())
    result = adversarial_training(model, data.images, data.labels, config.training,
                                  x_val=None if val is None else val.images,
                                  y_val=None if val is None else val.labels,
                                  checkpoint=checkpoint, progress=progress)
    return Trained(model, result.history)


def _from_sidecar(side: dict) -> AdversarialTrainingDefenseConfig:
    return AdversarialTrainingDefenseConfig(
        architecture=side["architecture"],
        training=pick(AdversarialTrainingConfig, side.get("config"), side.get("adversarial_training")))


DEFENSE = Defense(
    name="adversarial_training", config=AdversarialTrainingDefenseConfig, train=train, build=build,
    purifier=None, training_threat=lambda config: ThreatModel("Linf", config.training.eps),
    from_sidecar=_from_sidecar,
    reference="Madry, Makelov, Schmidt, Tsipras and Vladu (2018), Towards Deep Learning Models "
              "Resistant to Adversarial Attacks")
