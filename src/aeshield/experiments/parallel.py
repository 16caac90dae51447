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

import atexit
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..io import remove_temp_files
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


def plan(runner: Runner, *, before_selections: bool = False) -> list[Task]:
    """Every task the target still needs, with the artifacts each one waits for.

    ``before_selections``: the training tasks only, and none at all unless a validation
    selection waits for one of them (a candidate shield or the selection's classifier) and
    there are at least two. The runner runs these in its workers before it resolves the
    selections, which would otherwise train their candidates one after another in its own
    process.
    """
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
    candidates = {name for selection in config.selections.values() for name in selection.among}
    shields_needed = {row.shield for row in config.rows if row.kind == "shield" and row.shield}
    for name in sorted(shields_needed | candidates):
        if runner.store.find(*runner.shield_artifact(name)) is None:
            # A method trains against exactly the classifiers it declares: their specs are in
            # the shield's hash, so a method that used another one would be a keying bug.
            spec = config.shields[name]
            tasks.append(Task("shield", name, needs(*get_method(spec.method).depends_on(spec))))
    if before_selections:
        awaited = {f"shield:{name}" for name in candidates} | \
            {f"classifier:{selection.classifier}" for selection in config.selections.values()}
        # One task alone gains nothing from the workers, and the runner's own process trains
        # it on every thread.
        return tasks if len(tasks) > 1 and any(t.key in awaited for t in tasks) else []
    pending = {t.key for t in tasks}
    for r, row in enumerate(config.rows):
        if row.label in runner.row_aliases:
            continue
        for group in config.groups:
            for classifier in group.classifiers:
                for suite in config.suites:
                    if not suite.applies_to(row, classifier):
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


def run_parallel(runner: Runner, jobs: int, *, before_selections: bool = False) -> dict[str, float]:
    """Fill the runner's cache and records with ``jobs`` worker processes; returns the
    workers' timings (training and evaluation seconds by task). ``before_selections``: only
    the training that ``plan`` lists for it.

    Ctrl-C (SIGINT) or SIGTERM stops every worker within a few seconds: the workers unwind
    their task (an atomic write removes its temporary file; finished files and training
    checkpoints stay, so the next run resumes), one still running after ``STOP_GRACE_SECONDS``
    is killed and its temporary files removed, and then the signal goes on to the handler that
    was there before (the CLI's, Python's KeyboardInterrupt, or the default). A failing task
    stops the other workers the same way before its exception propagates.
    """
    tasks = plan(runner, before_selections=before_selections)
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
    folders = (Path(runner.out_root), Path(runner.store.root))  # where workers write
    with _Signals() as signals:
        pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                   initargs=(threads, logging.getLogger().getEffectiveLevel()))
        try:
            while not signals.received:
                ready = [t for t in tasks if not t.done and t not in in_flight.values()
                         and all(by_key[d].done for d in t.deps)]
                # Training first (it unblocks others), then the cells that took longest last time.
                ready.sort(key=lambda t: (t.kind == "cell", -t.cost))
                for task in ready[:jobs - len(in_flight)]:
                    in_flight[pool.submit(_run_task, settings, task)] = task
                if not in_flight:
                    break
                # A timeout, so that a noted signal is acted on within a fraction of a second.
                finished, _ = wait(in_flight, timeout=_POLL_SECONDS, return_when=FIRST_COMPLETED)
                if signals.received:
                    break
                for future in finished:
                    task = in_flight.pop(future)
                    try:
                        timings.update(future.result())
                    except _Stop:  # someone sent that worker SIGTERM: the run stops as if we got it
                        logger.warning("the worker running %s was terminated", task.key)
                        signals.received.append(signal.SIGTERM)
                        break
                    except BaseException:
                        logger.error("task %s failed; stopping the other workers", task.key)
                        raise
                    task.done = True
                    logger.info("done %s (%d/%d, %.0fs elapsed)", task.key,
                                sum(t.done for t in tasks), len(tasks), time.perf_counter() - start)
        except BaseException:
            _stop_workers(pool, folders)
            signals.redeliver()  # a signal that came meanwhile wins (a worker it killed broke the pool)
            raise
        if signals.received:
            logger.info("signal %d: stopping %d worker process(es)", signals.received[0], jobs)
            _stop_workers(pool, folders)
            signals.redeliver()
            # The previous handler returned (or there was none of ours): the run cannot go on.
            raise KeyboardInterrupt(f"stopped by signal {signals.received[0]}")
        pool.shutdown(wait=True)
    return timings


def run_ranks(runner: Runner, *, before_selections: bool = False) -> dict[str, float]:
    """Under ``torchrun``: every task of the plan on one rank, as the worker processes of
    ``run_parallel`` share them on one machine. Rank 0 plans; the tasks go in dependency levels
    (classifiers, then what trains on them, then the cells), each level dealt to the ranks
    longest first onto the least loaded, with a barrier between levels. Each task runs as if
    its rank were alone (``distributed.alone``), so a record is the one a single process writes.
    The artifacts and records are files: on several nodes, the artifact cache and the output
    folder must be on a disk they share. Returns every rank's timings. ``before_selections``:
    only the training that ``plan`` lists for it."""
    from .. import distributed

    world = distributed.world()
    tasks = distributed.broadcast_object(
        plan(runner, before_selections=before_selections) if world.main else None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for depth, level in enumerate(_levels(tasks)):
        shares = _deal(level, world.size)
        mine = shares[world.rank]
        logger.info("level %d: %s", depth, "; ".join(
            f"rank {r}: {', '.join(t.key for t in share) or 'nothing'}" for r, share in enumerate(shares)))
        with distributed.alone():
            for task in mine:
                timings.update(_run_on(runner, task))
                logger.info("done %s (%.0fs elapsed)", task.key, time.perf_counter() - start)
        distributed.barrier()
    merged: dict[str, float] = {}
    for part in distributed.all_gather_object(timings):
        merged.update(part)
    return merged


_TRAINING_WEIGHT = 1e6


def _levels(tasks: list[Task]) -> list[list[Task]]:
    """The tasks by depth in their dependency graph: a task's level is one more than its deepest
    dependency's (dependencies outside the list are done already)."""
    by_key = {t.key: t for t in tasks}
    depth: dict[str, int] = {}

    def level(task: Task) -> int:
        if task.key not in depth:
            depth[task.key] = 1 + max((level(by_key[d]) for d in task.deps if d in by_key), default=-1)
        return depth[task.key]

    out: list[list[Task]] = []
    for task in tasks:
        d = level(task)
        out.extend([] for _ in range(d + 1 - len(out)))
        out[d].append(task)
    return out


def _deal(tasks: list[Task], ranks: int) -> list[list[Task]]:
    """Longest first, each task to the rank with the least work so far (then the fewest tasks).
    A training job outweighs any cell (its cost is not measured in advance)."""
    shares: list[list[Task]] = [[] for _ in range(ranks)]
    load = [0.0] * ranks
    for task in sorted(tasks, key=lambda t: (t.kind == "cell", -t.cost)):
        r = min(range(ranks), key=lambda i: (load[i], len(shares[i]), i))
        shares[r].append(task)
        load[r] += task.cost if task.kind == "cell" else _TRAINING_WEIGHT
    return shares


STOP_GRACE_SECONDS = 3.0  # a worker's time to unwind its task after SIGTERM before it is killed
_POLL_SECONDS = 0.2


class _Signals:
    """While the pool runs, SIGINT and SIGTERM are noted rather than raised in the middle of the
    executor's bookkeeping; the loop then stops the workers and hands the signal on to the
    handler that was installed before (:meth:`redeliver`). Signals ignored before stay ignored;
    off the main thread (where handlers cannot be set) nothing changes."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous = signal.getsignal(signum)
                if previous in (signal.SIG_IGN, None):
                    continue
                self._previous[signum] = previous
                signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _note(self, signum: int, frame: Any) -> None:
        self.received.append(signum)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def redeliver(self) -> None:
        """Put the previous handlers back and raise the first noted signal again, so that its
        handler (or the default action) runs now; a signal that came from a worker's result,
        not to a handler of ours, is left to the caller."""
        installed = set(self._previous)
        self._restore()
        if self.received and self.received[0] in installed:
            signal.raise_signal(self.received[0])


def _stop_workers(pool: ProcessPoolExecutor, folders: tuple[Path, ...]) -> None:
    """Cancel what has not started, SIGTERM every worker (they unwind their task and exit),
    SIGKILL any still alive after ``STOP_GRACE_SECONDS``, then remove whatever temporary files
    the workers left under ``folders`` (their names carry the writer's pid)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        _signal_process(process, signal.SIGTERM)
    alive = _alive(processes, STOP_GRACE_SECONDS)
    for process in alive:
        logger.warning("worker %d did not stop within %.0fs; killing it", process.pid, STOP_GRACE_SECONDS)
        _signal_process(process, signal.SIGKILL)
    _alive(alive, 2.0)
    pids = {p.pid for p in processes if p.pid is not None}
    for folder in folders:
        for path in remove_temp_files(folder, pids):
            logger.info("removed %s, left by a stopped worker", path)
    pool.shutdown(wait=True)


def _signal_process(process: Any, signum: int) -> None:
    if not _alive([process]):
        return
    try:
        os.kill(process.pid, signum)
    except ProcessLookupError:
        pass  # gone meanwhile


def _alive(processes: list, timeout: float = 0.0) -> list:
    """The ``processes`` still running after waiting up to ``timeout`` seconds for them to exit.
    Read from their sentinels (readable once a process has exited), not from ``exitcode``: the
    pool's own thread may reap them concurrently."""
    deadline = time.monotonic() + timeout
    alive = list(processes)
    while alive:
        ready = set(multiprocessing.connection.wait([p.sentinel for p in alive],
                                                    timeout=max(0.0, deadline - time.monotonic())))
        alive = [p for p in alive if p.sentinel not in ready]
        if time.monotonic() >= deadline:
            break
    return alive


_WORKER_RUNNERS: dict[tuple, Runner] = {}

# A worker's state as SIGTERM sees it. A stop is cooperative: the task unwinds (an atomic write
# removes its temporary file), its _Stop goes back to the pool as the task's result, and the
# worker then exits normally on the pool's end-of-work sentinel, so that its exit handlers run
# (a worker ended with os._exit leaves semaphores that the resource tracker complains about).
_IN_TASK = False
_STOPPING = False


class _Stop(BaseException):
    """SIGTERM in a worker, raised inside its task so that the task unwinds before the worker
    exits."""


def _on_sigterm(signum: int, frame: Any) -> None:
    global _STOPPING
    first, _STOPPING = not _STOPPING, True
    if _IN_TASK:
        if first:
            raise _Stop
        return  # already unwinding: the parent kills a worker that takes too long
    if _parent_gone():
        raise SystemExit(128 + signum)  # orphaned (the parent was killed): no sentinel will come
    # Idle: the pool's sentinel ends this worker once the running tasks are back.


def _init_worker(threads: int, log_level: int) -> None:
    # Ctrl-C reaches every process of the terminal's group: the parent stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _watch_parent()
    atexit.register(_exit_now_if_stopped)
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format="%(asctime)s [worker %(process)d] %(message)s")


def _exit_now_if_stopped() -> None:
    """A stopped worker's last exit handler (its multiprocessing finalizers have run by then):
    skip the interpreter's teardown, which frees the runner's tensors and modules one by one
    and takes seconds on a busy machine."""
    if _STOPPING:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(128 + signal.SIGTERM)


def _watch_parent() -> None:
    """A thread that sends this worker SIGTERM when the parent process is gone (killed with
    SIGKILL, say, which no handler of the parent sees): the worker then stops as on the
    parent's SIGTERM, and exits since no end-of-work sentinel will come."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="aeshield-parent-watch", daemon=True).start()


def _parent_gone() -> bool:
    parent = multiprocessing.parent_process()
    return parent is not None and bool(multiprocessing.connection.wait([parent.sentinel], timeout=0))


def _run_task(settings: tuple, task: Task) -> dict[str, float]:
    global _IN_TASK
    _IN_TASK = True
    try:
        if _STOPPING:
            raise _Stop
        return _run(settings, task)
    except _Stop:
        logger.info("stopped during %s", task.key)
        if _parent_gone():
            os._exit(128 + signal.SIGTERM)  # orphaned: the pool will never end this worker
        raise
    finally:
        _IN_TASK = False


def _run(settings: tuple, task: Task) -> dict[str, float]:
    runner_class, config, out_root, artifacts, use_shipped, device = settings
    key = (config.name, config.profile, out_root, artifacts, use_shipped, device)
    runner = _WORKER_RUNNERS.get(key)
    if runner is None:
        runner = runner_class(config, out_root, artifacts=artifacts, use_shipped=use_shipped,
                        progress=False, device=device)
        _WORKER_RUNNERS[key] = runner
    return _run_on(runner, task)


def _run_on(runner: Runner, task: Task) -> dict[str, float]:
    """Run one task with ``runner``; returns the timings it added."""
    config = runner.config
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


__all__ = ["Task", "default_jobs", "plan", "run_parallel", "run_ranks"]
