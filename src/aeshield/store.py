"""The artifact store: trained weights cached under a hash of what they depend on.

An artifact (a classifier, an adversarially trained copy, a shield, a stage of one) is the file
``<root>/<kind>-<key>.safetensors`` with its JSON sidecar, where ``key`` hashes the artifact's
kind, its spec and the training data. The same spec hash, stamped into a sidecar as
``spec_hash``, finds a file shipped with the package instead (``models.io.shipped_dir``).

The store also remembers what it loaded in this process: the module under a name of the
caller's choosing ("A", "AT-A", "shield-s") and the file it came from, with the file's SHA-256
prefix, so that records can say which bytes they were measured on.

Processes may share a store: an artifact is trained under its lock file (:meth:`ArtifactStore.lock`),
and every file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .records import config_hash
from .io import file_lock, lock_path, write_json_atomic
from .models import io as weights_io


@dataclass(frozen=True)
class Source:
    """Where a loaded module's weights came from."""

    file: str
    sha256_16: str
    origin: str  # "shipped" | "trained (cache)"

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "sha256_16": self.sha256_16, "origin": self.origin}


class ArtifactStore:
    """Hash-keyed weight files under ``root`` for one training set (``data_hash``)."""

    def __init__(self, root: str | Path, data_hash: str, use_shipped: bool = True) -> None:
        self.root = Path(root)
        self.data_hash = data_hash
        self.use_shipped = use_shipped
        self._loaded: dict[str, nn.Module] = {}
        self._files: dict[str, Path] = {}
        self.sources: dict[str, dict[str, str]] = {}

    # ---- keys and files ------------------------------------------------------------------
    def key(self, kind: str, spec: Any) -> str:
        return config_hash({"kind": kind, "spec": spec, "data": self.data_hash})

    def path(self, kind: str, spec: Any) -> tuple[Path, str]:
        """The cache file of an artifact and its key (the file need not exist)."""
        key = self.key(kind, spec)
        return self.root / f"{kind}-{key}.safetensors", key

    def find(self, path: Path, key: str) -> Path | None:
        """The shipped file of this key if there is one (unless ``use_shipped`` is off), else
        the cached ``path`` if it is complete (:meth:`complete`). Shipped first: those are the
        bytes a clean checkout evaluates, so the records a maintainer commits after ``--ship``
        are the ones every user finds up to date (cache first had kept them on the float32
        originals, stale everywhere else)."""
        shipped = weights_io.shipped_dir()
        if self.use_shipped and shipped.exists():
            for side in sorted(shipped.glob("*.json")):
                try:
                    if json.loads(side.read_text()).get("spec_hash") == key:
                        return side.with_suffix(".safetensors")
                except (OSError, json.JSONDecodeError):
                    continue
        return path if self.complete(path, key) else None

    @staticmethod
    def complete(path: Path, key: str) -> bool:
        """Whether the cached ``path`` is a finished artifact of ``key``: training writes the
        weights, then their sidecar, then stamps ``key`` into it (:meth:`stamp`), each file
        atomically, so a run stopped between those writes left weights that do not count yet
        (the next run trains them again, from the checkpoint where one remains)."""
        try:
            return path.exists() and json.loads(path.with_suffix(".json").read_text()).get("spec_hash") == key
        except (OSError, ValueError):
            return False

    @staticmethod
    def lock(path: Path) -> AbstractContextManager[bool]:
        """Held while the artifact ``path`` is trained (``<file>.lock`` beside it), so that two
        processes sharing this store train it once: the second waits, then finds the file (the
        caller looks again once it holds the lock)."""
        return file_lock(lock_path(path), f"training {path.name}")

    @staticmethod
    def stamp(path: Path, key: str) -> None:
        """Write ``key`` into the sidecar of a freshly trained file, so that a shipped copy of
        it is found by the same key."""
        side = path.with_suffix(".json")
        data = json.loads(side.read_text())
        data["spec_hash"] = key
        write_json_atomic(side, data)

    # ---- loading and saving ----------------------------------------------------------------
    def load_weights(self, path: Path, **kwargs: Any) -> nn.Module:
        """``models.io.load_weights`` of ``path``: the module alone."""
        model, _ = weights_io.load_weights(path, **kwargs)
        return model

    @staticmethod
    def save_weights(model: nn.Module, path: Path, **kwargs: Any) -> Path:
        return weights_io.save_weights(model, path, **kwargs)

    # ---- what this process loaded --------------------------------------------------------
    def loaded(self, name: str) -> nn.Module | None:
        return self._loaded.get(name)

    def remember(self, name: str, model: nn.Module, path: Path) -> nn.Module:
        """Keep ``model`` under ``name`` and note the file it came from."""
        self._files[name] = path
        self.sources[name] = source_of(path).to_dict()
        self._loaded[name] = model
        return model

    def file_of(self, name: str) -> Path:
        """The weight file a remembered module was loaded from."""
        return self._files[name]

    def weight_hashes(self, names: Any) -> dict[str, str]:
        """SHA-256 prefixes of loaded weight files, by name ("A", "AT-A", "shield-s")."""
        return {n: self.sources[n]["sha256_16"] for n in names if n in self.sources}


def source_of(path: Path) -> Source:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    origin = "shipped" if path.parent == weights_io.shipped_dir() else "trained (cache)"
    return Source(path.name, digest, origin)


__all__ = ["ArtifactStore", "Source", "source_of"]
