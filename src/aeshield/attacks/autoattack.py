"""AutoAttack (Croce and Hein 2020) through the authors' reference implementation.

We call the reference code (PyPI ``pyautoattack``) rather than re-implementing it or using a
port: see ``benchmarks/README.md`` for the speed and fidelity measurement behind this choice.
Threat model: white-box (APGD-CE, APGD-T, FAB-T) and black-box score-based (Square), L-inf or
L2. Each sub-attack is exposed as its own ``attack(model, x, y)`` so that the harness can run
them in its cascade and report what each one contributed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import require
from ..threat import ThreatModel
from .registry import AuditHook, Stage, register

AUTOATTACK_PARTS = ("apgd-ce", "apgd-t", "fab-t", "square")


def _import_autoattack():
    """The reference ``AutoAttack`` class; ``MissingExtraError`` without the ``attacks`` extra."""
    return require("pyautoattack", extra="attacks", feature="AutoAttack").AutoAttack


def _set_apgd_iters(attack, n_iter: int) -> None:
    # pyautoattack derives its step-size schedule from n_iter in __init__ only; changing
    # n_iter alone would keep the 100-iteration checkpoints and weaken the attack.
    attack.n_iter = n_iter
    attack.n_iter_2 = max(int(0.22 * n_iter), 1)
    attack.n_iter_min = max(int(0.06 * n_iter), 1)
    attack.size_decr = max(int(0.03 * n_iter), 1)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3,
               norm: str = "Linf", attacks: Sequence[str] = AUTOATTACK_PARTS, seed: int = 0,
               apgd_iters: int | None = None, apgd_restarts: int | None = None,
               fab_iters: int | None = None, square_queries: int | None = None,
               batch_size: int = 500) -> torch.Tensor:
    """Run the AutoAttack cascade (or the listed parts of it) and return ``x_adv``.

    Defaults are the standard version's budget (APGD 100 iterations and 1 restart, 9 target
    classes for APGD-T and FAB-T, Square 5000 queries). ``apgd_iters``, ``apgd_restarts``,
    ``fab_iters`` and ``square_queries`` shrink it for quick CPU runs.
    """
    if norm not in ("Linf", "L2"):
        raise ValueError(f"aeshield runs AutoAttack for Linf or L2, got norm={norm!r}")
    unknown = set(attacks) - set(AUTOATTACK_PARTS) - {"apgd-dlr", "fab"}
    if unknown:
        raise ValueError(f"unknown AutoAttack parts {sorted(unknown)}; use {AUTOATTACK_PARTS}")
    AutoAttack = _import_autoattack()
    adversary = AutoAttack(model, attacks=list(attacks), eps=float(eps), norm=norm, seed=seed,
                           version="custom", device=x.device)
    adversary.verbose = False
    # The standard version's settings (version="custom" would keep the constructor's 5 restarts).
    adversary.apgd.n_restarts = 1
    adversary.apgd_targeted.n_restarts = 1
    adversary.fab.n_restarts = 1
    adversary.apgd_targeted.n_target_classes = 9
    adversary.fab.n_target_classes = 9
    adversary.square.n_queries = 5000
    if apgd_iters is not None:
        _set_apgd_iters(adversary.apgd, apgd_iters)
        _set_apgd_iters(adversary.apgd_targeted, apgd_iters)
    if apgd_restarts is not None:
        adversary.apgd.n_restarts = apgd_restarts
    if fab_iters is not None:
        adversary.fab.n_iter = fab_iters
    if square_queries is not None:
        adversary.square.n_queries = square_queries
    x_adv, _ = adversary.run_standard_evaluation(x.detach(), y, batch_size=batch_size)
    return ThreatModel(norm, eps).project(x_adv.to(x.device), x).detach()


# ---- registration: each part on its own, so that the harness's cascade reports what it added ----
@dataclass(frozen=True)
class APGDCESettings:
    apgd_iters: int | None = None
    apgd_restarts: int | None = None
    batch_size: int = 500
    command_line: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class APGDTSettings:
    apgd_iters: int | None = None
    batch_size: int = 500
    command_line: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class FABTSettings:
    fab_iters: int | None = None
    batch_size: int = 500
    command_line: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class SquareSettings:
    square_queries: int | None = None
    batch_size: int = 500
    command_line: ClassVar[tuple[str, ...]] = ()


def _part(part: str):
    def run(model, x, y, threat, generator, **settings):
        # The reference code seeds itself; its seed comes from the cascade's generator.
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        return autoattack(model, x, y, eps=threat.eps, norm=threat.norm.value, attacks=[part],
                          seed=seed, **settings)
    run.__name__ = run.__qualname__ = f"_run_{part.replace('-', '_')}"
    return run


_WHITE_BOX = "Croce and Hein 2020 (AutoAttack)"
register("apgd-ce", settings=APGDCESettings, requires=_import_autoattack, reference=_WHITE_BOX,
         audit=AuditHook(Stage.WHITE_BOX, lambda budget, threat: {
             "apgd_iters": budget.apgd_iters, "apgd_restarts": budget.apgd_restarts}))(_part("apgd-ce"))
register("apgd-t", settings=APGDTSettings, requires=_import_autoattack, reference=_WHITE_BOX,
         audit=AuditHook(Stage.WHITE_BOX, lambda budget, threat: {
             "apgd_iters": budget.apgd_iters}))(_part("apgd-t"))
register("fab-t", settings=FABTSettings, requires=_import_autoattack, reference=_WHITE_BOX,
         audit=AuditHook(Stage.WHITE_BOX, lambda budget, threat: {
             "fab_iters": budget.apgd_iters}))(_part("fab-t"))
# Square only queries the pipeline's outputs, so the audit runs it on the pipeline as it is.
register("square", settings=SquareSettings, requires=_import_autoattack,
         reference="Andriushchenko, Croce, Flammarion and Hein 2020 (Square Attack)",
         audit=AuditHook(Stage.BLACK_BOX, lambda budget, threat: {"square_queries": budget.square_queries},
                         through_eot=False))(_part("square"))
