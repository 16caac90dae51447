"""Smoke runs: a target's profile with every size cut to a few images and steps.

A paper profile needs a GPU for hours; until one is lent, nothing ran its code path end to end
(its architectures at full size, its figure kinds, its attack settings). A smoke run keeps all of
that and shrinks only the sizes: epochs, training images, test images, attack steps, restarts,
EOT samples, pairs, sweep points. It answers "does this command run?", never "what does it
measure": its numbers are noise and it writes them to a scratch folder, labelled as a smoke run,
with its own artifact cache.
"""

from __future__ import annotations

import copy
from dataclasses import fields, replace
from typing import Any

# Each key, wherever it appears in a resolved config, is capped at this value (never raised).
CAPS: dict[str, int] = {
    # training
    "epochs": 1, "epochs1": 1, "epochs2": 1, "attack_steps": 1, "val_n": 8,
    "warmup_steps": 1, "kl_warmup_steps": 1, "eps_ramp_steps": 1, "fit_limit": 200,
    # evaluation
    "n": 8, "n_rmse": 8, "n_jacobian": 2, "steps": 2, "restarts": 1, "eot": 2,
    "eot_samples": 2, "pairs": 2, "c_count": 2, "num": 3, "queries": 10, "square_queries": 10,
    # query-only training (issue 28)
    "query_samples": 2, "surrogate_epochs": 1,
}
# An audit suite's budget (``eval.audit.budget.AuditBudget``) at smoke size: the same battery,
# every attack of it at a few steps, restarts, queries and EOT samples.
AUDIT_CAPS: dict[str, int] = {
    "pgd_steps": 2, "pgd_restarts": 1, "apgd_iters": 2, "apgd_restarts": 1, "square_queries": 10,
    "cw_steps": 2, "eot_samples": 2, "adaptive_steps": 2,
}
TRAIN_IMAGES = 64  # every classifier, baseline and shield trains (and a detector calibrates) on these
DATA_LIMIT = 256  # images kept per split: enough for a 5-component GMM per class (fit_limit)
SUFFIX = "-smoke"


def smoke_config(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a resolved config dict with every size it states capped (see ``CAPS``).
    Sizes a spec leaves at its dataclass default are capped by :func:`smoke_spec`."""
    out = _cap(copy.deepcopy(data))
    out["data_limit"] = min(out.get("data_limit") or DATA_LIMIT, DATA_LIMIT)
    out["notes"] = (f"SMOKE RUN: every size cut to a few images and steps ({TRAIN_IMAGES} training "
                    f"images, {DATA_LIMIT} per split at most, <= {CAPS['n']} test images attacked, "
                    f"<= {CAPS['steps']} attack steps). It checks that the profile runs; its numbers "
                    "measure nothing. " + str(out.get("notes", "")))
    return out


def smoke_spec(spec: Any) -> Any:
    """A spec dataclass (classifier, baseline, shield, attack) with its sizes capped, defaults
    included, and its training and calibration sets cut to ``TRAIN_IMAGES``."""
    changes = {}
    for f in fields(spec):
        value = getattr(spec, f.name)
        if f.name.startswith(("query_", "surrogate_")) and getattr(spec, "query_method", None) is None:
            continue  # unused, and at its default in no key: capping it would move the smoke keys
        if f.name in CAPS and _is_number(value):
            changes[f.name] = min(value, CAPS[f.name])
        elif f.name in ("train_limit", "calibration_n"):  # None means "all of them"
            changes[f.name] = min(value or TRAIN_IMAGES, TRAIN_IMAGES)
    return replace(spec, **changes)


def smoke_budget(budget: Any) -> Any:
    """An audit budget with its sizes capped (``AUDIT_CAPS``), named ``<name>-smoke``."""
    return replace(budget, name=budget.name + SUFFIX,
                   **{k: min(getattr(budget, k), cap) for k, cap in AUDIT_CAPS.items()})


def _cap(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: (min(v, CAPS[k]) if k in CAPS and _is_number(v) else _cap(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_cap(v) for v in node]
    return node


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["AUDIT_CAPS", "CAPS", "DATA_LIMIT", "SUFFIX", "TRAIN_IMAGES", "smoke_budget", "smoke_config",
           "smoke_spec"]
