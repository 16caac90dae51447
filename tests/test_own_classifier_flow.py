"""Issue 25's acceptance: a user's own classifier, defined in its own module and trained on a
``.npz`` of their own, protected through the command line alone (train a shield, evaluate it
under PGD, audit it, export it to ONNX and ``.pt2``), then the same flow from Python.

Real MNIST images (a small subset) stand in for the user's data; nothing here uses a zoo name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fit

NET = '''\
"""A user's classifier: it expects images normalised with MNIST's mean and std."""
from torch import nn


def make_net():
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
'''
MEAN, STD = 0.1307, 0.3081
EPS = 0.1
N_CHECK = 200


def _load_module(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("usernet_flow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """What a user brings: their module, their .npz files (uint8 NHWC for training, float
    NCHW for testing, as people store them), and their weights, trained here in plain torch."""
    from safetensors.torch import save_file

    from aeshield.data import load_dataset

    root = tmp_path_factory.mktemp("user")
    (root / "usernet.py").write_text(NET)
    train = load_dataset("mnist", "train").subset(1500, seed=3)
    test = load_dataset("mnist", "test").subset(N_CHECK, seed=3)
    x_train = (train.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(root / "train.npz", x=x_train, y=train.labels.numpy())
    np.savez(root / "test.npz", x=test.images.numpy(), y=test.labels.numpy().astype(np.int32))

    torch.manual_seed(0)
    net = _load_module(root / "usernet.py").make_net()
    fit(net, (train.images - MEAN) / STD, train.labels, epochs=4, batch_size=100)
    save_file(net.state_dict(), root / "net.safetensors")
    return root


def _cli(root: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, "-m", "aeshield.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"aeshield {' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done


def _reference_outputs(root: Path, images: torch.Tensor):
    """The shielded pipeline's logits and reject decisions, computed in Python from the files."""
    import aeshield
    from aeshield.defenses.registry import load_pipeline

    classifier, _ = aeshield.load_classifier_spec(f"{root / 'usernet.py'}:make_net={root / 'net.safetensors'}",
                                                  normalize=((MEAN,), (STD,)))
    pipeline = load_pipeline(root / "shield.safetensors", classifier)
    with torch.no_grad():
        return pipeline(images), pipeline.predict(images)


def test_the_whole_flow_through_the_cli(user_files):
    root = user_files
    classifier = ["--classifier", "usernet.py:make_net=net.safetensors", "--normalize", f"{MEAN},{STD}"]

    trained = _cli(root, "train", "shield", "--defense", "aaa", *classifier, "--data", "train.npz",
                   "--eps", str(EPS), "--epochs", "2", "--no-progress", "--out", "shield.safetensors")
    assert (root / "shield.safetensors").is_file() and not (root / "shield.ckpt").exists(), trained.stdout
    card = json.loads((root / "shield.json").read_text())["card"]
    assert card["input_shape"] == [1, 28, 28] and card["num_classes"] == 10
    assert card["training_threat"]["eps"] == pytest.approx(EPS)

    evaluated = _cli(root, "eval", "--shield", "shield.safetensors", *classifier, "--data", "test.npz",
                     "--attack", "pgd", "--eps", str(EPS), "--steps", "10", "--step-size", "0.025",
                     "--n", str(N_CHECK), "--no-progress", "--out", "eval.json")
    record = json.loads((root / "eval.json").read_text())
    assert record["n"] == N_CHECK and record["threat"]["eps"] == pytest.approx(EPS)
    assert 0 <= record["robust"]["accuracy"] <= record["clean"]["accuracy"] and "robust accuracy" in evaluated.stdout

    audited = _cli(root, "audit", "--shield", "shield.safetensors", *classifier, "--data", "test.npz",
                   "--eps", str(EPS), "--budget", "quick", "--n", "100", "--device", "cpu",
                   "--no-progress", "--out", "audit")
    assert (root / "audit" / "audit.json").is_file() and "robust accuracy" in audited.stdout

    test = np.load(root / "test.npz")
    images = torch.as_tensor(test["x"])
    logits, labels = _reference_outputs(root, images)

    _cli(root, "export", "--shield", "shield.safetensors", *classifier, "--format", "onnx",
         "--out", "shielded.onnx", "--data", "test.npz", "--n-check", str(N_CHECK))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(root / "shielded.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits, onnx_labels, _ = session.run(["logits", "labels", "reject_margin"], {"images": images.numpy()})
    assert np.abs(onnx_logits - logits.numpy()).max() < 1e-4
    assert (onnx_labels == labels.numpy()).mean() >= 0.99  # argmax ties within 1e-4 may flip

    _cli(root, "export", "--shield", "shield.safetensors", *classifier, "--format", "pt2",
         "--out", "shielded.pt2", "--data", "test.npz", "--n-check", str(N_CHECK))
    from aeshield.models.exported import load_exported

    program = load_exported(root / "shielded.pt2")
    with torch.no_grad():
        pt2_logits, pt2_labels, _ = program(images)
    assert (pt2_logits - logits).abs().max() < 1e-4
    assert (pt2_labels == labels).float().mean() >= 0.99


def test_the_same_flow_from_python(user_files, tmp_path):
    root = user_files
    import aeshield  # the flow below is what a user writes: under 15 lines
    from aeshield.eval import AttackSpec, evaluate

    classifier, _ = aeshield.load_classifier_spec(f"{root / 'usernet.py'}:make_net={root / 'net.safetensors'}",
                                                  normalize=((MEAN,), (STD,)))
    train, test = aeshield.load_data(str(root / "train.npz"), "all"), aeshield.load_data(str(root / "test.npz"))
    threat = aeshield.ThreatModel("Linf", EPS)
    shield = aeshield.train_shield([classifier], train, threat, config={"epochs": 1}, progress=False,
                                   out=tmp_path / "shield.safetensors")
    model = shield.pipeline(classifier)
    record = evaluate(model, test.images, test.labels, [AttackSpec("pgd", {"steps": 10})], threat, progress=False)
    model.to_onnx(tmp_path / "shielded.onnx")
    assert record.n == N_CHECK and (tmp_path / "shielded.onnx").is_file()
    assert record.robust.value <= record.clean.value
