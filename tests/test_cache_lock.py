"""A cache shared by two processes (or threads) at once: a dataset is fetched, an artifact trained,
once; the second caller waits for the first and then uses what it produced."""

from __future__ import annotations

import hashlib
import importlib
import threading
import time
from pathlib import Path

from torch import nn

from aeshield.experiments.zoo import ModelZoo
from aeshield.io import file_lock, lock_path, write_bytes_atomic, write_json_atomic
from aeshield.store import ArtifactStore

fetch_mod = importlib.import_module("aeshield.data.fetch")  # the package exports a function of that name
SLOW = 0.4  # seconds a fake producer takes: long enough for the other caller to arrive meanwhile


def _at_once(call, n: int = 2) -> list:
    """Run ``call()`` in ``n`` threads released together; their results (re-raising a failure)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the test thread below
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_the_second_holder_of_a_file_lock_waits_for_the_first(tmp_path):
    spans = []

    def hold() -> bool:
        with file_lock(tmp_path / "x.lock") as locked:
            start = time.monotonic()
            time.sleep(SLOW / 2)
            spans.append((start, time.monotonic()))
            return locked

    assert _at_once(hold) == [True, True]
    (a_start, a_end), (b_start, b_end) = sorted(spans)
    assert b_start >= a_end  # one after the other, never both inside
    assert lock_path(tmp_path / "w.safetensors") == tmp_path / "w.safetensors.lock"


def test_two_fetches_of_one_dataset_into_one_cache_download_it_once(tmp_path, monkeypatch):
    files = {name: f"fake {name}".encode() for name in fetch_mod.IDX_FILES}
    checksums = {f"mnist/{name}": hashlib.sha256(data).hexdigest() for name, data in files.items()}
    monkeypatch.setattr(fetch_mod, "expected_checksums", lambda: checksums)
    downloads = []

    def slow_source(staging: Path) -> None:
        downloads.append(threading.get_ident())
        time.sleep(SLOW)
        for name, data in files.items():
            (staging / name).write_bytes(data)

    monkeypatch.setattr(fetch_mod, "_idx_sources", lambda name: [fetch_mod._Source("fake mirror", slow_source)])
    first, second = _at_once(lambda: fetch_mod.fetch_info("mnist", root=tmp_path))
    assert len(downloads) == 1
    assert first == second and first.path == tmp_path / "data" / "mnist"
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == files  # no staging folder left
    assert (tmp_path / "data" / "mnist.lock").exists()


def test_two_runners_missing_one_artifact_train_it_once_and_both_load_it(tmp_path):
    trainings, loaded = [], []

    def one_runner() -> Path:
        # What each process has: its own store object and zoo over the same folder.
        store = ArtifactStore(tmp_path / "artifacts", data_hash="d", use_shipped=False)
        zoo = ModelZoo.__new__(ModelZoo)
        zoo.store, zoo.timings = store, {}
        path, key = store.path("classifier", {"model": "fake"})

        def train() -> None:  # as the zoo's trainers do: weights, sidecar, then the key stamped in
            trainings.append(threading.get_ident())
            time.sleep(SLOW)
            write_bytes_atomic(path, b"weights")
            write_json_atomic(path.with_suffix(".json"), {"architecture": "fake"})
            store.stamp(path, key)

        def load(found: Path) -> nn.Module:
            loaded.append(found.read_bytes())
            return nn.Identity()

        zoo._artifact("A", path, key, "train classifier A", train, load)
        return store.file_of("A")

    first, second = _at_once(one_runner)
    assert len(trainings) == 1
    assert first == second and loaded == [b"weights", b"weights"]
    assert first.with_name(first.name + ".lock").exists()


def test_an_artifact_lock_serializes_more_than_two_callers(tmp_path, n=3):
    produced = []
    target = tmp_path / "shield-x.safetensors"

    def produce() -> bytes:
        with ArtifactStore.lock(target):
            if not target.exists():
                produced.append(1)
                time.sleep(SLOW / 2)
                write_bytes_atomic(target, b"once")
        return target.read_bytes()

    assert _at_once(produce, n) == [b"once"] * n
    assert produced == [1]


def test_weights_whose_sidecar_was_not_stamped_yet_do_not_count_as_trained(tmp_path):
    # A run stopped between writing the weights and stamping their sidecar: train them again.
    store = ArtifactStore(tmp_path, data_hash="d", use_shipped=False)
    path, key = store.path("classifier", {"model": "fake"})
    write_bytes_atomic(path, b"weights")
    assert store.find(path, key) is None
    write_json_atomic(path.with_suffix(".json"), {"architecture": "fake"})
    assert store.find(path, key) is None
    store.stamp(path, key)
    assert store.find(path, key) == path
