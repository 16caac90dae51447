"""Madry et al. (2018) PGD adversarial training of a classifier: the baseline AAA is compared to.

Each step replaces the batch by L-inf PGD examples (random start, ``attack_steps`` steps) and
minimizes their cross-entropy. Threat model of the result: white-box L-inf at ``eps``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.gradient import pgd_train
from ..threat import ThreatModel
from ..train.loop import LoopConfig, LoopResult, fit


@dataclass(frozen=True)
class AdversarialTrainingConfig:
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


def adversarial_training(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         config: AdversarialTrainingConfig, *, x_val: torch.Tensor | None = None,
                         y_val: torch.Tensor | None = None, checkpoint: str | Path | None = None,
                         progress: bool = True) -> LoopResult:
    """Adversarially train ``model`` in place (it may start from natural weights)."""
    threat = ThreatModel("Linf", config.eps)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    def step(xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator):
        model.eval()  # craft without touching BatchNorm statistics or dropout masks
        x_adv = pgd_train(model, xb, yb, threat=threat, step_size=config.step_size,
                          steps=config.attack_steps, generator=gen)
        model.train()
        logits = model(x_adv)
        loss = F.cross_entropy(logits, yb)
        return loss, {"loss": loss.detach(), "adv_acc": (logits.argmax(1) == yb).float().mean()}

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

    loop = LoopConfig(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                      checkpoint_every=config.checkpoint_every,
                      plateau_patience=config.plateau_patience, val_metric="val_adv_loss")
    result = fit({"model": model}, optimizer, step, x, y, loop, val_fn=val_fn,
                 checkpoint=checkpoint, progress=progress)
    model.eval()
    return result
