"""The defense registry and cards: a defense defined here (config, train, build) is trained,
saved with its card and loaded back by path through ``aeshield.load_shield``; every shipped
shield loads from its card and answers exactly as it did before cards existed."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aeshield
from aeshield.defenses.base import AutoencoderPurifier
from aeshield.defenses.cards import CARD_VERSION, migrate_folder, migrate_sidecar, read_card
from aeshield.defenses.registry import (Defense, Trained, config_from_dict, config_to_dict,
                                        get_defense, list_defenses, register, save_defense,
                                        unregister)
from aeshield.models.io import load_weights, shipped_dir
from aeshield.threat import ThreatModel

SHIPPED_SHIELDS = sorted(p for p in shipped_dir().glob("*.json")
                         if json.loads(p.read_text())["kind"] == "shield")


# ---- a tiny defense, defined here and nowhere else ------------------------------------------
@dataclass(frozen=True)
class TinyTraining:
    steps: int = 3
    lr: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class TinyConfig:
    width: int = 3
    training: TinyTraining = field(default_factory=TinyTraining)


class TinyAutoencoder(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(1, width, 3, padding=1)
        self.decoder = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(torch.relu(self.encoder(x))))


def tiny_build(config: TinyConfig) -> nn.Module:
    return TinyAutoencoder(config.width)


def tiny_train(config: TinyConfig, classifiers, data, *, val=None, checkpoint=None, progress=True,
               device="cpu") -> Trained:
    torch.manual_seed(config.training.seed)
    model = tiny_build(config).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.training.lr)
    history = []
    for step in range(config.training.steps):
        recon = model(data.images)
        loss = (recon - data.images).pow(2).mean() + F.cross_entropy(classifiers[0](recon), data.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": loss.item()})
    return Trained(model.eval(), history)


TINY = Defense(name="tiny-test-defense", config=TinyConfig, train=tiny_train, build=tiny_build,
               purifier=lambda module, config: AutoencoderPurifier(module),
               training_threat=lambda config: ThreatModel("Linf", 0.1))


@pytest.fixture
def tiny_defense():
    register(TINY)
    yield TINY
    unregister(TINY.name)


def _classifier() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()


def test_a_defense_defined_in_a_test_trains_saves_and_loads_back_by_path(tiny_defense, tmp_path):
    assert tiny_defense.name in list_defenses()
    gen = torch.Generator().manual_seed(0)
    data = SimpleNamespace(images=torch.rand(8, 1, 28, 28, generator=gen),
                           labels=torch.randint(10, (8,), generator=gen))
    config = TinyConfig(width=2, training=TinyTraining(steps=4))
    trained = get_defense(tiny_defense.name).train(config, [_classifier()], data, progress=False)
    assert len(trained.history) == 4 and trained.history[-1]["loss"] < trained.history[0]["loss"]

    path = save_defense(trained.module, tmp_path / "tiny", defense=tiny_defense.name, config=config,
                        dataset="mnist", trained_against=["linear"])
    card = json.loads(path.with_suffix(".json").read_text())["card"]
    assert card["version"] == CARD_VERSION and card["defense"] == tiny_defense.name
    assert card["config"] == {"width": 2, "training": {"steps": 4, "lr": 0.1, "seed": 0}}
    assert card["input_shape"] == [1, 28, 28] and card["trained_against"] == ["linear"]
    assert card["training_threat"]["eps"] == 0.1

    shield = aeshield.load_shield(str(path))
    x = torch.rand(5, 1, 28, 28, generator=gen)
    with torch.no_grad():
        assert torch.equal(shield(x), trained.module(x))
    assert not shield.training


def test_an_unknown_card_version_or_config_key_is_refused(tiny_defense, tmp_path):
    path = save_defense(TinyAutoencoder(2), tmp_path / "tiny", defense=tiny_defense.name,
                        config=TinyConfig(width=2), dataset="mnist")
    side_path = path.with_suffix(".json")
    side = json.loads(side_path.read_text())
    side["card"]["config"]["depth"] = 3
    side_path.write_text(json.dumps(side))
    with pytest.raises(ValueError, match="unknown keys"):
        aeshield.load_shield(str(path))
    side["card"]["version"] = CARD_VERSION + 1
    side_path.write_text(json.dumps(side))
    with pytest.raises(ValueError, match="card version"):
        aeshield.load_shield(str(path))


def test_configs_round_trip_through_json():
    for name in list_defenses():
        defense = get_defense(name)
        config = defense.config(architecture="mnist-b") if name == "adversarial_training" else defense.config()
        assert config_from_dict(defense.config, json.loads(json.dumps(config_to_dict(config)))) == config


# ---- shipped shields: cards, and the same outputs as before ----------------------------------
def _legacy_load_shield(name: str) -> nn.Module:
    """``aeshield.load_shield`` as it was before cards (a case per defense), kept here to
    show that loading from the card changes nothing."""
    from aeshield.defenses.magnet import DiverseAutoencoder
    from aeshield.defenses.puvae import PuVAE

    model, side = load_weights(name)
    if side.get("method") == "puvae":
        return PuVAE(model, sample=bool((side.get("shield_spec") or {}).get("sample"))).eval()
    if side.get("members") is not None:
        model = DiverseAutoencoder(model)
    return AutoencoderPurifier(model).eval()


def _outputs(shield: nn.Module, side: dict) -> torch.Tensor:
    shape = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}[side["dataset"]]
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # a MagNet ensemble draws its member per example
    with torch.no_grad():
        return shield(x)


# A few output values of load_shield at the commit before cards (the inputs of ``_outputs``;
# every 97th value of the flattened batch); aaa-mnist's since issue 26 retrained it.
BEFORE_CARDS = {
    "aaa-mnist": [0.078023, 0.733588, 0.049373, 0.854759, 0.365387, 0.785308, 0.666045, 0.889904],
    "magnet-div-mnist": [0.1189, 0.427971, 0.194572, 0.9167, 0.552768, 0.557842, 0.243757, 0.775094],
    "puvae-fmnist": [0.035488, 0.55188, 0.571604, 0.58982, 0.66266, 0.506442, 0.569077, 0.695683],
}


@pytest.mark.parametrize("side_path", SHIPPED_SHIELDS, ids=lambda p: p.stem)
def test_shipped_shield_loads_from_its_card_as_before(side_path):
    side = json.loads(side_path.read_text())
    card = side["card"]
    assert card["version"] == CARD_VERSION and card["defense"] == side["method"]
    assert card["dataset"] == side["dataset"] and len(card["input_shape"]) == 3
    assert card["trained_against"] == side["trained_against"]
    assert "spec_hash" in side and "shield_spec" in side  # the runner and the audit read them
    new = _outputs(aeshield.load_shield(side_path.stem), side)
    old = _outputs(_legacy_load_shield(side_path.stem), side)
    assert torch.equal(new, old)
    if side_path.stem in BEFORE_CARDS:
        values = new.flatten()[::97][:8]
        assert torch.allclose(values, torch.tensor(BEFORE_CARDS[side_path.stem]), atol=2e-6)


def test_aaa_cards_name_their_training_threat_and_audited_figures():
    card = json.loads((shipped_dir() / "aaa-mnist.json").read_text())["card"]
    assert card["training_threat"] == {"norm": "Linf", "eps": 0.3, "bounds": [0.0, 1.0]}
    assert card["config"]["architecture"] == "conv-ae" and card["config"]["training"]["lam"] == 0.01
    figures = {e["classifier"]: e for e in card["evaluated"]}
    assert figures["mnist-b"]["threat"]["eps"] == 0.3 and 0 <= figures["mnist-b"]["robust"] <= 1


def test_migration_keeps_every_key_and_the_weights_and_is_rerunnable(tmp_path):
    for side_path in SHIPPED_SHIELDS:
        shutil.copy(side_path, tmp_path / side_path.name)
        shutil.copy(side_path.with_suffix(".safetensors"), tmp_path / f"{side_path.stem}.safetensors")
    assert migrate_folder(tmp_path) == []  # the shipped sidecars are migrated already
    old_format = tmp_path / "magnet-div-mnist.json"
    shipped = json.loads(old_format.read_text())
    legacy = {k: v for k, v in shipped.items() if k != "card"}
    old_format.write_text(json.dumps(legacy))
    weights = (tmp_path / "magnet-div-mnist.safetensors").read_bytes()

    assert read_card(legacy).config == shipped["card"]["config"]  # migrated on read
    assert migrate_sidecar(old_format, evaluated=shipped["card"]["evaluated"])
    migrated = json.loads(old_format.read_text())
    assert migrated == shipped
    assert not migrate_sidecar(old_format)
    assert (tmp_path / "magnet-div-mnist.safetensors").read_bytes() == weights


def test_methods_give_their_defense_config():
    from aeshield.experiments import list_targets, load_config
    from aeshield.experiments.methods import get_method

    seen = set()
    for target in list_targets():
        for spec in load_config(target, "quick").shields.values():
            method = get_method(spec.method)
            defense = get_defense(method.defense or method.name)
            assert isinstance(method.config(spec, 0), defense.config)
            seen.add(spec.method)
    assert seen == {"aaa", "magnet", "puvae", "s2snet", "dbp"}
    assert get_method("aaa").training_threat(load_config("demo", "quick").shields["xent+mse"]).eps == 0.3


def test_no_defense_imports_evaluation_or_experiments():
    above = ("eval", "experiments", "cli")
    for source in (Path(aeshield.__file__).parent / "defenses").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:  # from ..x import (lazy too)
                assert (node.module or "").split(".")[0] not in above, (source.name, node.module)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith(tuple(f"aeshield.{a}" for a in above)), \
                    (source.name, node.module)



@pytest.mark.parametrize("shield", ["magnet-mnist", "puvae-mnist"])
def test_a_shipped_detector_defense_deploys_from_its_card_as_its_target_did(shield):
    """``load_pipeline`` needs no experiment YAML: the card's deployment gives the same
    calibrated pipeline as the reproduce runner's method built from the target's spec."""
    from aeshield.data import load_dataset
    from aeshield.defenses.registry import load_pipeline
    from aeshield.experiments.config import shield_spec
    from aeshield.experiments.methods import get_method
    from aeshield.models.predict import REJECT, predict

    side = json.loads((shipped_dir() / f"{shield}.json").read_text())
    assert side["card"]["deployment"] == {"calibration_split": "val", "seed": 0}
    classifier = aeshield.load_classifier("mnist-b")
    module, _ = load_weights(shield)
    by_target = get_method(side["method"]).deploy(shield_spec(side["shield_spec"]), module, classifier,
                                                  load_dataset("mnist", "val"), 0)
    by_card = load_pipeline(shield, classifier)
    x = load_dataset("mnist", "test").subset(64, seed=5).images
    x = torch.cat([x, (x + 0.5 * torch.randn_like(x)).clamp(0, 1)])  # noisy ones are rejected
    labels = predict(by_card, x)
    assert (labels == REJECT).any() and (labels != REJECT).any()
    assert torch.equal(labels, predict(by_target, x))


def test_puvae_calibration_subset_is_part_of_its_config():
    from aeshield.data import load_dataset
    from aeshield.defenses import puvae
    from aeshield.defenses.registry import load_defense

    module, config, _, _ = load_defense("puvae-mnist")
    classifier = aeshield.load_classifier("mnist-b")
    val = load_dataset("mnist", "val")
    subset = dataclasses.replace(config, calibration_n=300)
    by_config = puvae.DEFENSE.pipeline(module, subset, classifier, val.images, 0)
    by_hand = puvae.build_pipeline(module, classifier, detector=True, sample=False, fpr=config.fpr,
                                   calibration=val.subset(300, seed=2).images)
    everything = puvae.DEFENSE.pipeline(module, config, classifier, val.images, 0)
    assert torch.equal(by_config.detector.threshold, by_hand.detector.threshold)
    assert not torch.equal(by_config.detector.threshold, everything.detector.threshold)
