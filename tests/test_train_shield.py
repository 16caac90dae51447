"""train_shield: any shield for any classifier and images, from tensors, a Dataset or a DataLoader;
autoencoders built for the data's shape; detectors' thresholds stored in the card; resume."""

import json

import click.testing
import numpy as np
import pytest
import torch
from torch import nn

import aeshield
from aeshield.defenses.aaa import AAAConfig, AAAShieldConfig
from aeshield.defenses.registry import load_pipeline, load_shield
from aeshield.defenses.train_shield import default_config, train_shield
from aeshield.errors import ConfigError
from aeshield.inputs import InputError
from aeshield.models import MODELS, create_model

SHAPE = (3, 10, 10)  # not a multiple of 4: the autoencoders pad and crop
CLASSES = 4


def tiny_classifier(shape=SHAPE, classes=CLASSES, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), classes)).eval()


def tiny_data(n=40, shape=SHAPE, classes=CLASSES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


def tiny_aaa(**training):
    values = {"epochs": 1, "batch_size": 16, "attack_steps": 2, "warmup_steps": 2, "val_attack_steps": 1, **training}
    return AAAShieldConfig(architecture="conv-ae-small", training=AAAConfig(**values))


def weights(shield):
    return {k: v.clone() for k, v in shield.module.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- shapes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["conv-ae", "conv-ae-small", "conv-ae-wide", "unet", "unet-quick"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 10, 10), (2, 9, 13), (1, 5, 7)])
def test_autoencoders_take_any_channel_count_and_size(name, shape):
    model = create_model(name, shape).eval()
    x = torch.rand(2, *shape)
    out = model(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    if hasattr(model, "decode"):  # S2SNet and latent attacks use encode/decode
        assert model.decode(model.encode(x)).shape == x.shape


@pytest.mark.parametrize("name", ["conv-ae", "conv-ae-small", "conv-ae-wide", "unet", "unet-quick", "cvae-mnist",
                                  "cvae-cifar10-quick", "draw"])
def test_at_its_datasets_shape_an_architecture_is_the_module_it_always_was(name):
    native = MODELS[name].input_shape
    torch.manual_seed(0)
    default = create_model(name)
    torch.manual_seed(0)
    shaped = create_model(name, native)
    assert type(shaped) is type(default)
    assert same_weights(default.state_dict(), shaped.state_dict())
    if name.startswith(("conv-ae", "unet")):
        x = torch.rand(2, *native)
        assert torch.equal(default.eval()(x), shaped.eval()(x))


@pytest.mark.parametrize("name", ["cvae-mnist", "cvae-cifar10", "draw", "draw-attn"])
def test_architectures_that_cannot_adapt_say_which_shape_they_take(name):
    with pytest.raises(ConfigError, match=r"takes .* images only.*conv-ae"):
        create_model(name, (3, 10, 10))


def test_a_shield_of_an_odd_shape_saves_and_loads_back_at_that_shape(tmp_path):
    x, y = tiny_data(shape=(2, 7, 9))
    clf = tiny_classifier((2, 7, 9))
    config = AAAShieldConfig(architecture="unet-quick", training=tiny_aaa().training)
    shield = train_shield(clf, (x, y), config=config, out=tmp_path / "odd", progress=False)
    assert shield.card.input_shape == (2, 7, 9) and shield.card.num_classes == CLASSES
    loaded = load_shield(shield.path)
    assert torch.equal(loaded(x), shield.purifier(x))
    side = json.loads(shield.path.with_suffix(".json").read_text())
    assert side["card"]["input_shape"] == [2, 7, 9] and side["card"]["value_range"] == [0.0, 1.0]


# ---- data forms ------------------------------------------------------------------------------
class _Items(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_aaa_from_tensors_a_dataset_and_a_dataloader_trains_the_same_shield():
    x, y = tiny_data()
    clf = tiny_classifier()
    threat = aeshield.ThreatModel("Linf", 0.1)
    forms = [(x, y), _Items(x, y), torch.utils.data.DataLoader(_Items(x, y), batch_size=7)]
    shields = [aeshield.train_shield([clf], form, threat, config=tiny_aaa(), progress=False) for form in forms]
    for shield in shields:
        assert shield.config.training.eps == 0.1  # the threat model sets AAA's training eps
        assert shield.card.training_threat["eps"] == 0.1
        assert shield.path is None
    assert same_weights(weights(shields[0]), weights(shields[1]))
    assert same_weights(weights(shields[0]), weights(shields[2]))
    assert shields[0].pipeline(clf)(x[:3]).shape == (3, CLASSES)
    # handed back as it came in: eval mode, gradients on (training froze it for the run only)
    assert not clf.training and all(p.requires_grad for p in clf.parameters())


def test_default_config_adapts_to_the_data_and_replaces_every_stage():
    config = default_config("s2snet", SHAPE, epochs=1, batch_size=8, seed=3)
    assert (config.stage1.epochs, config.stage2.epochs, config.stage2.batch_size, config.stage1.seed) == (1, 1, 8, 3)
    assert default_config("puvae", (3, 32, 32)).architecture == "cvae-cifar10"
    assert default_config("puvae", (1, 28, 28)).architecture == "cvae-mnist"
    with pytest.raises(ConfigError, match="puvae's conditional VAEs take .*for other shapes use defense aaa"):
        default_config("puvae", SHAPE)


# ---- detectors: stored thresholds ------------------------------------------------------------
def test_magnet_thresholds_are_stored_and_deploy_without_any_data(tmp_path):
    x, y = tiny_data(n=60)
    clf = tiny_classifier()
    config = default_config("magnet", SHAPE, epochs=1, batch_size=16)
    shield = train_shield(clf, (x, y), defense="magnet", config=config, false_positive_rate=0.05,
                          out=tmp_path / "magnet", progress=False)
    deployment = shield.card.deployment
    assert deployment["calibration"] == "stored" and deployment["false_positive_rate"] == 0.05
    assert set(deployment["thresholds"]) == set(config.detectors)
    assert shield.config.fpr == 0.05
    assert not (tmp_path / "magnet.ckpt").exists() and not (tmp_path / "magnet.ckpt.json").exists()

    loaded = load_pipeline(shield.path, clf)  # no dataset, no calibration images
    here = shield.pipeline(clf)
    probe = torch.cat([x, torch.rand(20, *SHAPE) * 0.2])  # clean images and far-off ones
    assert torch.equal(loaded.predict(probe), here.predict(probe))
    assert torch.equal(loaded.detector.rejects(probe), here.detector.rejects(probe))
    assert torch.equal(loaded(probe), here(probe))
    stored = [float(m.threshold) for m in loaded.detector.members]
    assert stored == [deployment["thresholds"][name] for name in config.detectors]
    assert bool(loaded.detector.rejects(probe).any())  # the detectors do reject something


def test_puvae_trains_on_its_shape_and_stores_its_rmse_threshold(tmp_path):
    x, y = tiny_data(n=24, shape=(1, 28, 28), classes=10)
    clf = tiny_classifier((1, 28, 28), classes=10)
    config = default_config("puvae", (1, 28, 28), epochs=1, batch_size=12, architecture="cvae-mnist-quick")
    shield = train_shield([clf], (x, y), defense="puvae", config=config, out=tmp_path / "puvae", progress=False)
    assert set(shield.card.deployment["thresholds"]) == {"rmse"}
    loaded = load_pipeline(shield.path, clf)
    assert float(loaded.detector.threshold) == shield.card.deployment["thresholds"]["rmse"]
    assert torch.equal(loaded.predict(x), shield.pipeline().predict(x))


# ---- checkpoint and resume -------------------------------------------------------------------
class _Interrupted(Exception):
    pass


class _StopsAfter(nn.Module):
    """The classifier, until ``calls`` forward passes have run: then the run is 'killed'."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.calls = model, calls

    def forward(self, x):
        self.calls -= 1
        if self.calls < 0:
            raise _Interrupted
        return self.model(x)


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    x, y = tiny_data(n=48)
    config = tiny_aaa(epochs=2, checkpoint_every=1)
    whole = train_shield(tiny_classifier(), (x, y), config=config, out=tmp_path / "whole", progress=False)

    # 1 pass probes the class count, then 3 per training step (2 PGD steps + the loss): killed in the 3rd step
    flaky = _StopsAfter(tiny_classifier(), calls=1 + 3 * 2 + 2)
    with pytest.raises(_Interrupted):
        train_shield(flaky, (x, y), config=config, out=tmp_path / "cut", progress=False)
    assert (tmp_path / "cut.ckpt").exists() and not (tmp_path / "cut.safetensors").exists()
    state = torch.load(tmp_path / "cut.ckpt", weights_only=True)["state"]
    assert state["steps"] == 2

    resumed = train_shield(tiny_classifier(), (x, y), config=config, out=tmp_path / "cut", progress=False)
    assert same_weights(weights(resumed), weights(whole))
    assert not (tmp_path / "cut.ckpt").exists()
    assert resumed.card.to_dict() == whole.card.to_dict()


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    x, y = tiny_data(n=48)
    flaky = _StopsAfter(tiny_classifier(), calls=1 + 3 * 2 + 2)
    with pytest.raises(_Interrupted):
        train_shield(flaky, (x, y), config=tiny_aaa(checkpoint_every=1), out=tmp_path / "s", progress=False)
    with pytest.raises(ConfigError, match="checkpoint of a run with other data or settings"):
        train_shield(tiny_classifier(), (x, y), config=tiny_aaa(checkpoint_every=1, lr=0.01),
                     out=tmp_path / "s", progress=False)


# ---- refusals ----------------------------------------------------------------------------------
def _refused(error, match, *args, **kwargs):
    kwargs.setdefault("progress", False)
    with pytest.raises(error, match=match):
        train_shield(*args, **kwargs)


def test_bad_arguments_are_refused_before_training_with_one_line():
    x, y = tiny_data()
    clf = tiny_classifier()
    _refused(InputError, "float images", clf, ((x * 255).to(torch.uint8), y))
    _refused(InputError, r"pixel values must lie in \[0.0, 1.0\]", clf, (x * 4 - 2, y))
    _refused(InputError, "without labels", clf, x)
    _refused(InputError, r"expected shape \(40,\)", clf, (x, y[:-1]))
    _refused(InputError, "out of range for a model with 4 classes", clf, (x, y + 3))
    _refused(InputError, r"the model cannot take images of shape \(1, 10, 10\)", clf, (torch.rand(40, 1, 10, 10), y))
    _refused(InputError, r"val: images of shape \(3, 8, 8\)", clf, (x, y), val=(torch.rand(8, 3, 8, 8), y[:8]))
    _refused(ConfigError, "not a shield", clf, (x, y), defense="adversarial_training")
    _refused(ConfigError, "unknown defense 'aa'.*did you mean 'aaa'", clf, (x, y), defense="aa")
    _refused(ConfigError, "exactly one classifier", [clf, clf], (x, y), defense="puvae")
    _refused(ConfigError, "puvae's conditional VAEs take", clf, (x, y), defense="puvae")
    _refused(ConfigError, "takes 1x28x28 images only", clf, (x, y), defense="dbp",
             config=default_config("dbp", SHAPE).__class__(architecture="draw"))
    _refused(ConfigError, "nn.Module", "mnist-b", (x, y))
    _refused(ConfigError, "L-inf", clf, (x, y), aeshield.ThreatModel("L2", 1.0))
    _refused(ConfigError, "takes a AAAShieldConfig", clf, (x, y), config=AAAConfig())
    _refused(ConfigError, "different numbers of classes", [clf, tiny_classifier(classes=5)], (x, y))
    _refused(InputError, "cannot be split", clf, (x[:1], y[:1]))


# ---- the command line --------------------------------------------------------------------------
def _cli_files(tmp_path, n: int) -> None:
    """A random mnist-c classifier (clf.safetensors) and ``n`` random images (data.npz) in ``tmp_path``."""
    from aeshield.models.io import save_weights

    torch.manual_seed(0)
    save_weights(create_model("mnist-c"), tmp_path / "clf.safetensors", architecture="mnist-c", dataset="mnist",
                 kind="classifier")
    g = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=g.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
             y=g.integers(0, 10, n))


def test_cli_trains_a_magnet_shield_on_a_npz_and_it_deploys_from_its_card(tmp_path):
    from aeshield.cli import main

    _cli_files(tmp_path, 30)
    out = tmp_path / "shield.safetensors"
    args = ["train", "shield", "--defense", "magnet", "--classifier", str(tmp_path / "clf.safetensors"),
            "--data", str(tmp_path / "data.npz"), "--epochs", "1", "--batch-size", "8",
            "--false-positive-rate", "0.1", "--out", str(out), "--no-progress"]
    result = click.testing.CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "1x28x28 images, 10 classes" in result.output and "false-positive rate 0.1" in result.output
    card = json.loads(out.with_suffix(".json").read_text())["card"]
    assert card["dataset"] == "data" and card["trained_against"] == [str(tmp_path / "clf.safetensors")]
    pipeline = load_pipeline(out, aeshield.load_classifier(str(tmp_path / "clf.safetensors")))
    assert pipeline.detector is not None

    refused = click.testing.CliRunner().invoke(main, [*args, "--eps", "0.1"])
    assert refused.exit_code == 2 and "--eps sets the radius aaa trains against" in refused.output


def test_cli_takes_aaas_training_recipe_and_the_sidecar_keeps_it(tmp_path):
    from aeshield.cli import main

    _cli_files(tmp_path, 40)
    out = tmp_path / "shield.safetensors"
    base = ["train", "shield", "--classifier", str(tmp_path / "clf.safetensors"), "--data", str(tmp_path / "data.npz"),
            "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress"]
    recipe = ["--eps", "0.3", "--attack-steps", "2", "--step-size", "0.15", "--lr", "0.01", "--cosine-lr",
              "--precision", "bfloat16"]
    result = click.testing.CliRunner().invoke(main, [*base, *recipe, "--architecture", "conv-ae-small"])
    assert result.exit_code == 0, result.output
    config = json.loads(out.with_suffix(".json").read_text())["card"]["config"]["training"]
    assert (config["attack_steps"], config["step_size"], config["lr"], config["cosine_lr"]) == (2, 0.15, 0.01, True)
    assert config["precision"] == "bfloat16"

    refused = click.testing.CliRunner().invoke(main, [*base, "--defense", "magnet", "--attack-steps", "2"])
    assert refused.exit_code == 2 and "--attack-steps: settings of aaa's training, not of magnet" in refused.output


def test_every_shipped_card_reads_and_writes_back_unchanged():
    from aeshield.defenses.cards import Card
    from aeshield.models.io import shipped_dir

    cards = [json.loads(p.read_text())["card"] for p in sorted(shipped_dir().glob("*.json"))
             if "card" in json.loads(p.read_text())]
    assert cards
    for card in cards:
        assert "num_classes" not in card and "value_range" not in card
        assert Card.from_dict(card).to_dict() == card
