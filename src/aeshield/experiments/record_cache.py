"""Measured numbers of analyses and selections, one JSON file each, recomputed only when what
they depend on changed."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..io import write_json_atomic
from ..records import config_hash
from ..stats import restate_mean_intervals

logger = logging.getLogger(__name__)


class RecordCache:
    """``<folder>/<name>.json`` keyed by a hash of its spec and the test data (``data_hash``).

    ``labels`` (target, profile, dataset, data source) are written into every record;
    ``timings`` receives the seconds of every computation (the caller's dict)."""

    def __init__(self, folder: Path, data_hash: str, labels: dict[str, Any],
                 timings: dict[str, float] | None = None) -> None:
        self.folder = Path(folder)
        self.data_hash = data_hash
        self.labels = dict(labels)
        self.timings = {} if timings is None else timings

    def get(self, name: str, spec: dict, compute: Callable[[], dict]) -> dict:
        """The record ``name``: the stored one if ``spec`` (everything the numbers depend on)
        is unchanged, else ``compute()`` (a JSON-able dict) stored with its spec."""
        key = config_hash({"spec": spec, "data": self.data_hash})
        path = self.folder / f"{name}.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
                if old.get("spec_hash") == key:
                    logger.info("record %s is up to date", path.name)
                    return self._restated(path, old)
            except json.JSONDecodeError:
                logger.warning("record %s is corrupt; recomputing", path)
        start = time.perf_counter()
        result = {**compute(), "spec": spec, "spec_hash": key, **self.labels}
        write_json_atomic(path, result)
        self.timings[f"analysis {name}"] = time.perf_counter() - start
        return result

    @staticmethod
    def _restated(path: Path, record: dict) -> dict:
        """A stored record whose mean intervals an earlier ``stats.mean_interval`` computed,
        restated (and rewritten) as the current one computes them: nothing else in it changes,
        so there is nothing to recompute."""
        record, count = restate_mean_intervals(record)
        if count:
            write_json_atomic(path, record)
            logger.info("record %s: %d mean interval(s) restated as Student t intervals", path.name, count)
        return record


def slug(text: str) -> str:
    """A row label as it appears in record file names."""
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


__all__ = ["RecordCache", "slug"]
