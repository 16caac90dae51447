"""Evaluation: the cascade harness, records, statistics and tables."""

from .harness import ATTACKS, AttackSpec, evaluate, register_attack
from ..records import Accuracy, EvalRecord, manifest
from ..io import write_json_atomic
from ..stats import wilson_interval

__all__ = ["ATTACKS", "Accuracy", "AttackSpec", "EvalRecord", "evaluate", "manifest",
           "register_attack", "wilson_interval", "write_json_atomic"]
