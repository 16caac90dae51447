"""AutoAttack (Croce and Hein 2020) through the authors' reference implementation.

We call the reference code (PyPI ``pyautoattack``) rather than re-implementing it or using a
port: see ``benchmarks/README.md`` for the speed and fidelity measurement behind this choice.
Threat model: white-box (APGD-CE, APGD-T, FAB-T) and black-box score-based (Square), L-inf or
L2. Each sub-attack is exposed as its own ``attack(model, x, y)`` so that the harness can run
them in its cascade and report what each one contributed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..threat import ThreatModel

AUTOATTACK_PARTS = ("apgd-ce", "apgd-t", "fab-t", "square")


def _import_autoattack():
    try:
        from pyautoattack import AutoAttack
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("AutoAttack needs the reference implementation: "
                          "pip install 'aeshield[attacks]' (or pip install pyautoattack)") from err
    return AutoAttack


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.3,
               norm: str = "Linf", attacks: Sequence[str] = AUTOATTACK_PARTS, seed: int = 0,
               apgd_iters: int | None = None, apgd_restarts: int | None = None,
               square_queries: int | None = None, batch_size: int = 500) -> torch.Tensor:
    """Run the AutoAttack cascade (or the listed parts of it) and return ``x_adv``.

    ``apgd_iters``, ``apgd_restarts`` and ``square_queries`` shrink the standard budget
    (100 iterations, 5000 queries) for quick CPU runs; leave them ``None`` for the standard one.
    """
    unknown = set(attacks) - set(AUTOATTACK_PARTS) - {"apgd-dlr", "fab"}
    if unknown:
        raise ValueError(f"unknown AutoAttack parts {sorted(unknown)}; use {AUTOATTACK_PARTS}")
    AutoAttack = _import_autoattack()
    adversary = AutoAttack(model, attacks=list(attacks), eps=float(eps), norm=norm, seed=seed,
                           version="custom", device=x.device)
    adversary.logger.setLevel(logging.WARNING)
    if apgd_iters is not None:
        adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = apgd_iters
    if apgd_restarts is not None:
        adversary.apgd.n_restarts = apgd_restarts
    if square_queries is not None:
        adversary.square.n_queries = square_queries
    x_adv, _ = adversary.run_standard_evaluation(x.detach(), y, batch_size=batch_size)
    return ThreatModel(norm, eps).project(x_adv.to(x.device), x).detach()
