"""Every trainer of ``aeshield train`` is reproducible from --seed alone and resumes exactly
after SIGKILL (issue 24).

Each run is a real ``python -m aeshield.cli train ...`` subprocess on a few hundred MNIST images.
A killed run is the same command started through ``_KILLER``, which checkpoints after every step
(the result must not depend on where checkpoints fall) and SIGKILLs itself at a chosen point, or
is SIGKILLed from outside; re-running the plain command must then give the weights, sidecar and
history of an uninterrupted run, and leave nothing but the weights and the sidecar behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import aeshield
from aeshield.io import remove_temporaries, temporaries
from aeshield.models.io import CheckpointError, load_weights, save_weights, sidecar_path
from conftest import tiny_mlp

SRC = Path(aeshield.__file__).resolve().parents[1]
DATA_CACHE = Path.home() / ".cache" / "aeshield" / "data"

# Small enough for a busy 2-core CPU; ``steps`` is the number of optimizer steps per epoch.
TRAINERS = {
    "classifier": (["train", "classifier", "--model", "mnist-c", "--dataset", "mnist", "--epochs", "2",
                    "--batch-size", "64", "--train-limit", "256"], 4),
    # AAA at its default batch: 128 images a step, 2 steps an epoch.
    "aaa": (["train", "aaa", "--classifier", "mnist-c", "--dataset", "mnist", "--autoencoder", "conv-ae-small",
             "--attack-steps", "2", "--step-size", "0.1", "--epochs", "2", "--train-limit", "256"], 2),
    # The attack schedules (issue 26): the free perturbation and the guard's state are checkpointed.
    "aaa-fast": (["train", "aaa", "--classifier", "mnist-c", "--dataset", "mnist", "--autoencoder", "conv-ae-small",
                  "--schedule", "fast", "--epochs", "2", "--train-limit", "256"], 2),
    "aaa-free": (["train", "aaa", "--classifier", "mnist-c", "--dataset", "mnist", "--autoencoder", "conv-ae-small",
                  "--schedule", "free", "--replays", "3", "--epochs", "2", "--train-limit", "256"], 2),
    "puvae": (["train", "puvae", "--classifier", "mnist-c", "--dataset", "mnist", "--epochs", "2",
               "--batch-size", "128", "--train-limit", "256"], 2),
    "magnet": (["train", "magnet", "--dataset", "mnist", "--epochs", "2", "--batch-size", "64",
                "--train-limit", "256"], 4),
}

# The CLI with a checkpoint after every step and a SIGKILL at a chosen point:
#   checkpoint K: while writing the K-th checkpoint (its temporary file full, not yet renamed);
#   save: inside the final save_weights, after the new sidecar, before the weights' rename;
#   none: never (the test kills it from outside).
_KILLER = r"""
import dataclasses, os, signal, sys

mode, k, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
import aeshield.defenses.aaa, aeshield.defenses.magnet, aeshield.defenses.puvae, aeshield.train.classifier
import aeshield.models.io as weights_io
import aeshield.train.loop as loop


def die():
    os.kill(os.getpid(), signal.SIGKILL)


original_fit = loop.fit


def fit(*args, **kwargs):
    args = list(args)
    args[5] = dataclasses.replace(args[5], checkpoint_every=1)
    return original_fit(*args, **kwargs)


for module in list(sys.modules.values()):
    if getattr(module, "fit", None) is original_fit:
        module.fit = fit

original_checkpoint_write, writes = loop.write_atomic, [0]


def checkpoint_write(path, write, **kwargs):
    writes[0] += 1
    if mode == "checkpoint" and writes[0] == k:
        def write_then_die(tmp):
            write(tmp)
            die()
        return original_checkpoint_write(path, write_then_die, **kwargs)
    return original_checkpoint_write(path, write, **kwargs)


loop.write_atomic = checkpoint_write
original_weights_write = weights_io.write_atomic


def weights_write(path, write, *, before_replace, **kwargs):
    def sidecar_then_die(final):
        before_replace(final)
        if mode == "save":
            die()
    return original_weights_write(path, write, before_replace=sidecar_then_die, **kwargs)


weights_io.write_atomic = weights_write
from aeshield.cli import main

main(argv)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    (cache / "data").symlink_to(DATA_CACHE)
    return {**os.environ, "AESHIELD_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def _argv(trainer: str, out: Path, seed: int) -> list[str]:
    return [*TRAINERS[trainer][0], "--seed", str(seed), "--out", str(out), "--no-progress"]


def _train(env, trainer: str, out: Path, seed: int = 0) -> Path:
    proc = subprocess.run([sys.executable, "-m", "aeshield.cli", *_argv(trainer, out, seed)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _killed(env, trainer: str, out: Path, mode: str, k: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as stderr:  # a file, not a pipe that could fill up while nobody reads it
        return subprocess.Popen([sys.executable, "-c", _KILLER, mode, str(k), *_argv(trainer, out, 0)], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    """``trained(trainer, seed)``: the output of an uninterrupted run, trained once per module."""
    _runs: dict[tuple[str, int], Path] = {}

    def get(trainer: str, seed: int = 0) -> Path:
        if (trainer, seed) not in _runs:
            out = tmp_path_factory.mktemp(f"{trainer}-seed{seed}") / "out.safetensors"
            _runs[trainer, seed] = _train(env, trainer, out, seed)
        return _runs[trainer, seed]
    return get


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same_weights(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _sidecar(path: Path) -> dict:
    return json.loads(sidecar_path(path).read_text())


def _assert_same_run(out: Path, reference: Path) -> None:
    assert _same_weights(out, reference)
    side, ref = _sidecar(out), _sidecar(reference)
    assert side["history"] == ref["history"]
    assert side == ref  # the weights' SHA-256, accuracy, config: every field
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.json", "out.safetensors"]  # no .ckpt, no temporary
    load_weights(out)  # a consistent pair


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_same_seed_same_weights_other_seed_other_weights(trainer, trained, env, tmp_path):
    reference = trained(trainer)
    again = _train(env, trainer, tmp_path / "again" / "out.safetensors")
    _assert_same_run(again, reference)
    other = trained(trainer, seed=1)
    assert not _same_weights(other, reference)
    assert _sidecar(other)["history"] != _sidecar(reference)["history"]


# Where the first run dies: SIGKILL from outside as soon as a checkpoint exists (mid-epoch 1 or
# later); while writing the checkpoint of epoch 2's second step (so it resumes from the middle
# of epoch 2 and a temporary is left); between the final sidecar and weights (over the weights
# of an earlier run with another seed, so the pair on disk is torn until the re-run).
KILL_POINTS = ["first-checkpoint", "mid-epoch-2", "final-save"]


@pytest.mark.parametrize("point", KILL_POINTS)
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_sigkill_then_rerun_matches_an_uninterrupted_run(trainer, point, trained, env, tmp_path):
    reference = trained(trainer)
    out = tmp_path / "run" / "out.safetensors"
    ckpt = out.with_suffix(".ckpt")
    log = tmp_path / "killed.log"
    if point == "first-checkpoint":
        proc = _killed(env, trainer, out, "none", 0, log)
        while proc.poll() is None and not ckpt.exists():
            time.sleep(0.005)
        proc.kill()
        assert proc.wait(timeout=60) in (-signal.SIGKILL, 0), log.read_text()[-3000:]
    else:
        if point == "final-save":
            earlier = trained(trainer, seed=1)
            out.parent.mkdir()
            shutil.copy(earlier, out)
            shutil.copy(sidecar_path(earlier), sidecar_path(out))
            proc = _killed(env, trainer, out, "save", 0, log)
        else:
            proc = _killed(env, trainer, out, "checkpoint", TRAINERS[trainer][1] + 3, log)
        assert proc.wait(timeout=300) == -signal.SIGKILL, log.read_text()[-3000:]
        if point == "final-save":
            assert temporaries(out) and ckpt.exists()
            with pytest.raises(CheckpointError, match="does not match its sidecar"):
                load_weights(out)
        else:
            assert temporaries(ckpt) and ckpt.exists() and not out.exists()
    _train(env, trainer, out)
    _assert_same_run(out, reference)


# ---- the pieces, without the CLI -----------------------------------------------------------------
def _save(model, path):
    return save_weights(model, path, architecture="tiny", dataset="mnist", kind="classifier")


def test_torn_pair_is_refused_with_a_clear_message(tmp_path):
    torch.manual_seed(0)
    a, b = tiny_mlp(), tiny_mlp()
    path_a, path_b = _save(a, tmp_path / "a"), _save(b, tmp_path / "b")
    assert load_weights(path_a, model=tiny_mlp())[1]["weights_sha256"]
    shutil.copy(sidecar_path(path_b), sidecar_path(path_a))  # b's sidecar beside a's weights
    with pytest.raises(CheckpointError, match=r"a\.safetensors does not match its sidecar a\.json.*re-run"):
        load_weights(path_a, model=tiny_mlp())
    side = _sidecar(path_a)
    del side["weights_sha256"]  # a sidecar written before the field existed still loads
    sidecar_path(path_a).write_text(json.dumps(side))
    load_weights(path_a, model=tiny_mlp())


def test_a_crash_between_sidecar_and_weights_is_detected(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = _save(tiny_mlp(), tmp_path / "w")
    real_replace = os.replace

    def crash_on_weights(src, dst):
        if str(dst).endswith(".safetensors"):
            raise KeyboardInterrupt  # the process dies between the two renames
        real_replace(src, dst)

    monkeypatch.setattr("aeshield.io.os.replace", crash_on_weights)
    with pytest.raises(KeyboardInterrupt):
        _save(tiny_mlp(), path)
    monkeypatch.undo()
    assert not temporaries(path)  # a failure (unlike SIGKILL) removes its temporary
    with pytest.raises(CheckpointError, match="does not match its sidecar"):
        load_weights(path, model=tiny_mlp())


def test_saving_the_same_weights_keeps_the_file_and_a_consistent_sidecar(tmp_path):
    torch.manual_seed(0)
    model = tiny_mlp()
    path = _save(model, tmp_path / "w")
    first = path.read_bytes()
    _save(model, path)
    assert path.read_bytes() == first
    load_weights(path, model=tiny_mlp())


def test_remove_temporaries_removes_only_those_of_the_file(tmp_path):
    names = [".out.ckpt.abc_1234.tmp", ".out.ckpt.zzzzzzzz.tmp.png", ".out.ckpt.x.abc_1234.tmp",
             ".other.ckpt.abc_1234.tmp", ".out.ckpt.lock", "out.ckpt"]
    for name in names:
        (tmp_path / name).write_text("x")
    removed = remove_temporaries(tmp_path / "out.ckpt")
    assert sorted(p.name for p in removed) == [".out.ckpt.abc_1234.tmp", ".out.ckpt.zzzzzzzz.tmp.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    assert remove_temporaries(tmp_path / "missing" / "x") == []
