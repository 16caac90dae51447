"""The audit's cascade for one pipeline (``build_battery``) and the reference attack its
sanity checks sweep (``reference_attack``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ...attacks.adaptive import _unwrap_detector
from ...attacks.registry import Stage, attacks
from ...defenses.base import Shielded
from ...threat import ThreatModel
from ..harness import AttackSpec
from .budget import AuditBudget, get_budget, step_size

BLACKBOX_LABELS = ("square", "transfer-classifier", "transfer-surrogate")


def describe_model(model: nn.Module) -> dict:
    """What the audit could see of the pipeline's parts."""
    d: dict = {"type": type(model).__name__, "shielded": isinstance(model, Shielded)}
    if isinstance(model, Shielded):
        purifier = model.purifier
        d.update(purifier=type(purifier).__name__, classifier=type(model.classifier).__name__,
                 detector=type(model.detector).__name__ if model.detector is not None else None,
                 purifier_has_encode=callable(getattr(purifier, "encode", None)),
                 declared_stochastic=bool(getattr(purifier, "stochastic", False)),
                 custom_bpda_forward=type(purifier).__dict__.get("bpda_forward") is not None)
    d["parameters"] = sum(p.numel() for p in model.parameters())
    return d


def build_battery(model: nn.Module, threat: ThreatModel, budget: AuditBudget | str = "quick", *,
                  random: bool = False, surrogate: nn.Module | None = None) -> list[AttackSpec]:
    """The audit's cascade for this pipeline: white-box first, then BPDA and the adaptive
    attacks, and the black-box and transfer attacks last (so that what they add is exactly
    what every white-box attack missed).

    PGD's runs (two losses, BPDA, transfer) are the audit's own; every other attack comes from
    the registry, where its ``AuditHook`` says at which stage it runs and with what settings.
    It joins the battery where it applies to the pipeline and supports the threat's norm.
    """
    b = get_budget(budget)
    eot = "eot" if random else None
    tag = " [eot]" if random else ""
    shielded = isinstance(model, Shielded)

    def pgd_params(loss: str, steps: int, restarts: int) -> dict:
        return {"loss": loss, "steps": steps, "step_size": step_size(threat.eps, steps, b.step_factor),
                "restarts": restarts}

    def registered(stage: Stage) -> list[AttackSpec]:
        specs = []
        for attack in attacks():
            hook = attack.audit
            if (hook is None or hook.stage is not stage or threat.norm not in attack.norms
                    or not attack.applies_to(model)):
                continue
            settings = hook.settings(b, threat)
            if hook.through_eot:
                specs.append(AttackSpec(attack.name, settings, wrap=eot, eot_samples=b.eot_samples,
                                        label=attack.name + tag))
            else:
                specs.append(AttackSpec(attack.name, settings, label=attack.name))
        return specs

    specs = [
        AttackSpec("pgd", pgd_params("ce", b.pgd_steps, b.pgd_restarts), wrap=eot,
                   eot_samples=b.eot_samples, label="pgd-ce" + tag),
        AttackSpec("pgd", pgd_params("margin", b.pgd_steps, b.pgd_restarts), wrap=eot,
                   eot_samples=b.eot_samples, label="pgd-margin" + tag),
        *registered(Stage.WHITE_BOX),
    ]
    if shielded and not isinstance(model.purifier, nn.Identity):
        for loss in b.bpda_losses:
            specs.append(AttackSpec("pgd", pgd_params(loss, b.pgd_steps, b.pgd_restarts), wrap="bpda",
                                    label=f"bpda-pgd-{loss}"))
    specs += registered(Stage.ADAPTIVE)
    specs += registered(Stage.BLACK_BOX)
    if shielded:
        specs.append(AttackSpec("pgd", pgd_params("ce", b.pgd_steps, 1), wrap="classifier",
                                label="transfer-classifier"))
    if surrogate is not None:
        specs.append(AttackSpec("pgd", pgd_params("ce", b.pgd_steps, 1), wrap="surrogate",
                                label="transfer-surrogate"))
    return specs


def reference_attack(model: nn.Module, budget: AuditBudget, *, random: bool
                     ) -> Callable[[float, int], list[AttackSpec]]:
    """``make(eps, steps)``: the attack the sanity checks sweep. PGD, through EOT when the
    pipeline is random; on a pipeline with a detector, the worst case of detector-aware PGD and
    orthogonal PGD, since neither dominates (MagNet-MNIST, 100 images at 100 steps: 38% vs 5%
    left correct or rejected; PuVAE's RMSE detector at 20 steps: 9% vs 20%)."""
    names = ["detector-pgd", "orthogonal-pgd"] if _unwrap_detector(model) is not None else ["pgd"]

    def make(eps: float, steps: int) -> list[AttackSpec]:
        return [AttackSpec(name, {"loss": "ce", "steps": steps,
                                  "step_size": step_size(eps, steps, budget.step_factor), "restarts": 1},
                           wrap="eot" if random else None, eot_samples=budget.eot_samples,
                           label=f"{name} eps={eps:g} steps={steps}")
                for name in names]
    return make
