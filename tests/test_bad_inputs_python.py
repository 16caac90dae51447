"""Bad Python calls: each raises ``ValueError`` or ``TypeError`` (aeshield's own errors derive
from them) whose message names the argument and what was expected; none returns silently
(issue 24). float64 images are refused with a message saying how to convert them, never
silently attacked in another precision."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import aeshield
from aeshield.attacks import bim, cw_l2, fgsm, pgd
from aeshield.defenses import Detector, Shielded
from aeshield.errors import AeshieldError
from aeshield.eval import AttackSpec, evaluate
from aeshield.eval.audit import audit
from aeshield.models.io import shipped_dir
from aeshield.models.predict import predict
from aeshield.threat import ThreatModel


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("badpy")
    (root / "corrupt.safetensors").write_bytes(b"garbage" * 20)
    shutil.copy(shipped_dir() / "aaa-mnist.json", root / "corrupt.json")
    shutil.copy(shipped_dir() / "mnist-b.safetensors", root / "other.safetensors")
    side = json.loads((shipped_dir() / "mnist-b.json").read_text())
    (root / "other.json").write_text(json.dumps({**side, "architecture": "mnist-c"}))
    torch.manual_seed(0)
    return {"root": root, "clf": aeshield.load_classifier("mnist-b"), "shield": aeshield.load_shield("aaa-mnist"),
            "x": torch.rand(6, 1, 28, 28), "y": torch.tensor([0, 1, 2, 3, 4, 5])}


def _nan(x):
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    return x


# (id, call(parts), words the message must contain: the argument and what was expected)
CALLS = [
    ("load_shield-unknown", lambda p: aeshield.load_shield("aaa-mnsit"), ["aaa-mnsit", "aaa-mnist"]),
    ("load_shield-classifier", lambda p: aeshield.load_shield("mnist-b"), ["mnist-b", "not a shield"]),
    ("load_shield-corrupt", lambda p: aeshield.load_shield(p["root"] / "corrupt.safetensors"), ["damaged"]),
    ("load_shield-number", lambda p: aeshield.load_shield(42), ["name_or_path", "int"]),
    ("load_classifier-shield", lambda p: aeshield.load_classifier("aaa-mnist"), ["aaa-mnist", "not a classifier"]),
    ("load_classifier-other-arch", lambda p: aeshield.load_classifier(p["root"] / "other.safetensors"),
     ["does not fit architecture"]),
    ("load_classifier-unknown", lambda p: aeshield.load_classifier("mnist-q"), ["mnist-q"]),
    ("Shielded-purifier-type", lambda p: Shielded("aaa-mnist", p["clf"]), ["purifier", "nn.Module"]),
    ("Shielded-classifier-type", lambda p: Shielded(p["shield"], None), ["classifier", "nn.Module"]),
    ("Shielded-detector-type", lambda p: Shielded(p["shield"], p["clf"], detector=nn.Identity()),
     ["detector", "Detector"]),
    ("Shielded-shield-as-classifier", lambda p: Shielded(p["shield"], p["shield"]).predict(p["x"]),
     ["classifier", "logits"]),
    ("predict-uint8", lambda p: predict(p["clf"], (p["x"] * 255).to(torch.uint8)), ["x", "float"]),
    ("predict-nan", lambda p: predict(p["clf"], _nan(p["x"])), ["x", "NaN"]),
    ("predict-batch-0", lambda p: predict(p["clf"], p["x"], batch_size=0), ["batch_size", ">= 1"]),
    ("predict-rgb", lambda p: predict(p["clf"], torch.rand(2, 3, 28, 28)), ["x", "(3, 28, 28)"]),
    ("predict-range", lambda p: predict(p["clf"], p["x"] * 255), ["x", "[0.0, 1.0]"]),
    ("pgd-label-12", lambda p: pgd(p["clf"], p["x"], torch.full((6,), 12), steps=2), ["y", "label 12", "10 classes"]),
    ("pgd-label-negative", lambda p: pgd(p["clf"], p["x"], torch.full((6,), -5), steps=2), ["y", ">= 0"]),
    ("pgd-float64", lambda p: pgd(p["clf"], p["x"].double(), p["y"], steps=2), ["x", "float64", "x.to("]),
    ("pgd-steps-0", lambda p: pgd(p["clf"], p["x"], p["y"], steps=0), ["steps", ">= 1"]),
    ("pgd-steps-negative", lambda p: pgd(p["clf"], p["x"], p["y"], steps=-3), ["steps", ">= 1"]),
    ("pgd-restarts-0", lambda p: pgd(p["clf"], p["x"], p["y"], restarts=0), ["restarts", ">= 1"]),
    ("pgd-step-size-negative", lambda p: pgd(p["clf"], p["x"], p["y"], step_size=-0.01), ["step_size", ">= 0"]),
    ("pgd-eps-negative", lambda p: pgd(p["clf"], p["x"], p["y"], eps=-0.3), ["eps", ">= 0"]),
    ("pgd-eps-beyond-range", lambda p: pgd(p["clf"], p["x"], p["y"], eps=5), ["eps", "pixel range"]),
    ("pgd-rgb", lambda p: pgd(p["clf"], torch.rand(6, 3, 28, 28), p["y"], steps=2), ["x", "(3, 28, 28)"]),
    ("pgd-32x32", lambda p: pgd(p["clf"], torch.rand(6, 1, 32, 32), p["y"], steps=2), ["x", "(1, 32, 32)"]),
    ("pgd-norm", lambda p: pgd(p["clf"], p["x"], p["y"], norm="L3"), ["norm", "Linf, L2"]),
    ("pgd-3d", lambda p: pgd(p["clf"], p["x"][0], p["y"]), ["x", "(N, C, H, W)"]),
    ("pgd-float-labels", lambda p: pgd(p["clf"], p["x"], p["y"].float()), ["y", "integer"]),
    ("fgsm-label-count", lambda p: fgsm(p["clf"], p["x"], p["y"][:3]), ["y", "(6,)"]),
    ("bim-steps-0", lambda p: bim(p["clf"], p["x"], p["y"], steps=0), ["steps", ">= 1"]),
    ("cw-steps-0", lambda p: cw_l2(p["clf"], p["x"], p["y"], steps=0), ["steps", ">= 1"]),
    ("cw-label-12", lambda p: cw_l2(p["clf"], p["x"], torch.full((6,), 12), steps=2), ["y", "label 12"]),
    ("evaluate-label-12", lambda p: evaluate(p["clf"], p["x"], torch.full((6,), 12), [], ThreatModel("Linf", 0.3),
                                             progress=False), ["y", "label 12"]),
    ("evaluate-label-negative", lambda p: evaluate(p["clf"], p["x"], torch.full((6,), -5), [],
                                                   ThreatModel("Linf", 0.3), progress=False), ["y", ">= 0"]),
    ("evaluate-batch-0", lambda p: evaluate(p["clf"], p["x"], p["y"], [], ThreatModel("Linf", 0.3), batch_size=0,
                                            progress=False), ["batch_size", ">= 1"]),
    ("evaluate-unknown-attack", lambda p: evaluate(p["clf"], p["x"], p["y"], [AttackSpec("pgdd")],
                                                   ThreatModel("Linf", 0.3), progress=False), ["pgdd", "pgd"]),
    ("evaluate-unknown-setting", lambda p: evaluate(p["clf"], p["x"], p["y"], [AttackSpec("pgd", {"stepz": 3})],
                                                    ThreatModel("Linf", 0.3), progress=False), ["stepz", "steps"]),
    ("evaluate-threat-type", lambda p: evaluate(p["clf"], p["x"], p["y"], [], "Linf", progress=False),
     ["threat", "ThreatModel"]),
    ("evaluate-nan", lambda p: evaluate(p["clf"], _nan(p["x"]), p["y"], [], ThreatModel("Linf", 0.3),
                                        progress=False), ["x", "NaN"]),
    ("audit-budget", lambda p: audit(p["clf"], p["x"], p["y"], ThreatModel("Linf", 0.3), budget="huge",
                                     progress=False), ["budget", "quick"]),
    ("audit-label-12", lambda p: audit(p["clf"], p["x"], torch.full((6,), 12), ThreatModel("Linf", 0.3),
                                       progress=False), ["y", "label 12"]),
    ("ThreatModel-norm", lambda p: ThreatModel("L3", 0.3), ["norm", "Linf, L2"]),
    ("ThreatModel-eps", lambda p: ThreatModel("Linf", -1), ["eps", ">= 0"]),
]


@pytest.mark.parametrize("case", CALLS, ids=[c[0] for c in CALLS])
def test_bad_call_raises_a_clear_value_or_type_error(case, parts):
    _, call, words = case
    with pytest.raises((ValueError, TypeError, AeshieldError)) as info:
        call(parts)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_the_python_battery_is_large_enough():
    assert len(CALLS) >= 25 and len({c[0] for c in CALLS}) == len(CALLS)


class _Never(Detector):
    def score(self, x):
        return torch.zeros(x.shape[0])
