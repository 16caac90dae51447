"""The CLI's structure: one module per verb group, choices from the registries, training options
from the trainers' config dataclasses."""

import dataclasses

import click
import click.testing
import pytest

from aeshield.cli import main
from aeshield.cli.options import config_option
from aeshield.data import DATASETS
from aeshield.defenses.aaa import AAAConfig
from aeshield.defenses.magnet import MagNetTrainConfig
from aeshield.defenses.puvae import PuVAETrainConfig
from aeshield.train.classifier import ClassifierConfig

TRAINERS = {"classifier": ClassifierConfig, "aaa": AAAConfig, "puvae": PuVAETrainConfig,
            "magnet": MagNetTrainConfig}


@pytest.mark.parametrize("command", sorted(TRAINERS))
def test_training_options_are_the_config_fields(command):
    config = TRAINERS[command]
    fields = {f.name: f for f in dataclasses.fields(config)}
    options = [p for p in main.commands["train"].commands[command].params if isinstance(p, click.Option)]
    shared = [p for p in options if p.name in fields and not p.required]
    assert len(shared) >= 4, command
    for option in shared:
        assert option.default == fields[option.name].default, (command, option.name)


def test_a_float_option_is_a_float():
    @click.command()
    @config_option(AAAConfig, "lam", help="lambda")
    def show(lam):
        click.echo(repr(lam))

    assert click.testing.CliRunner().invoke(show, ["--lam", "1e-2"]).output.strip() == "0.01"
    result = click.testing.CliRunner().invoke(show, ["--lam", "much"])
    assert result.exit_code == 2 and "not a valid float" in result.output


def test_dataset_choices_come_from_the_registry():
    fetch = main.commands["data"].commands["fetch"]
    assert list(fetch.params[0].type.choices) == list(DATASETS)
    puvae = main.commands["train"].commands["puvae"]
    dataset = next(p for p in puvae.params if p.name == "dataset")
    assert set(dataset.type.choices) == {n for n, d in DATASETS.items() if d.shape[1:] == (28, 28)}


def _leaf_commands(group, prefix="aeshield"):
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _leaf_commands(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


def test_commands_share_option_names_and_tensor_commands_take_a_device():
    """--out, --device, --seed, --progress/--no-progress and --jobs mean one thing everywhere."""
    from aeshield.cli import main

    for path, command in _leaf_commands(main):
        options = {opt: param for param in command.params for opt in param.opts + param.secondary_opts}
        assert "--json-out" not in options or "--out" in options, path
        if "--no-progress" in options:
            assert "--progress" in options, f"{path}: --no-progress without --progress"
        for param in command.params:
            assert param.help or param.param_type_name == "argument", (path, param.name)
        moves_tensors = any(word in path for word in ("train", "eval", "attack", "audit", "reproduce"))
        if moves_tensors:
            assert "--device" in options, f"{path} has no --device"


def test_train_aaa_takes_every_setting_of_the_quick_recipe(tmp_path):
    """aaa-mnist's quick recipe (batch 32, lr 0.01 on a half cosine) can be given to `train aaa`:
    the options reach the trainer's config, which the shield's sidecar records."""
    import json

    from aeshield.models.io import sidecar_path

    out = tmp_path / "shield.safetensors"
    result = click.testing.CliRunner().invoke(main, [
        "train", "aaa", "--classifier", "mnist-c", "--dataset", "mnist", "--autoencoder", "conv-ae-small",
        "--attack-steps", "1", "--step-size", "0.3", "--epochs", "1", "--train-limit", "64",
        "--batch-size", "32", "--lr", "0.005", "--cosine-lr", "--warmup-steps", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads(sidecar_path(out).read_text())["config"]
    assert (config["batch_size"], config["lr"], config["cosine_lr"], config["warmup_steps"]) == (32, 0.005, True, 1)
