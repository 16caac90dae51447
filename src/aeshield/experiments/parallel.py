"""Run a target's training jobs and evaluation cells in worker processes.

A target is a small graph: classifiers, their adversarially trained copies and the shields
are artifacts; every (row, classifier, suite) cell is one evaluation record. All of them are
files keyed by what they depend on, so workers can fill the cache in any order; the runner
then renders the table from the records exactly as after a one-process run. Scheduling only
changes wall time, never a number: each cell's attack is seeded by the cell alone.

Why processes and not threads: with two cores, two one-thread workers attacking two small
MNIST pipelines beat one process with two intra-op threads (measured in the notes), and the
slowest training job (an adversarially trained classifier) overlaps with evaluations that do
not need it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..store import ArtifactStore
from .config import ExperimentConfig
from .methods import get_method

logger = logging.getLogger(__name__)


@dataclass
class Task:
    """One unit of work: ``kind`` is classifier / adversarial-training / shield / cell."""
    kind: str
    name: str  # the artifact's config key, or for a cell "row-index/classifier/suite"
    deps: tuple[str, ...] = ()
    cost: float = 0.0  # seconds it took last time, when a record says so; schedules longest first
    done: bool = field(default=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"


class Runner(Protocol):
    """What the scheduler reads of a runner, and what a worker's runner does per task (the
    runner's class is handed to the workers, so this module does not import it)."""

    config: ExperimentConfig
    out_root: Path
    store: ArtifactStore
    use_shipped: bool
    device: str
    row_aliases: dict[str, str]
    timings: dict[str, float]

    def __init__(self, config: ExperimentConfig, out_root: str | Path, *, artifacts: str | Path | None,
                 use_shipped: bool, progress: bool, device: str) -> None: ...
    def classifier_artifact(self, name: str) -> tuple[Path, str]: ...
    def adversarially_trained_artifact(self, name: str) -> tuple[Path, str]: ...
    def shield_artifact(self, name: str) -> tuple[Path, str]: ...
    def record_path(self, row_label: str, classifier: str, suite: str) -> Path: ...
    def classifier(self, name: str) -> Any: ...
    def adversarially_trained(self, name: str) -> Any: ...
    def shield(self, name: str) -> Any: ...
    def evaluate_cell(self, row: Any, classifier: str, suite: Any) -> dict: ...


def default_jobs(device: str = "cpu") -> int:
    """One worker per core on CPU (capped: each worker holds its own copy of the data); one
    process on an accelerator, where the device, not the cores, is the limit."""
    if str(device) != "cpu":
        return 1
    return max(1, min(os.cpu_count() or 1, 4))


def plan(runner: Runner) -> list[Task]:
    """Every task the target still needs, with the artifacts each one waits for."""
    config = runner.config
    tasks = [Task("classifier", name) for name in config.classifiers
             if runner.store.find(*runner.classifier_artifact(name)) is None]
    missing = {t.name for t in tasks}

    def needs(*classifiers: str) -> tuple[str, ...]:
        return tuple(f"classifier:{c}" for c in dict.fromkeys(classifiers) if c in missing)

    at_needed = {c for row in config.rows if row.kind == "adversarial-training"
                 for group in config.groups for c in group.classifiers}
    for name in sorted(at_needed):
        if runner.store.find(*runner.adversarially_trained_artifact(name)) is None:
            tasks.append(Task("adversarial-training", name, needs(name)))
    shields_needed = {row.shield for row in config.rows if row.kind == "shield"}
    for name in sorted(shields_needed):
        if runner.store.find(*runner.shield_artifact(name)) is None:
            # A method trains against exactly the classifiers it declares: their specs are in
            # the shield's hash, so a method that used another one would be a keying bug.
            spec = config.shields[name]
            tasks.append(Task("shield", name, needs(*get_method(spec.method).depends_on(spec))))
    pending = {t.key for t in tasks}
    for r, row in enumerate(config.rows):
        if row.label in runner.row_aliases:
            continue
        for group in config.groups:
            for classifier in group.classifiers:
                for suite in config.suites:
                    if not suite.applies_to(row):
                        continue
                    if row.kind == "natural":
                        deps = (f"classifier:{classifier}",)
                    elif row.kind == "adversarial-training":
                        deps = (f"adversarial-training:{classifier}",)
                    else:  # the shield and the classifier behind it, nothing else
                        deps = (f"shield:{row.shield}", *needs(classifier))
                    cost = _previous_cost(runner, row.label, classifier, suite.name) or \
                        _FIRST_GUESS[row.kind]
                    tasks.append(Task("cell", f"{r}/{classifier}/{suite.name}",
                                      tuple(d for d in deps if d in pending), cost))
    return tasks


# Without a previous record: shielded pipelines are the slow ones (shield + classifier, and
# robust examples run every restart), undefended ones are fooled at the first steps. Below one
# second, so that any measured cost outranks them.
_FIRST_GUESS = {"shield": 0.3, "adversarial-training": 0.2, "natural": 0.1}


def _previous_cost(runner: Runner, row_label: str, classifier: str, suite: str) -> float:
    """Seconds the cell's attacks took when it was last measured (0 if never)."""
    path = runner.record_path(row_label, classifier, suite)
    try:
        return float(sum(a.get("seconds", 0.0) for a in json.loads(path.read_text())["attacks"]))
    except (OSError, KeyError, TypeError, ValueError):
        return 0.0


def run_parallel(runner: Runner, jobs: int) -> dict[str, float]:
    """Fill the runner's cache and records with ``jobs`` worker processes; returns the
    workers' timings (training and evaluation seconds by task)."""
    tasks = plan(runner)
    if not tasks:
        return {}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    settings = (type(runner), runner.config, str(runner.out_root), str(runner.store.root),
                runner.use_shipped, runner.device)
    by_key = {t.key: t for t in tasks}
    timings: dict[str, float] = {}
    in_flight: dict[Future, Task] = {}
    start = time.perf_counter()
    logger.info("%d task(s) on %d worker process(es), %d thread(s) each", len(tasks), jobs, threads)
    context = multiprocessing.get_context("spawn")  # fork after torch's threads start is unsafe
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                             initargs=(threads, logging.getLogger().getEffectiveLevel())) as pool:
        while True:
            ready = [t for t in tasks if not t.done and t not in in_flight.values()
                     and all(by_key[d].done for d in t.deps)]
            # Training first (it unblocks others), then the cells that took longest last time.
            ready.sort(key=lambda t: (t.kind == "cell", -t.cost))
            for task in ready[:jobs - len(in_flight)]:
                in_flight[pool.submit(_run_task, settings, task)] = task
            if not in_flight:
                break
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                task = in_flight.pop(future)
                try:
                    timings.update(future.result())
                except BaseException:
                    for other in in_flight:
                        other.cancel()
                    logger.error("task %s failed; stopping the other workers", task.key)
                    raise
                task.done = True
                logger.info("done %s (%d/%d, %.0fs elapsed)", task.key,
                            sum(t.done for t in tasks), len(tasks), time.perf_counter() - start)
    return timings


_WORKER_RUNNERS: dict[tuple, Runner] = {}


def _init_worker(threads: int, log_level: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format="%(asctime)s [worker %(process)d] %(message)s")


def _run_task(settings: tuple, task: Task) -> dict[str, float]:
    runner_class, config, out_root, artifacts, use_shipped, device = settings
    key = (config.name, config.profile, out_root, artifacts, use_shipped, device)
    runner = _WORKER_RUNNERS.get(key)
    if runner is None:
        runner = runner_class(config, out_root, artifacts=artifacts, use_shipped=use_shipped,
                        progress=False, device=device)
        _WORKER_RUNNERS[key] = runner
    before = dict(runner.timings)
    if task.kind == "classifier":
        runner.classifier(task.name)
    elif task.kind == "adversarial-training":
        runner.adversarially_trained(task.name)
    elif task.kind == "shield":
        runner.shield(task.name)
    else:
        index, classifier, suite_name = task.name.split("/")
        runner.evaluate_cell(config.rows[int(index)], classifier,
                             next(s for s in config.suites if s.name == suite_name))
    return {k: v for k, v in runner.timings.items() if before.get(k) != v}


__all__ = ["Task", "default_jobs", "plan", "run_parallel"]
