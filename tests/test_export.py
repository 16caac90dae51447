"""Export (issue 25, item 4): a shipped pipeline, detectors inside, as ONNX and .pt2, run in
onnxruntime and torch on 200 real MNIST test images next to the pipeline it came from."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from aeshield import load_classifier
from aeshield.cli import main
from aeshield.data import load_dataset
from aeshield.defenses.base import REJECT, AutoencoderPurifier, Purifier, Shielded
from aeshield.defenses.export import (NO_DETECTOR_MARGIN, Deployable, ExportCheck, check_export, export_onnx,
                                      export_pt2, fixed_member, runner)
from aeshield.defenses.magnet import DiverseAutoencoder, magnet
from aeshield.models.exported import load_exported
from aeshield.defenses.puvae import build_pipeline
from aeshield.defenses.registry import load_pipeline
from aeshield.errors import ConfigError
from aeshield.models import create_model

from conftest import tiny_mlp

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def images():
    """200 MNIST test images, then 20 of uniform noise that every detector rejects."""
    test = load_dataset("mnist", "test").subset(200, seed=0).images
    return test, torch.rand(20, *SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def classifier():
    return load_classifier("mnist-b")


# Shipped, deterministic: AAA (no detector), MagNet (four detectors), PuVAE (mean decoding, RMSE detector).
@pytest.fixture(scope="module", params=["aaa-mnist", "magnet-mnist", "puvae-mnist"])
def pipeline(request, classifier):
    return request.param, load_pipeline(request.param, classifier)


def test_deployable_decides_as_predict(pipeline, images):
    name, model = pipeline
    test, noise = images
    x = torch.cat([test, noise])
    with torch.no_grad():
        logits, labels, margin = Deployable(model)(x)
    assert torch.equal(labels, model.predict(x))
    assert torch.equal(logits, model(x))
    if model.detector is None:
        assert (margin == NO_DETECTOR_MARGIN).all()
    else:
        assert torch.equal(margin > 0, model.detector.rejects(x))
        assert (labels[len(test):] == REJECT).all(), f"{name}: noise images must be rejected"


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_matches_pipeline(pipeline, images, fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    name, model = pipeline
    test, noise = images
    path = (export_onnx if fmt == "onnx" else export_pt2)(model, tmp_path / f"{name}.{fmt}", input_shape=SHAPE)
    check = check_export(model, path, test)
    print(f"{name} {fmt}: {check.summary()}")  # the numbers the report quotes (pytest -s)
    assert check.n == 200 and check.max_abs_diff < 1e-4
    assert check.disagreements == check.near_threshold <= 2 and check.ok
    run = runner(path)
    _, labels, margin = run(noise)  # the reject path, and a batch size other than the traced one
    if model.detector is not None:
        assert (labels == REJECT).all() and (margin > 0).all()
    else:
        assert (labels != REJECT).all() and torch.isinf(margin).all()
    logits, _, _ = run(test[:1])
    assert logits.shape == (1, 10)
    assert not list(tmp_path.glob(".*")), "no temporary file left beside the export"


def test_onnx_names_and_free_batch(classifier, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = Shielded(AutoencoderPurifier(create_model("conv-ae-small")), tiny_mlp()).eval()
    path = model.to_onnx(tmp_path / "m.onnx")  # input shape from the classifier's in_shape
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["logits", "labels", "reject_margin"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed size
    x = torch.rand(3, *SHAPE)
    assert check_export(model, path, x).ok
    assert check_export(model, model.to_pt2(tmp_path / "m.pt2"), x).ok


def test_input_shape_needed_without_in_shape(tmp_path):
    model = Shielded(None, nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    with pytest.raises(ConfigError, match="input_shape"):
        model.to_pt2(tmp_path / "m.pt2")
    assert check_export(model, model.to_pt2(tmp_path / "m.pt2", SHAPE), torch.rand(4, *SHAPE)).ok


def _tiny_magnet(members: int) -> Shielded:
    torch.manual_seed(0)
    autoencoders = [create_model("conv-ae-small") for _ in range(members)]
    clean = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(0))
    return magnet(DiverseAutoencoder(autoencoders), tiny_mlp().eval(), detectors=("l2", "jsd10"), fpr=0.1,
                  calibration=clean)


def test_random_shields_refused_and_fixed_member_exports(tmp_path):
    diverse = _tiny_magnet(2)
    with pytest.raises(ConfigError, match=r"drawn at random .*--member K"):
        export_pt2(diverse, tmp_path / "d.pt2", input_shape=SHAPE)
    no_reformer = Shielded(None, diverse.classifier, diverse.detector)  # random through the detectors alone
    with pytest.raises(ConfigError, match="drawn at random"):
        Deployable(no_reformer)
    sampling = build_pipeline(create_model("cvae-mnist-quick").eval(), tiny_mlp().eval(), detector=True, sample=True,
                              fpr=0.1, calibration=torch.rand(16, *SHAPE))
    with pytest.raises(ConfigError, match=r"sample=True.*mean reconstruction.*sample = False"):
        export_onnx(sampling, tmp_path / "p.onnx", input_shape=SHAPE)
    assert not list(tmp_path.iterdir())

    fixed = fixed_member(diverse, 1)
    x = torch.rand(8, *SHAPE)
    assert torch.equal(fixed.predict(x), Shielded(fixed.purifier, fixed.classifier, fixed.detector).predict(x))
    assert check_export(fixed, export_pt2(fixed, tmp_path / "d.pt2", input_shape=SHAPE), x).ok
    with pytest.raises(ConfigError, match=r"\[0, 2\)"):
        fixed_member(diverse, 2)
    with pytest.raises(ConfigError, match="needs no member"):
        fixed_member(Shielded(None, tiny_mlp()), 0)


class _Branching(Purifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.mean() > 0.5 else 1 - x  # a Python branch on a value: no program can hold it


def test_unexportable_part_named(tmp_path):
    with pytest.raises(ConfigError, match=r"the purifier \(_Branching\).*test_export.py:\d+"):
        export_pt2(Shielded(_Branching(), tiny_mlp()), tmp_path / "b.pt2", input_shape=SHAPE)
    assert not (tmp_path / "b.pt2").exists()


def test_check_tolerates_only_decisions_at_the_threshold():
    common = dict(n=200, label_differences=0, max_margin_diff=0.0, tolerance=1e-4, margin_tol=1e-4)
    assert ExportCheck(max_abs_diff=1e-5, disagreements=1, near_threshold=1, **common).ok
    assert not ExportCheck(max_abs_diff=1e-5, disagreements=2, near_threshold=1, **common).ok
    assert not ExportCheck(max_abs_diff=2e-4, disagreements=0, near_threshold=0, **common).ok


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_cli_export_round_trip(fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"aaa.{fmt}"
    result = CliRunner().invoke(main, ["export", "--shield", "aaa-mnist", "--classifier", "mnist-b",
                                       "--format", fmt, "--out", str(out), "--n-check", "50"])
    assert result.exit_code == 0, result.output
    assert "50 images: max |logit diff|" in result.output and result.output.strip().endswith("ok")
    x = load_dataset("mnist", "test").subset(10, seed=3).images
    logits, labels, _ = runner(out)(x)
    reference = Shielded(load_pipeline("aaa-mnist", load_classifier("mnist-b")).purifier, load_classifier("mnist-b"))
    assert (logits - reference(x).detach()).abs().max() < 1e-4
    assert torch.equal(labels, reference.predict(x))


def test_cli_refuses_random_shield(tmp_path):
    result = CliRunner().invoke(main, ["export", "--shield", "magnet-div-mnist", "--classifier", "mnist-b",
                                       "--format", "pt2", "--out", str(tmp_path / "d.pt2"), "--n-check", "0"])
    assert result.exit_code == 2
    assert "error:" in result.output and "--member K" in result.output
    assert not (tmp_path / "d.pt2").exists()


def test_wrong_input_shape_is_an_input_error(tmp_path):
    from aeshield.inputs import InputError

    with pytest.raises(InputError, match=r"shape \(3, 32, 32\)"):
        export_pt2(Shielded(None, tiny_mlp()), tmp_path / "m.pt2", input_shape=(3, 32, 32))


def test_classifier_loaded_from_a_pt2_exports(tmp_path):
    """A user's classifier given as a .pt2 program (whose module refuses train() and eval())."""
    batch = {0: torch.export.Dim("batch", min=1)}
    torch.export.save(torch.export.export(tiny_mlp().eval(), (torch.rand(2, *SHAPE),), dynamic_shapes=(batch,)),
                      tmp_path / "clf.pt2")
    clf = load_exported(tmp_path / "clf.pt2")
    model = Shielded(AutoencoderPurifier(create_model("conv-ae-small").eval()), clf)
    x = torch.rand(5, *SHAPE)
    assert check_export(model, export_pt2(model, tmp_path / "m.pt2", input_shape=SHAPE), x).ok
