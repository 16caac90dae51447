"""Evaluation: the cascade harness, records, statistics and tables."""

from ..io import write_json_atomic
from ..records import Accuracy, EvalRecord, manifest
from ..stats import wilson_interval
from .harness import AttackSpec, evaluate, register_attack

__all__ = ["ATTACKS", "Accuracy", "AttackSpec", "EvalRecord", "evaluate", "manifest",
           "register_attack", "wilson_interval", "write_json_atomic"]



def __getattr__(name: str):
    from .harness import legacy_attribute

    return legacy_attribute(__name__, name)
