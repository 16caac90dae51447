"""Ctrl-C and SIGTERM stop a command cleanly (issue 24): every process of it gone within 5 s, no
temporary file left, exit status 130/143 with one line on stderr, and the same command run again
finishes with what an uninterrupted run writes."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aeshield.data import cache_dir

ROOT = Path(__file__).resolve().parents[1]
DATA = cache_dir() / "data"
STOP_SECONDS = 5.0


def end_to_end(test):
    """A real command in a subprocess, on real MNIST, watched through /proc."""
    for mark in (pytest.mark.slow,
                 pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
                 pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="needs MNIST in the cache")):
        test = mark(test)
    return test


def _compare_runs():
    spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "scripts" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compare


def _cache(root: Path) -> Path:
    """A fresh cache whose data is the real one (no refetching)."""
    cache = root / "cache"
    cache.mkdir(parents=True)
    (cache / "data").symlink_to(DATA.resolve())
    return cache


def _env(cache: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "AESHIELD_CACHE": str(cache), "PYTHONPATH": path}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "aeshield.cli", *args]


def _start(args: list[str], cache: Path, log: Path) -> subprocess.Popen:
    # Its own session, as a shell job is: Ctrl-C is then SIGINT to that process group. SIGINT
    # as at a terminal, even where these tests run as a background job (which ignores it).
    return subprocess.Popen(_command(*args), env=_env(cache), stdout=subprocess.DEVNULL,
                            stderr=log.open("w"), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``: the command, its workers, the
    multiprocessing resource tracker, and any orphan of theirs (an orphan keeps the group)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(entry.name))
    return alive


def _running(*pids: int) -> list[int]:
    """Those of ``pids`` that are still running (not gone, not a zombie)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            running.append(pid)
    return running


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the command ended (status {proc.returncode}) before it could be interrupted"
        assert time.monotonic() < deadline, "the command did not get going"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, send) -> float:
    """Send a signal with ``send()``; the seconds until no process of the command is left."""
    pgid = proc.pid
    start = time.monotonic()
    send()
    while _group(pgid):
        elapsed = time.monotonic() - start
        if elapsed > STOP_SECONDS:
            left = _group(pgid)
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"processes {left} still running {elapsed:.1f}s after the signal")
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    proc.wait(timeout=STOP_SECONDS)
    return elapsed


def _temp_files(*roots: Path) -> list[Path]:
    """Files named as atomic writes name their temporary files."""
    return [p for root in roots for p in root.rglob(".*")
            if p.is_file() and (".tmp" in p.name or p.name.endswith(".tmp"))]


def _assert_reported(log: Path, signame: str, status: int, proc: subprocess.Popen) -> None:
    text = log.read_text()
    assert proc.returncode == status, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    last = text.rstrip().splitlines()[-1].split("\r")[-1]
    assert f"interrupted by {signame}" in last and "again" in last, text[-3000:]
    assert sum("interrupted by" in line for line in text.splitlines()) == 1, text[-3000:]


REPRODUCE = ("reproduce", "demo", "--smoke", "--no-progress", "--jobs", "2")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The tree an uninterrupted smoke run of the demo target writes."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cache = _cache(root)
    done = subprocess.run(_command(*REPRODUCE, "--out", str(root / "out")), env=_env(cache),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "out"


def _interrupt_reproduce(tmp_path: Path, uninterrupted: Path, started, send, signame: str,
                         status: int) -> float:
    cache, out, log = _cache(tmp_path), tmp_path / "out", tmp_path / "stderr.log"
    proc = _start([*REPRODUCE, "--out", str(out)], cache, log)
    try:
        _wait_for(lambda: started(out), proc)
        elapsed = _stop(proc, lambda: send(proc))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _assert_reported(log, signame, status, proc)
    assert _temp_files(out, cache) == []
    assert not (out / "demo" / "quick-smoke" / "table.json").exists()  # it was stopped midway
    again = subprocess.run(_command(*REPRODUCE, "--out", str(out)), env=_env(cache),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _compare_runs()(uninterrupted, out) == []
    assert _temp_files(out, cache) == []
    return elapsed


@end_to_end
def test_sigterm_stops_reproduce_and_its_workers_and_a_rerun_completes_it(tmp_path, uninterrupted):
    # SIGTERM to the command alone (`kill PID`): its workers must not outlive it. Sent once
    # evaluation has begun, so that records, artifacts and work in progress all exist.
    def evaluating(out: Path) -> bool:
        return any((out / "demo" / "quick-smoke" / "records").glob("*.json"))

    elapsed = _interrupt_reproduce(tmp_path, uninterrupted, evaluating,
                                   lambda proc: os.kill(proc.pid, signal.SIGTERM), "SIGTERM", 143)
    print(f"stopped {elapsed:.2f}s after SIGTERM")


@end_to_end
def test_ctrl_c_stops_reproduce_and_its_workers_and_a_rerun_completes_it(tmp_path, uninterrupted):
    # Ctrl-C in a terminal: SIGINT to the whole process group, workers included, during training.
    def training(out: Path) -> bool:
        return any((out / "artifacts").glob("*.safetensors"))

    elapsed = _interrupt_reproduce(tmp_path, uninterrupted, training,
                                   lambda proc: os.killpg(proc.pid, signal.SIGINT), "SIGINT", 130)
    print(f"stopped {elapsed:.2f}s after SIGINT")


TRAIN = ("train", "classifier", "--model", "mnist-a", "--dataset", "mnist", "--epochs", "2",
         "--train-limit", "640", "--batch-size", "64")


@end_to_end
def test_sigterm_stops_train_and_a_rerun_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    cache = _cache(tmp_path)
    reference = tmp_path / "reference" / "a.safetensors"
    done = subprocess.run(_command(*TRAIN, "--out", str(reference)), env=_env(cache),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    weights, log = tmp_path / "resumed" / "a.safetensors", tmp_path / "stderr.log"
    proc = _start([*TRAIN, "--out", str(weights)], cache, log)
    try:  # once the first epoch's checkpoint is written
        _wait_for(lambda: weights.with_suffix(".ckpt").exists(), proc)
        _stop(proc, lambda: os.kill(proc.pid, signal.SIGTERM))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _assert_reported(log, "SIGTERM", 143, proc)
    assert _temp_files(tmp_path) == []
    assert not weights.exists() and weights.with_suffix(".ckpt").exists()

    again = subprocess.run(_command(*TRAIN, "--out", str(weights)), env=_env(cache),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    expected, got = load_file(reference), load_file(weights)
    assert expected.keys() == got.keys()
    assert all(expected[k].equal(got[k]) for k in expected)
    assert _temp_files(tmp_path) == []


# ---- the pieces, in process ------------------------------------------------------------------

def test_signals_noted_while_the_pool_runs_go_on_to_the_previous_handler():
    from aeshield.experiments.parallel import _Signals

    got = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with _Signals() as signals:
            signal.raise_signal(signal.SIGTERM)
            assert signals.received == [signal.SIGTERM] and got == []
            signals.redeliver()
            assert got == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is not signals._note
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_worker_deaf_to_sigterm_is_killed_and_only_its_temporary_files_are_removed(tmp_path, monkeypatch):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from aeshield.experiments import parallel
    from aeshield.io import is_temp_file

    monkeypatch.setattr(parallel, "STOP_GRACE_SECONDS", 0.5)
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    pool.submit(signal.signal, signal.SIGTERM, signal.SIG_IGN).result(timeout=60)
    (pid,) = list(pool._processes)
    stuck = pool.submit(time.sleep, 60)
    while not stuck.running():  # handed to the worker: too late to cancel
        time.sleep(0.01)
    theirs = tmp_path / "records" / f".cell.json.{pid}.abcd_123.tmp"
    ours = tmp_path / f".cell.json.{os.getpid()}.abcd_123.tmp"  # another writer's, still writing
    finished = tmp_path / "records" / "cell.json"
    for path in (theirs, ours, finished):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    assert is_temp_file(theirs, pid) and not is_temp_file(ours, pid) and not is_temp_file(finished)
    start = time.monotonic()
    parallel._stop_workers(pool, (tmp_path,))
    assert 0.5 <= time.monotonic() - start < STOP_SECONDS
    deadline = time.monotonic() + 2  # its files are closed (the sentinel) a moment before it is gone
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _running(pid) == []
    assert not theirs.exists() and ours.exists() and finished.exists()


def test_a_command_stopped_by_a_signal_exits_128_plus_its_number_with_one_line():
    import click
    from click.testing import CliRunner

    from aeshield.cli.signals import Interrupted, exit_code, install_signal_handlers

    @click.group()
    def cli():
        install_signal_handlers()

    @cli.command("train")
    def stopped():
        try:
            signal.raise_signal(signal.SIGTERM)
        finally:
            signal.raise_signal(signal.SIGINT)  # a second signal while unwinding is ignored

    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(cli, ["train"])
    assert isinstance(result.exception, Interrupted)
    assert result.exit_code == exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGINT) == 130
    assert result.output.strip().splitlines() == [  # stderr (mixed into output before click 8.2)
        "aeshield: interrupted by SIGTERM; nothing half-written was left. "
        "Run the same command again to resume where it stopped."]
    assert signal.getsignal(signal.SIGTERM) is before
