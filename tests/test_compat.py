"""Does a shield fit the classifier and the data (defenses/compat.py)? Each kind of mismatch
(dataset, input shape, classes, value range) is refused with one line naming both sides, and
``--force`` proceeds and records it; your own classifier and data go through eval and audit."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from aeshield.cli import main
from aeshield.data.user import load_data
from aeshield.defenses.compat import (IncompatibleError, Signature, check_compatible, check_members,
                                      data_signature, shield_signature)

USER_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    """Takes images of any size and channel count (so that a forced run can proceed)."""

    def __init__(self, classes=10, in_shape=None):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(16, classes)
        if in_shape is not None:
            self.in_shape = in_shape

    def forward(self, x):
        return self.fc(self.pool(x.mean(1, keepdim=True)).flatten(1))


def ten():
    torch.manual_seed(0)
    return Net()


def twelve():
    return Net(12)


def rgb32():
    return Net(in_shape=(3, 32, 32))
'''


@pytest.fixture()
def files(tmp_path, monkeypatch):
    (tmp_path / "compatmod_user.py").write_text(USER_MODULE)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", x=rng.random((8, 28, 28, 1), dtype=np.float32), y=rng.integers(0, 10, 8))
    np.savez(tmp_path / "mnist.npz", x=rng.random((8, 1, 28, 28), dtype=np.float32), y=rng.integers(0, 10, 8))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("compatmod_user", None)


def _run(argv: str):
    return CliRunner().invoke(main, argv.split())


def _refused(result, *words):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--force overrides" in lines[0], result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def _forced(result, out, *words):
    assert result.exit_code == 0, (result.output, result.exception)
    forced = json.loads(out.with_suffix(".manifest.json").read_text())["config"]["forced_mismatches"]
    assert forced and all(any(w in line for line in forced) for w in words), forced


EVAL = "eval --n 4 --steps 1 --batch-size 4 --no-progress"


@pytest.mark.parametrize("argv, words", [
    # An F-MNIST shield in front of an MNIST classifier, on MNIST.
    ("--classifier mnist-b --shield aaa-fmnist --dataset mnist", ("aaa-fmnist", "fashion-mnist", "mnist-b")),
    # An MNIST classifier on Fashion-MNIST.
    ("--classifier mnist-b --dataset fashion-mnist", ("mnist-b was trained on mnist", "data are fashion-mnist")),
    # A classifier built for 3x32x32 images, on 1x28x28 ones of the user's.
    ("--classifier compatmod_user.py:rgb32 --data mine.npz", ("(3, 32, 32)", "(1, 28, 28)", "mine.npz")),
    # A 12-class classifier behind a 10-class shield.
    ("--classifier compatmod_user.py:twelve --shield aaa-mnist --data mine.npz",
     ("aaa-mnist predicts 10 classes", "compatmod_user.py:twelve predicts 12")),
], ids=["dataset-shield", "dataset-data", "shape", "classes"])
def test_a_mismatch_is_refused_and_force_proceeds(files, argv, words):
    _refused(_run(f"{EVAL} {argv}"), *words)
    out = files / "r.json"
    _forced(_run(f"{EVAL} {argv} --force --out {out}"), out, *words[:1])


def test_data_labels_beyond_a_factory_classifier_are_a_class_mismatch(files):
    x = np.random.default_rng(1).random((4, 1, 28, 28), dtype=np.float32)
    np.savez(files / "twelve.npz", x=x, y=np.array([0, 11, 2, 3]))
    _refused(_run(f"{EVAL} --classifier compatmod_user.py:ten --data twelve.npz"), "predicts 10 classes",
             "label 11")


def test_a_file_named_after_a_dataset_is_not_that_dataset(files):
    data = load_data(str(files / "mnist.npz"))
    assert data.name == "mnist" and data_signature(data).dataset is None


def test_the_shield_signature_comes_from_its_card():
    sig = shield_signature("aaa-fmnist")
    assert (sig.dataset, sig.input_shape, sig.num_classes, sig.value_range) == ("fashion-mnist", (1, 28, 28),
                                                                                  10, (0.0, 1.0))
    with pytest.raises(ValueError, match="is a classifier, not a shield"):
        shield_signature("mnist-b")


def test_check_compatible_compares_shape_range_and_classes_without_dataset_names():
    data = Signature("mine.npz", None, (1, 28, 28), 10)
    fits = Signature("net", None, (1, 28, 28), 10)
    assert check_compatible(data=data, classifier=fits) == []
    assert check_compatible(data=data, classifier=Signature("net", None, None, None)) == []
    shield = Signature("sh", "mnist", (1, 28, 28), 10, value_range=(-1.0, 1.0))
    with pytest.raises(IncompatibleError) as err:
        check_compatible(data=data, classifier=fits, shield=shield)
    assert "pixel values in [-1.0, 1.0]" in str(err.value) and "\n" not in str(err.value)
    # The same dataset name on both sides: nothing else is compared; differing names are refused.
    mnist = Signature("mnist", "mnist", (1, 28, 28), 10)
    assert check_compatible(data=mnist, classifier=Signature("c", "mnist", None, 12)) == []
    lines = check_compatible(data=mnist, classifier=Signature("c", "fashion-mnist", (1, 28, 28), 10), force=True)
    assert lines == ["the classifier c was trained on fashion-mnist but the data are mnist"]


def _weights(files):
    sys.path.insert(0, str(files))
    try:
        import compatmod_user
    finally:
        sys.path.remove(str(files))
    save_file(compatmod_user.ten().state_dict(), files / "w.safetensors")
    return "compatmod_user:ten=w.safetensors"


def test_classifiers_used_together_must_predict_the_same_classes():
    a, b = Signature("a", None, (1, 28, 28), 10), Signature("b", None, (1, 28, 28), 12)
    assert check_members([a, Signature("a2", None, None, 10)]) == []
    with pytest.raises(IncompatibleError, match="classifier b predicts 12 classes but the classifier a predicts 10"):
        check_members([a, b])
    assert len(check_members([a, b], force=True)) == 1


def test_eval_and_audit_take_a_factory_spec_with_weights_and_a_npz(files):
    spec = _weights(files)
    result = _run(f"{EVAL} --classifier {spec} --data mine.npz --eps 0.1 --out {files / 'r.json'}")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "mine (" in result.output and "robust accuracy" in result.output
    manifest = json.loads((files / "r.manifest.json").read_text())["config"]
    assert manifest["forced_mismatches"] == [] and len(manifest["classifier"]["weights_sha256"]) == 64
    result = _run(f"audit --classifier {spec} --data mine.npz --eps 0.1 --n 4 --batch-size 4 --device cpu "
                  f"--no-progress --out {files / 'audit'}")
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads((files / "audit" / "audit.json").read_text())
    digest = report["manifest"]["config"]["weights_sha256"]["classifier"]
    assert digest == hashlib.sha256((files / "w.safetensors").read_bytes()).hexdigest()


def test_normalize_reaches_the_classifier(files):
    spec = _weights(files)
    result = _run(f"{EVAL} --classifier {spec} --normalize 0.5,0.25 --data mine.npz --eps 0.1")
    assert result.exit_code == 0, (result.output, result.exception)
    result = _run(f"{EVAL} --classifier {spec} --normalize 0.5 --data mine.npz")
    assert result.exit_code == 2 and "--normalize" in result.output


def test_an_audit_folder_name_for_each_spec_form():
    from aeshield.cli.audit import _slug

    assert _slug("mnist-b") == "mnist-b" and _slug("runs/clf.safetensors") == "clf"
    assert _slug("runs/net.pt2") == "net"
    assert _slug("mymod:factory=w.safetensors") == "mymod-factory-w.safetensors"
