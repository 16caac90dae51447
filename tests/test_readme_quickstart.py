"""The README's "Protect your own classifier" quickstart runs as printed: its Python block and
its command-line block, in a folder holding what the README says the user has (``mypkg`` with
``make_net``, ``net.safetensors``, ``train.npz``, ``test.npz``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import fit

README = Path(__file__).resolve().parents[1] / "README.md"
MODELS = '''\
from torch import nn


def make_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
'''


def _block(marker: str) -> str:
    """The fenced block right after ``<!-- quickstart:MARKER -->``."""
    found = re.search(rf"<!-- quickstart:{marker} -->\s*```\w*\n(.*?)```", README.read_text(), re.S)
    assert found, f"the README has no quickstart:{marker} block"
    return found.group(1)


@pytest.fixture
def user_folder(tmp_path):
    from safetensors.torch import save_file

    from aeshield.data import load_dataset

    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(MODELS)
    # Small sets keep the README's default training settings to seconds.
    train = load_dataset("mnist", "train").subset(300, seed=5)
    test = load_dataset("mnist", "test").subset(100, seed=5)
    np.savez(tmp_path / "train.npz", x=train.images.numpy(), y=train.labels.numpy())
    np.savez(tmp_path / "test.npz", x=test.images.numpy(), y=test.labels.numpy())
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    fit(net, train.images, train.labels, epochs=10, batch_size=50)
    save_file(net.state_dict(), tmp_path / "net.safetensors")
    return tmp_path


def _run(folder: Path, command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(folder)}
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done


def test_python_quickstart_runs_as_printed(user_folder):
    script = user_folder / "quickstart.py"
    script.write_text(_block("python") + "\nprint('labels', labels.tolist())\n")
    done = _run(user_folder, [sys.executable, str(script)])
    labels = eval(done.stdout.split("labels", 1)[1])
    test = np.load(user_folder / "test.npz")
    assert len(labels) == len(test["y"]) and np.mean(np.array(labels) == test["y"]) > 0.5
    assert (user_folder / "my-shield.safetensors").is_file() and (user_folder / "shielded.onnx").is_file()


def test_cli_quickstart_runs_as_printed(user_folder):
    commands = _block("cli")
    assert commands.count("aeshield ") == 4
    done = _run(user_folder, ["bash", "-e", "-o", "pipefail", "-c", commands])
    assert "robust accuracy" in done.stdout and "ok" in done.stdout.splitlines()
    for made in ("my-shield.safetensors", "shielded.onnx"):
        assert (user_folder / made).is_file(), made
