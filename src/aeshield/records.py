"""Result records: dataclasses written atomically as JSON, next to a manifest."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import dataclasses
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .io import json_default, write_json_atomic
from .stats import wilson_interval


@dataclass
class Accuracy:
    """A measured accuracy with its count, sample size and Wilson 95% interval."""

    correct: int
    n: int

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {"accuracy": self.value, "correct": self.correct, "n": self.n,
                "ci95": [lo, hi], "ci_method": "Wilson"}

    def format(self) -> str:
        lo, hi = self.interval
        return f"{100 * self.value:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"

    @classmethod
    def from_flags(cls, flags: torch.Tensor) -> "Accuracy":
        return cls(int(flags.sum().item()), int(flags.numel()))


def flags_to_string(flags: torch.Tensor) -> str:
    """Per-example boolean flags as one '0'/'1' character each, the form records store."""
    return "".join("1" if f else "0" for f in flags.tolist())


def flags_from_string(text: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The inverse of ``flags_to_string``."""
    return torch.tensor([c == "1" for c in text], dtype=torch.bool, device=device)


@dataclass
class AttackResult:
    name: str
    settings: dict
    threat: dict
    newly_fooled: int
    accuracy_after: Accuracy
    seconds: float
    peak_memory_mb: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["accuracy_after"] = self.accuracy_after.to_dict()
        return d


@dataclass
class EvalRecord:
    """One evaluation: what was attacked, how, on what, and what survived."""

    defense: str
    classifier: str
    dataset: str
    data_source: str
    data_hash: str
    threat: dict
    n: int
    seed: int
    clean: Accuracy
    robust: Accuracy
    attacks: list[AttackResult]
    robust_flags: str  # one '0'/'1' per example, so records can be combined later
    clean_reject_rate: float | None = None
    extra: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items()}
        d["clean"] = self.clean.to_dict()
        d["robust"] = self.robust.to_dict()
        d["attacks"] = [a.to_dict() for a in self.attacks]
        d["attack_summary"] = " -> ".join(a.name for a in self.attacks) or "none"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EvalRecord":
        acc = lambda a: Accuracy(a["correct"], a["n"])  # noqa: E731
        attacks = [AttackResult(a["name"], a["settings"], a["threat"], a["newly_fooled"],
                                acc(a["accuracy_after"]), a["seconds"], a.get("peak_memory_mb"))
                   for a in d["attacks"]]
        return cls(d["defense"], d["classifier"], d["dataset"], d["data_source"], d["data_hash"],
                   d["threat"], d["n"], d["seed"], acc(d["clean"]), acc(d["robust"]), attacks,
                   d["robust_flags"], d.get("clean_reject_rate"), d.get("extra", {}), d["created"])

    def flags(self) -> torch.Tensor:
        return flags_from_string(self.robust_flags)

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "EvalRecord":
        return cls.from_dict(json.loads(Path(path).read_text()))


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("aeshield", "torch", "torchvision", "numpy", "safetensors", "pyautoattack"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def manifest(config: dict | None = None, data_hashes: dict | None = None) -> dict:
    """Everything needed to tell how a result was made."""
    return {"config": config or {}, "git_commit": git_commit(), "versions": package_versions(),
            "device": device_description(), "data_hashes": data_hashes or {},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def config_hash(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- configs as dicts: fields added later ---------------------------------------------------
# A field added to a config or spec dataclass after artifacts, cards and records were keyed by
# its dict would change every one of those keys. Declared with ``added_later(default)``, it is
# left out of ``config_dict`` while it holds its default, so every existing key stays as it
# was, and a run that sets it gets keys of its own.
ADDED_LATER = "omit_at_default"


def added_later(default: Any) -> Any:
    """``dataclasses.field(default=...)`` for a field that ``config_dict`` (so artifact keys,
    cards and record keys) leaves out while it holds ``default``. Its metadata also carries
    ``hash_if_default: False`` for ``experiments.config.spec_dict``."""
    return field(default=default, metadata={ADDED_LATER: True, "hash_if_default": False})


def config_dict(config: Any) -> dict:
    """``dataclasses.asdict(config)`` without the fields declared ``added_later`` that hold
    their default, in nested dataclasses (also inside dicts, lists and tuples) too."""
    return _prune(config, asdict(config))


def _prune(value: Any, data: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            held = getattr(value, f.name)
            if f.metadata.get(ADDED_LATER) and held == f.default:
                del data[f.name]
            else:
                _prune(held, data[f.name])
    elif isinstance(value, dict):
        for k, v in value.items():
            _prune(v, data[k])
    elif isinstance(value, (list, tuple)):
        for v, d in zip(value, data):
            _prune(v, d)
    return data
