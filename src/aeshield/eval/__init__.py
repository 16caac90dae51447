"""Evaluation: the cascade harness, records, statistics and tables."""

from ..io import write_json_atomic
from ..records import Accuracy, EvalRecord, manifest
from ..stats import wilson_interval
from .harness import AttackSpec, evaluate, register_attack

__all__ = ["ATTACKS", "Accuracy", "AttackSpec", "EvalRecord", "evaluate", "manifest",
           "register_attack", "wilson_interval", "write_json_atomic"]


def __getattr__(name: str):
    if name == "ATTACKS":
        import warnings

        from .harness import _LEGACY_ATTACKS

        warnings.warn("aeshield.eval.ATTACKS is deprecated; use aeshield.attacks.run_attack, "
                      "get_attack and register", DeprecationWarning, stacklevel=2)
        return _LEGACY_ATTACKS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
