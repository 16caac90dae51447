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

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
              pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="needs MNIST in the cache")]


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
    # Its own session, as a shell job is: Ctrl-C is then SIGINT to that process group.
    return subprocess.Popen(_command(*args), env=_env(cache), stdout=subprocess.DEVNULL,
                            stderr=log.open("w"), start_new_session=True)


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


def test_sigterm_stops_reproduce_and_its_workers_and_a_rerun_completes_it(tmp_path, uninterrupted):
    # SIGTERM to the command alone (`kill PID`): its workers must not outlive it. Sent once
    # evaluation has begun, so that records, artifacts and work in progress all exist.
    def evaluating(out: Path) -> bool:
        return any((out / "demo" / "quick-smoke" / "records").glob("*.json"))

    elapsed = _interrupt_reproduce(tmp_path, uninterrupted, evaluating,
                                   lambda proc: os.kill(proc.pid, signal.SIGTERM), "SIGTERM", 143)
    print(f"stopped {elapsed:.2f}s after SIGTERM")


def test_ctrl_c_stops_reproduce_and_its_workers_and_a_rerun_completes_it(tmp_path, uninterrupted):
    # Ctrl-C in a terminal: SIGINT to the whole process group, workers included, during training.
    def training(out: Path) -> bool:
        return any((out / "artifacts").glob("*.safetensors"))

    elapsed = _interrupt_reproduce(tmp_path, uninterrupted, training,
                                   lambda proc: os.killpg(proc.pid, signal.SIGINT), "SIGINT", 130)
    print(f"stopped {elapsed:.2f}s after SIGINT")


TRAIN = ("train", "classifier", "--model", "mnist-a", "--dataset", "mnist", "--epochs", "3",
         "--train-limit", "1000", "--batch-size", "32")


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
