"""How hard the audit attacks: the named budgets and the PGD step-size rule."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ...attacks.gradient import step_size_rule as step_size


@dataclass(frozen=True)
class AuditBudget:
    """How hard the audit attacks, and how much of the data its sanity checks use.

    PGD uses ``step_size = step_factor * eps / steps``. The AutoAttack parts (the harness's
    ``apgd-ce``, ``apgd-t``, ``fab-t``, ``square``: standard-version settings, 9 target
    classes) use ``apgd_iters`` iterations for APGD-CE, APGD-T and FAB-T, ``apgd_restarts``
    restarts of APGD-CE and ``square_queries`` queries.
    ``sanity_n`` is the size of the subset the checks run on (``None``: all examples).
    ``judge_draws``: on a random pipeline, the draws over which the randomness check scores one
    run of the reference attack (one query vs. retries).
    """

    name: str
    pgd_steps: int
    pgd_restarts: int
    step_factor: float = 2.5
    apgd_iters: int = 100
    apgd_restarts: int = 1
    square_queries: int = 5000
    cw_steps: int = 100
    eot_samples: int = 8
    bpda_losses: tuple[str, ...] = ("ce",)
    adaptive_steps: int = 40
    sanity_n: int | None = 200
    eps_fractions: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5)
    steps_sweep: tuple[int, ...] = (2, 5, 10, 20, 40)
    longer_factor: int = 10
    # On a random pipeline: how many draws score each adversarial input of the one-query check.
    judge_draws: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


BUDGETS: dict[str, AuditBudget] = {
    # CPU minutes for a small MNIST pipeline on 1,000 images; checks on 200 examples.
    "quick": AuditBudget("quick", pgd_steps=20, pgd_restarts=2, apgd_iters=20, apgd_restarts=1,
                         square_queries=500, cw_steps=50, eot_samples=4,
                         bpda_losses=("ce",), adaptive_steps=20, sanity_n=200,
                         eps_fractions=(0.25, 0.5, 1.0, 1.5), steps_sweep=(2, 5, 10, 20, 40)),
    # A serious evaluation on a GPU: checks on 500 examples.
    "standard": AuditBudget("standard", pgd_steps=50, pgd_restarts=5, apgd_iters=50, apgd_restarts=1,
                            square_queries=2000, cw_steps=200, eot_samples=8,
                            bpda_losses=("ce", "margin"), adaptive_steps=50, sanity_n=500,
                            eps_fractions=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5),
                            steps_sweep=(5, 10, 20, 50, 100)),
    # The standard AutoAttack budget (100 iterations, 9 targets, 5000 Square queries) and
    # 100-step PGD with 20 restarts; checks on every example.
    "paper": AuditBudget("paper", pgd_steps=100, pgd_restarts=20, apgd_iters=100, apgd_restarts=1,
                         square_queries=5000, cw_steps=1000, eot_samples=20,
                         bpda_losses=("ce", "margin"), adaptive_steps=100, sanity_n=None,
                         eps_fractions=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
                         steps_sweep=(5, 10, 20, 50, 100, 200)),
}


def get_budget(budget: str | AuditBudget) -> AuditBudget:
    if isinstance(budget, AuditBudget):
        return budget
    try:
        return BUDGETS[budget]
    except KeyError:
        raise ValueError(f"unknown budget {budget!r}; use one of {sorted(BUDGETS)} or an AuditBudget") from None


def with_budget(budget: str | AuditBudget, **changes) -> AuditBudget:
    """A copy of a named budget with some fields changed (e.g. ``sanity_n=100``)."""
    return replace(get_budget(budget), **changes)


__all__ = ["BUDGETS", "AuditBudget", "get_budget", "step_size", "with_budget"]
