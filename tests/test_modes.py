"""Attacks only read a model: after every registered attack, after the audit and after
torchattacks' PGD on a loaded ``Shielded``, every BatchNorm buffer is bitwise what it was and
every submodule is in the mode it was in (issue 24)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aeshield
from aeshield.attacks import run_attack
from aeshield.attacks.registry import attacks
from aeshield.defenses import Detector, Shielded
from aeshield.threat import Norm, ThreatModel


def _state(model: nn.Module):
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    return buffers, modes


def _assert_unchanged(model: nn.Module, before) -> None:
    buffers, modes = before
    now = dict(model.named_buffers())
    assert any("running_mean" in name for name in buffers)  # the pipeline has BatchNorm layers
    for name, value in buffers.items():
        assert torch.equal(now[name], value), name
    assert [m.training for m in model.modules()] == modes


class _Brightness(Detector):
    def score(self, x):
        return x.flatten(1).mean(1)


@pytest.fixture(scope="module")
def pipeline():
    model = Shielded(aeshield.load_shield("aaa-mnist"), aeshield.load_classifier("mnist-b"))
    from aeshield.data import load_dataset

    test = load_dataset("mnist", "test").subset(6, seed=3)
    return model, test.images, test.labels


def test_a_loaded_shield_is_frozen_and_its_pipeline_in_eval_mode(pipeline):
    model, _, _ = pipeline
    shield = aeshield.load_shield("aaa-mnist")
    assert not shield.training and not any(p.requires_grad for p in shield.parameters())
    assert not model.training and not any(m.training for m in model.modules())


# Small settings so that every attack runs in a second or two; the property does not depend on
# the budget.
SMALL = {"steps": 2, "restarts": 1, "apgd_iters": 2, "apgd_restarts": 1, "fab_iters": 2, "square_queries": 5,
         "binary_search_steps": 1}


@pytest.mark.parametrize("attack", [a.name for a in attacks()])
@pytest.mark.parametrize("start_mode", ["eval", "train"])
def test_every_attack_leaves_batchnorm_buffers_and_modes_as_they_were(attack, start_mode, pipeline):
    model, x, y = pipeline
    info = next(a for a in attacks() if a.name == attack)
    if not info.applies_to(model):  # the detector-aware attacks: the same pipeline with a detector
        model = Shielded(model.purifier, model.classifier, _Brightness()).eval()
        model.detector.calibrate(x, 0.0)
    assert info.applies_to(model)
    norm = Norm.LINF if Norm.LINF in info.norms else Norm.L2
    threat = ThreatModel(norm, 0.3 if norm is Norm.LINF else 2.0)
    settings = {k: v for k, v in SMALL.items() if k in getattr(info.settings, "__dataclass_fields__", {})}
    model.train(start_mode == "train")
    try:
        before = _state(model)
        run_attack(attack, model, x, y, threat, torch.Generator().manual_seed(0), **settings)
        _assert_unchanged(model, before)
    finally:
        model.eval()


def test_the_audit_leaves_batchnorm_buffers_and_modes_as_they_were(pipeline):
    from aeshield.eval.audit import audit

    model, x, y = pipeline
    before = _state(model)
    audit(model, x[:4], y[:4], ThreatModel("Linf", 0.3), budget="quick", progress=False, batch_size=4)
    _assert_unchanged(model, before)


def test_torchattacks_pgd_on_a_loaded_pipeline_moves_no_batchnorm_statistic(pipeline):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = pipeline
    before = _state(model)
    x_adv = torchattacks.PGD(model, eps=0.3, alpha=0.05, steps=3)(x, y)
    _assert_unchanged(model, before)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    model(x)  # a later forward in the mode torchattacks restored: still eval, still no update
    _assert_unchanged(model, before)
