"""The weights shipped in the package load without pickle and reproduce what their sidecars
record (clean accuracy measured on the stored float16 weights)."""

import json

import pytest
import torch

import aeshield
from aeshield.data import load_dataset
from aeshield.experiments import Runner, list_targets, load_config
from aeshield.models.io import shipped_dir

SIDECARS = sorted(shipped_dir().glob("*.json")) if shipped_dir().exists() else []
SHIPPED = {p.stem for p in SIDECARS}


def _accuracy(model, x, y):
    with torch.no_grad():
        return sum(int((model(a).argmax(1) == b).sum()) for a, b in zip(x.split(2000), y.split(2000))) / len(y)


def test_weights_are_shipped_and_small():
    assert {"aaa-mnist", "mnist-b", "mnist-c"} <= SHIPPED
    for side in SIDECARS:
        weights = side.with_suffix(".safetensors")
        assert weights.exists() and weights.stat().st_size < 5e6, weights.name


@pytest.mark.slow
@pytest.mark.parametrize("side", [s for s in SIDECARS if json.loads(s.read_text())["kind"] == "classifier"],
                         ids=lambda p: p.stem)
def test_shipped_classifier_reproduces_recorded_accuracy(side):
    meta = json.loads(side.read_text())
    test = load_dataset(meta["dataset"], "test")
    model = aeshield.load_classifier(side.stem)
    assert abs(_accuracy(model, test.images, test.labels) - meta["clean_accuracy"]) < 2e-3


@pytest.mark.slow
@pytest.mark.parametrize("side", [s for s in SIDECARS if json.loads(s.read_text())["kind"] == "shield"],
                         ids=lambda p: p.stem)
def test_shipped_shield_reproduces_recorded_accuracy(side):
    meta = json.loads(side.read_text())
    test = load_dataset(meta["dataset"], "test")
    if meta.get("method", "aaa") != "aaa":
        _check_method_pipeline(side, meta, test)
        return
    shield = aeshield.load_shield(side.stem)
    checked = 0
    for name, recorded in meta["clean_accuracy"].items():
        if name not in SHIPPED:
            continue  # e.g. mnist-a is trained locally, not shipped (too large)
        model = aeshield.Shielded(shield, aeshield.load_classifier(name))
        assert abs(_accuracy(model, test.images, test.labels) - recorded) < 2e-3, name
        checked += 1
    assert checked >= 1


def _check_method_pipeline(side, meta, test):
    """Detectors and class-conditional purifiers are whole pipelines: rebuild them the way the
    target that shipped them does (calibration included) and compare with the sidecar."""
    from aeshield.experiments.config import load_config, shield_spec
    from aeshield.experiments.methods import get_method
    from aeshield.experiments.runner import Runner
    from aeshield.train.classifier import accuracy

    runner = Runner(load_config(meta["source_target"], "quick"), progress=False)
    method = get_method(meta["method"])
    spec = shield_spec(meta["shield_spec"])
    module = method.load(runner, spec, side.with_suffix(".safetensors"))
    # The sidecar names classifiers as shipped ("mnist-b"), the target by config key ("F").
    names = runner.config.raw["ship"][side.stem].get("classifier_names", {})
    checked = [key for key in runner.config.classifiers if names.get(key, key) in meta["clean_accuracy"]]
    for key in checked:
        pipeline = method.pipeline(runner, spec, module, key)
        measured = accuracy(pipeline, test.images, test.labels)
        assert abs(measured - meta["clean_accuracy"][names.get(key, key)]) < 2e-3, key
    assert checked


SHIPPING_TARGETS = [t for t in list_targets()
                    if (c := load_config(t, "quick")).raw.get("ship") and c.dataset in ("mnist", "fashion-mnist")]


@pytest.mark.slow
@pytest.mark.parametrize("target", SHIPPING_TARGETS)
def test_every_shipped_artifact_is_found_under_the_key_its_target_looks_up(target, tmp_path):
    # A shipped file is only worth shipping if a clean checkout's run finds it instead of
    # training it again: its sidecar's spec_hash must be the key the runner looks up.
    runner = Runner(load_config(target, "quick"), tmp_path / "out", artifacts=tmp_path / "empty",
                    progress=False)
    for ship_name, what in runner.config.raw["ship"].items():
        if "classifier" in what:
            path, key = runner.classifier_artifact(what["classifier"])
        elif "adversarially_trained" in what:
            path, key = runner.adversarially_trained_artifact(what["adversarially_trained"])
        elif "select" in what:  # the shield its selection chose, as the shipped card names it
            chosen = json.loads((shipped_dir() / f"{ship_name}.json").read_text())["card"]["selection"]["chosen"]
            path, key = runner.shield_artifact(chosen)
        else:
            path, key = runner.shield_artifact(what["shield"])
        found = runner.store.find(path, key)
        assert found is not None and found.parent == shipped_dir(), f"{target}: {ship_name} not found"


def test_aaa_fmnist_is_the_headline_shield_the_lambda_selection_chose():
    """The name a user loads is the shield of aaa-fmnist's headline row (chosen on validation
    images), with the selection in its card; the earlier lambda-0.05 shield keeps a name of its own."""
    import hashlib
    from pathlib import Path

    from aeshield.defenses.cards import read_card
    from aeshield.models.io import read_sidecar

    # Since session 26 the selection's fifth candidate, lambda 0.15 at four times the budget.
    side, chosen = (json.loads((shipped_dir() / f"{n}.json").read_text())
                    for n in ("aaa-fmnist", "aaa-fmnist-lam0.15-4x"))
    weights = (shipped_dir() / "aaa-fmnist-lam0.15-4x.safetensors").read_bytes()
    assert (shipped_dir() / "aaa-fmnist.safetensors").read_bytes() == weights
    assert side["weights_sha256"] == hashlib.sha256(weights).hexdigest() and side["spec_hash"] == chosen["spec_hash"]
    selection = read_card(read_sidecar(shipped_dir() / "aaa-fmnist.safetensors")).selection
    assert selection["name"] == "lambda" and selection["chosen"] == "xent+mse-lam0.15-4x"
    assert selection["report"] == "selection_lambda.md" and "2000 validation images" in selection["rule"]
    # The published selection report chose the same shield.
    report = (Path(__file__).parents[1] / "docs/results/aaa-fmnist/quick/selection_lambda.md").read_text()
    assert [line.split("|")[1].strip() for line in report.splitlines() if line.endswith("| yes |")] == [
        selection["chosen"]]
    shield, headline = aeshield.load_shield("aaa-fmnist"), aeshield.load_shield("aaa-fmnist-lam0.15-4x")
    assert all(torch.equal(a, b) for a, b in zip(shield.state_dict().values(), headline.state_dict().values()))
    assert side["shield_spec"]["lam"] == 0.15 and side["shield_spec"]["epochs"] == 8
    old = json.loads((shipped_dir() / "aaa-fmnist-lam0.05.json").read_text())
    assert old["shield_spec"]["lam"] == 0.05 and "selection" not in old["card"]
