"""Bad input on the command line: every case exits with status 2 and at most two lines on
stderr that say what to do, never a traceback, never a silent success (issue 24).

The cases run in-process through click's test runner (the same ``main`` the console script
calls), against files made here: a corrupted weight file, weights whose tensors belong to
another architecture, a truncated data file in a private cache, and .npz image sets with NaN
pixels, the wrong channel count and labels out of range.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from aeshield.cli import main
from aeshield.models.io import shipped_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    shipped = shipped_dir()
    # A weight file whose bytes are garbage, with a valid sidecar beside it.
    (root / "corrupt.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    shutil.copy(shipped / "mnist-b.json", root / "corrupt.json")
    (root / "corrupt-shield.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    shutil.copy(shipped / "aaa-mnist.json", root / "corrupt-shield.json")
    # mnist-b's tensors under a sidecar that names another architecture.
    shutil.copy(shipped / "mnist-b.safetensors", root / "other-arch.safetensors")
    side = json.loads((shipped / "mnist-b.json").read_text())
    (root / "other-arch.json").write_text(json.dumps({**side, "architecture": "mnist-c"}))
    # Weights with no sidecar at all.
    shutil.copy(shipped / "mnist-b.safetensors", root / "no-sidecar.safetensors")
    # Image sets in .npz files.
    rng = np.random.default_rng(0)
    x = rng.random((8, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 8)
    np.savez(root / "good.npz", x=x, y=y)
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    np.savez(root / "nan.npz", x=nan, y=y)
    np.savez(root / "rgb.npz", x=rng.random((8, 3, 28, 28), dtype=np.float32), y=y)
    np.savez(root / "labels12.npz", x=x, y=np.full(8, 12))
    np.savez(root / "labels-neg.npz", x=x, y=np.full(8, -5))
    np.savez(root / "range.npz", x=x * 255, y=y)
    np.savez(root / "no-labels.npz", x=x)
    np.savez(root / "count.npz", x=x, y=y[:5])
    (root / "truncated.npz").write_bytes((root / "good.npz").read_bytes()[:300])
    # A JSON that is not a record, and a file that is not JSON.
    (root / "not-a-record.json").write_text(json.dumps({"a": 1}))
    (root / "not-json.json").write_text("{ this is not json")
    # A private cache holding a truncated MNIST test file.
    from aeshield.data import dataset_dir

    cache = root / "cache"
    (cache / "data" / "mnist").mkdir(parents=True)
    for f in dataset_dir("mnist").iterdir():
        if f.is_file():
            data = f.read_bytes()
            (cache / "data" / "mnist" / f.name).write_bytes(data[:100_000] if "t10k-images" in f.name else data)
    return root


# (id, argv with {f} for the files folder, environment)
CASES = [
    # train
    ("train-unknown-model", "train classifier --model mnist-z --dataset mnist --out {f}/o/c"),
    ("train-unknown-dataset", "train classifier --model mnist-a --dataset mnits --out {f}/o/c"),
    ("train-epochs-0", "train classifier --model mnist-a --dataset mnist --epochs 0 --out {f}/o/c"),
    ("train-batch-0", "train classifier --model mnist-a --dataset mnist --batch-size 0 --out {f}/o/c"),
    ("train-lr-negative", "train classifier --model mnist-a --dataset mnist --lr -1 --out {f}/o/c"),
    ("train-limit-0", "train classifier --model mnist-a --dataset mnist --train-limit 0 --out {f}/o/c"),
    ("train-out-unwritable", "train classifier --model mnist-a --dataset mnist --out /proc/aeshield/c"),
    ("train-aaa-unknown-classifier", "train aaa --classifier mnist-q --dataset mnist --out {f}/o/g"),
    ("train-aaa-eps-negative", "train aaa --classifier mnist-b --dataset mnist --eps -0.3 --out {f}/o/g"),
    ("train-aaa-eps-too-big", "train aaa --classifier mnist-b --dataset mnist --eps 5 --out {f}/o/g"),
    ("train-aaa-steps-0", "train aaa --classifier mnist-b --dataset mnist --attack-steps 0 --out {f}/o/g"),
    ("train-aaa-guard-every-0",
     "train aaa --classifier mnist-b --dataset mnist --schedule nfgsm --guard-every 0 --out {f}/o/g"),
    ("train-aaa-nfgsm-step-0",
     "train aaa --classifier mnist-b --dataset mnist --schedule nfgsm --nfgsm-step 0 --out {f}/o/g"),
    ("train-aaa-step-negative", "train aaa --classifier mnist-b --dataset mnist --step-size -0.01 --out {f}/o/g"),
    ("train-aaa-loss", "train aaa --classifier mnist-b --dataset mnist --loss l1 --out {f}/o/g"),
    ("train-aaa-corrupt-classifier", "train aaa --classifier {f}/corrupt.safetensors --dataset mnist --out {f}/o/g"),
    ("train-aaa-shield-as-classifier", "train aaa --classifier aaa-mnist --dataset mnist --out {f}/o/g"),
    ("train-aaa-unknown-autoencoder",
     "train aaa --classifier mnist-b --dataset mnist --autoencoder unet-q --out {f}/o/g"),
    ("train-puvae-epochs-0", "train puvae --classifier mnist-b --dataset mnist --epochs 0 --out {f}/o/p"),
    ("train-magnet-batch-0", "train magnet --dataset mnist --batch-size 0 --out {f}/o/m"),
    # eval
    ("eval-unknown-classifier", "eval --classifier mnist-q --dataset mnist"),
    ("eval-unknown-shield", "eval --classifier mnist-b --shield aaa-mnits --dataset mnist"),
    ("eval-eps-negative", "eval --classifier mnist-b --dataset mnist --eps -0.3"),
    ("eval-eps-too-big", "eval --classifier mnist-b --dataset mnist --eps 5"),
    ("eval-steps-0", "eval --classifier mnist-b --dataset mnist --steps 0"),
    ("eval-restarts-0", "eval --classifier mnist-b --dataset mnist --restarts 0"),
    ("eval-step-size-negative", "eval --classifier mnist-b --dataset mnist --step-size -0.01"),
    ("eval-n-0", "eval --classifier mnist-b --dataset mnist --n 0"),
    ("eval-batch-0", "eval --classifier mnist-b --dataset mnist --batch-size 0"),
    ("eval-unknown-attack", "eval --classifier mnist-b --dataset mnist --attack pgdd"),
    ("eval-corrupt-weights", "eval --classifier {f}/corrupt.safetensors --dataset mnist"),
    ("eval-other-architecture", "eval --classifier {f}/other-arch.safetensors --dataset mnist"),
    ("eval-no-sidecar", "eval --classifier {f}/no-sidecar.safetensors --dataset mnist"),
    ("eval-classifier-as-shield", "eval --classifier mnist-b --shield mnist-c --dataset mnist"),
    ("eval-shield-as-classifier", "eval --classifier aaa-mnist --dataset mnist"),
    ("eval-nan-images", "eval --classifier mnist-b --data {f}/nan.npz"),
    ("eval-wrong-channels", "eval --classifier mnist-b --data {f}/rgb.npz"),
    ("eval-labels-out-of-range", "eval --classifier mnist-b --data {f}/labels12.npz"),
    ("eval-labels-negative", "eval --classifier mnist-b --data {f}/labels-neg.npz"),
    ("eval-pixels-out-of-range", "eval --classifier mnist-b --data {f}/range.npz"),
    ("eval-no-labels", "eval --classifier mnist-b --data {f}/no-labels.npz"),
    ("eval-label-count", "eval --classifier mnist-b --data {f}/count.npz"),
    ("eval-truncated-npz", "eval --classifier mnist-b --data {f}/truncated.npz"),
    ("eval-missing-npz", "eval --classifier mnist-b --data {f}/missing.npz"),
    ("eval-data-and-dataset", "eval --classifier mnist-b --dataset mnist --data {f}/good.npz"),
    ("eval-no-data", "eval --classifier mnist-b"),
    ("eval-truncated-data-file", "eval --classifier mnist-b --dataset mnist --n 5", {"AESHIELD_CACHE": "{f}/cache"}),
    # audit
    ("audit-nothing", "audit"),
    ("audit-unknown-classifier", "audit --classifier mnist-q --dataset mnist"),
    ("audit-eps-negative", "audit --classifier mnist-b --dataset mnist --eps -1"),
    ("audit-n-0", "audit --classifier mnist-b --dataset mnist --n 0"),
    ("audit-budget", "audit --classifier mnist-b --dataset mnist --budget huge"),
    ("audit-norm", "audit --classifier mnist-b --dataset mnist --norm L3"),
    ("audit-batch-0", "audit --classifier mnist-b --dataset mnist --batch-size 0"),
    ("audit-corrupt-shield", "audit --classifier mnist-b --shield {f}/corrupt-shield.safetensors --dataset mnist"),
    ("audit-nan-images", "audit --classifier mnist-b --data {f}/nan.npz --eps 0.3"),
    # reproduce
    ("reproduce-unknown-target", "reproduce aaa-mnsit --smoke --out {f}/o/r"),
    ("reproduce-profile", "reproduce demo --profile slow --out {f}/o/r"),
    ("reproduce-jobs-0", "reproduce demo --jobs 0 --out {f}/o/r"),
    ("reproduce-smoke-ship", "reproduce demo --smoke --ship"),
    # report
    ("report-nothing", "report"),
    ("report-missing", "report {f}/missing.json"),
    ("report-not-a-record", "report {f}/not-a-record.json"),
    ("report-not-json", "report {f}/not-json.json"),
    # data
    ("data-unknown", "data fetch mnits"),
    ("data-nothing", "data fetch"),
    ("data-cache-unwritable", "data fetch mnist --cache-dir /proc/aeshield-cache"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_a_short_message(case, files, monkeypatch):
    _, argv, *env = case
    for key, value in (env[0] if env else {}).items():
        monkeypatch.setenv(key, value.format(f=files))
    result = CliRunner().invoke(main, argv.format(f=files).split())
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert 1 <= len(lines) <= 2, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].startswith("error: ")
    assert EXPECTED.get(case[0], "") in lines[0], lines[0]


# What the first line must say where a case could otherwise fail for another reason than its own.
EXPECTED = {
    "train-aaa-corrupt-classifier": "damaged", "eval-corrupt-weights": "damaged", "audit-corrupt-shield": "damaged",
    "eval-other-architecture": "does not fit architecture", "eval-truncated-data-file": "Checksum mismatch",
    "eval-nan-images": "NaN", "audit-nan-images": "NaN", "eval-wrong-channels": "(3, 28, 28)",
    "eval-labels-out-of-range": "label 12", "eval-labels-negative": "-5", "eval-pixels-out-of-range": "[0.0, 1.0]",
    "eval-truncated-npz": "not a readable .npz", "report-not-a-record": "not an aeshield evaluation record",
    "train-epochs-0": "epochs", "train-limit-0": "train_limit", "eval-eps-too-big": "exceeds the pixel range",
    "train-aaa-eps-too-big": "exceeds the pixel range", "train-aaa-guard-every-0": "guard_every",
    "train-aaa-nfgsm-step-0": "nfgsm_step",
}


def test_the_battery_is_large_and_covers_the_required_kinds():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    for required in ("eval-corrupt-weights", "eval-other-architecture", "eval-truncated-data-file",
                     "eval-nan-images", "eval-wrong-channels", "eval-labels-out-of-range"):
        assert required in ids
    for command in ("train", "eval", "audit", "reproduce", "report", "data"):
        assert any(c[1].startswith(command) for c in CASES)


def test_debug_shows_the_traceback():
    result = CliRunner().invoke(main, ["--debug", "eval", "--classifier", "mnist-q", "--dataset", "mnist"])
    assert result.exit_code != 0 and result.exception is not None and not isinstance(result.exception, SystemExit)


def test_an_unknown_name_suggests_the_closest():
    result = CliRunner().invoke(main, ["eval", "--classifier", "mnist-bb", "--dataset", "mnist"])
    assert "mnist-b" in result.stderr and "did you mean" in result.stderr
    result = CliRunner().invoke(main, ["reproduce", "aaa-mnsit"])
    assert "'aaa-mnist'" in result.stderr
