"""Optional extras: the core install works without them, and a missing one says which to install.

``pip install aeshield`` leaves out the corruption stack (``[corruptions]``) and the reference
AutoAttack (``[attacks]``); the code that needs them imports them through
``aeshield.errors.require``, which raises ``MissingExtraError`` with the pip command.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_mlp

from aeshield.errors import AeshieldError, MissingExtraError, require

# Top-level modules of the optional packages (and of what they pull in) that core code must not need.
OPTIONAL = ("imagecorruptions", "pyautoattack", "torchattacks", "sklearn", "scipy", "cv2", "skimage",
            "numba", "onnx", "onnxscript", "torchvision")


def _block(monkeypatch, *names: str) -> None:
    """Make ``import name`` fail as if the package were not installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def _check(err: pytest.ExceptionInfo, extra: str) -> None:
    assert isinstance(err.value, ImportError) and isinstance(err.value, AeshieldError)
    assert f"pip install 'aeshield[{extra}]'" in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.extra == extra


def test_require_names_the_package_the_extra_and_the_feature(monkeypatch):
    _block(monkeypatch, "imagecorruptions")
    with pytest.raises(MissingExtraError) as err:
        require("imagecorruptions", extra="corruptions", feature="corruption robustness")
    _check(err, "corruptions")
    assert str(err.value) == ("corruption robustness needs the optional package 'imagecorruptions': "
                              "pip install 'aeshield[corruptions]'")
    assert require("json", extra="x", feature="y").__name__ == "json"


def test_require_does_not_hide_a_broken_dependency_of_an_installed_package(monkeypatch):
    def broken(name, package=None):  # the package is there, but one of its own imports fails
        raise ModuleNotFoundError("No module named 'its_dependency'", name="its_dependency")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError) as err:
        require("installed_package", extra="x", feature="y")
    assert not isinstance(err.value, MissingExtraError)


def test_corruptions_without_the_extra(monkeypatch):
    from aeshield.eval import corruptions

    _block(monkeypatch, "imagecorruptions")
    images = np.zeros((1, 28, 28, 1), np.uint8)
    with pytest.raises(MissingExtraError) as err:
        corruptions.corrupt_array(images, "gaussian_noise", 1)
    _check(err, "corruptions")
    assert "corruption robustness" in str(err.value)


def test_autoattack_without_the_extra(monkeypatch):
    from aeshield.attacks import autoattack
    from aeshield.eval.harness import AttackSpec, evaluate
    from aeshield.threat import ThreatModel


    _block(monkeypatch, "pyautoattack")
    x, y = torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    with pytest.raises(MissingExtraError) as err:
        autoattack(tiny_mlp(), x, y, eps=0.1, attacks=["apgd-ce"])
    _check(err, "attacks")
    assert str(err.value).startswith("AutoAttack needs the optional package 'pyautoattack'")

    # The cascade checks every attack before it runs any: PGD first does not delay the error.
    model = tiny_mlp().eval()
    calls = []
    monkeypatch.setattr(model, "forward", lambda t: calls.append(1) or torch.zeros(len(t), 10))
    specs = [AttackSpec("pgd", {"steps": 1}), AttackSpec("apgd-ce", {"apgd_iters": 1})]
    with pytest.raises(MissingExtraError) as err:
        evaluate(model, x, y, specs, ThreatModel("Linf", 0.1), progress=False)
    _check(err, "attacks")
    assert not calls


def test_reproduce_fails_before_training_without_the_extra(monkeypatch, tmp_path):
    from aeshield.cli import main
    from aeshield.experiments.config import load_config
    from aeshield.experiments.runner import check_extras

    _block(monkeypatch, "imagecorruptions")
    with pytest.raises(MissingExtraError) as err:
        check_extras(load_config("corruption-mnist", "quick"))
    _check(err, "corruptions")
    check_extras(load_config("aaa-mnist", "quick"))  # a non-corruption target needs no such extra

    result = CliRunner().invoke(main, ["reproduce", "corruption-mnist", "--smoke", "--jobs", "1",
                                       "--no-progress", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output  # one line on stderr, no traceback
    assert result.stderr.strip().splitlines() == [
        "error: corruption robustness needs the optional package 'imagecorruptions': "
        "pip install 'aeshield[corruptions]'"]
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_audit_fails_at_its_start_without_the_extra(monkeypatch):
    from aeshield.eval.audit import audit
    from aeshield.threat import ThreatModel


    _block(monkeypatch, "pyautoattack")
    with pytest.raises(MissingExtraError) as err:
        audit(tiny_mlp(), torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long),
              ThreatModel("Linf", 0.1), progress=False, checks=False, plots=False)
    _check(err, "attacks")


_CORE_ONLY = textwrap.dedent("""
    import sys
    from importlib.abc import MetaPathFinder

    BLOCKED = set(sys.argv[1].split(","))

    class NotInstalled(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())

    import torch

    import aeshield
    from aeshield import Shielded, load_shield
    from aeshield.attacks import pgd
    from aeshield.cli import main
    from aeshield.errors import MissingExtraError
    from aeshield.eval import evaluate
    from aeshield.eval.harness import AttackSpec
    from aeshield.experiments.config import load_config
    from aeshield.experiments.runner import check_extras
    from aeshield.models.classifiers import Classifier, MNIST_STATS
    from aeshield.threat import ThreatModel

    torch.manual_seed(0)
    classifier = Classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), *MNIST_STATS,
                            in_shape=(1, 28, 28))
    model = Shielded(load_shield("aaa-mnist"), classifier).eval()
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    x_adv = pgd(model, x, y, eps=0.1, steps=2)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    record = evaluate(model, x, y, [AttackSpec("pgd", {"steps": 2})], ThreatModel("Linf", 0.1), progress=False)
    assert record.n == 8
    for target in ("s2snet-mnist", "puvae-mnist", "dbp-mnist"):
        check_extras(load_config(target, "quick"))
    # The audit columns of the demo and aaa-mnist run the audit's battery, whose AutoAttack
    # parts need the extra.
    for target, extra in (("corruption-mnist", "corruptions"), ("demo", "attacks"), ("aaa-mnist", "attacks")):
        try:
            check_extras(load_config(target, "quick"))
        except MissingExtraError as err:
            assert f"pip install 'aeshield[{extra}]'" in str(err), err
        else:
            raise AssertionError(f"{target} ran without the {extra} extra")
    try:
        main(["--help"], standalone_mode=False)
    except SystemExit:
        pass
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("core only: ok")
""")


def test_core_works_with_every_optional_package_missing():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _CORE_ONLY, ",".join(OPTIONAL)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "core only: ok" in proc.stdout
