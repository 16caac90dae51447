"""What every analysis receives and returns, and the helpers they share.

An analysis is ``fn(figure, ctx) -> AnalysisResult``: ``figure`` is its entry in the config's
``figures`` list, ``ctx`` the few things it may use (config, data splits, model zoo, record
cache, output folder). It measures first, through ``ctx.records`` (one JSON record, recomputed
only when its spec changes), then draws its table and pictures from that record alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...eval.harness import AttackSpec
from ...io import save_figure_atomic
from ...records import Accuracy
from ..config import ExperimentConfig, spec_dict
from ..record_cache import RecordCache
from ..zoo import ModelZoo, Splits


@dataclass(frozen=True)
class AnalysisContext:
    config: ExperimentConfig
    data: Splits
    zoo: ModelZoo
    records: RecordCache
    out: Path
    # Counters and seconds an analysis wants in the manifest (the runner's dict).
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AnalysisResult:
    """What an analysis measured (``record``: the stored JSON, None for one that only renders
    other records) and the files it wrote."""

    record: dict[str, Any] | None
    files: tuple[Path, ...]


@dataclass(frozen=True)
class MeanInterval:
    """A mean over examples with its Student t 95% interval (``stats.mean_interval``)."""

    mean: float
    std: float
    n: int
    ci95: tuple[float, float]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MeanInterval:
        return cls(float(d["mean"]), float(d["std"]), int(d["n"]), (d["ci95"][0], d["ci95"][1]))


def accuracy_of(d: dict[str, Any]) -> Accuracy:
    """An ``Accuracy`` from its ``to_dict`` form."""
    return Accuracy(int(d["correct"]), int(d["n"]))


def accuracy_dict(flags: torch.Tensor) -> dict[str, Any]:
    """The stored form of the accuracy of per-example correctness ``flags``."""
    return Accuracy.from_flags(flags.cpu()).to_dict()


def fmt_accuracy(d: dict[str, Any]) -> str:
    """A stored accuracy as table text: percent [Wilson 95%]."""
    return accuracy_of(d).format()


def attack_at(d: dict[str, Any], eps: float) -> AttackSpec:
    """An AttackSpec from a config dict; ``step_size_factor`` sets ``step_size = factor * eps``."""
    d = dict(d)
    params = dict(d.pop("params", {}) or {})
    factor = params.pop("step_size_factor", None)
    if factor is not None:
        params["step_size"] = float(factor) * eps
    return AttackSpec(params=params, **d)


def data_label(config: ExperimentConfig, test: Any) -> str:
    """The dataset as every output must name it: measurements on the JPEG stand-in say so."""
    source = test.source
    return source if "stand-in" in source else config.dataset


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (imported on first use: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> Path:
    """Write a figure atomically (``io.save_figure_atomic``: a unique temporary file, removed if
    the write fails or is interrupted) and close it."""
    pyplot()  # the file-only backend, before save_figure_atomic imports pyplot to close the figure
    return save_figure_atomic(fig, path, dpi=110)


def fmt_mean(m: dict[str, Any], digits: int = 3) -> str:
    lo, hi = m["ci95"]
    return f"{m['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] (sd {m['std']:.{digits}f})"


def shield_key(zoo: ModelZoo, name: str) -> dict[str, Any]:
    """The shield's spec hash and its weight file's hash (loads it; a record measured on other
    weights is then recomputed, as the runner's evaluation records are)."""
    zoo.shield(name)
    return {"spec": zoo.shield_artifact(name)[1],
            "weights": zoo.weight_hashes([f"shield-{name}"])[f"shield-{name}"]}


def pipeline_key(zoo: ModelZoo, shield: str, classifier: str) -> dict[str, Any]:
    """What an analysis record of a shield + classifier pipeline depends on: the specs and the
    weight files themselves (so a record measured on other weights, e.g. a classifier retrained
    elsewhere, is recomputed)."""
    zoo.shield(shield), zoo.classifier(classifier)  # load, so their files are hashed
    return {"shield": spec_dict(zoo.config.shields[shield]), "artifact": zoo.shield_artifact(shield)[1],
            "classifier": zoo.classifier_specs([classifier])[classifier],
            "weights": zoo.weight_hashes([f"shield-{shield}", classifier])}


def classifier_key(zoo: ModelZoo, name: str) -> dict[str, Any]:
    zoo.classifier(name)
    return {**zoo.classifier_specs([name]), "weights": zoo.weight_hashes([name])[name]}


__all__ = ["AnalysisContext", "AnalysisResult", "MeanInterval", "accuracy_dict", "accuracy_of",
           "attack_at", "classifier_key", "data_label", "fmt_accuracy", "fmt_mean", "pipeline_key",
           "pyplot", "save_png", "shield_key"]
