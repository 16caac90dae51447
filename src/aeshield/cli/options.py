"""Options shared by several commands, with their choices taken from the registries and their
types and defaults from the config dataclasses that define them."""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from pathlib import Path

import click


class Choice(click.Choice):
    """``click.Choice`` whose refusal names the closest valid choice."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            from ..errors import nearest

            self.fail(f"{value!r} is not one of {', '.join(map(repr, self.choices))}"
                      f"{nearest(value, self.choices)}", param, ctx)


def dataset_choice(*, image_size: tuple[int, int] | None = None) -> click.Choice:
    """The registered datasets (only those of ``image_size`` pixels, for commands whose models
    are built for one size)."""
    from ..data import DATASETS

    names = [name for name, info in DATASETS.items()
             if image_size is None or tuple(info.shape[1:]) == tuple(image_size)]
    return Choice(names)


# The same option, with the same name, type and help, on every command that has it.
def device_option(default: str = "cpu") -> Callable[[Callable], Callable]:
    return click.option("--device", default=default, show_default=True,
                        help="Torch device: cpu, cuda, cuda:N" + (", or auto (cuda when available)."
                                                                  if default == "auto" else "."))


def seed_option(help: str = "Seed of the image subset and the attacks.") -> Callable[[Callable], Callable]:
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


def progress_option() -> Callable[[Callable], Callable]:
    return click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")


def jobs_option(help: str) -> Callable[[Callable], Callable]:
    return click.option("--jobs", type=click.IntRange(min=1), default=None, help=help)


EPS = click.FloatRange(min=0)  # the threat model refuses an L-inf radius beyond the pixel range
COUNT = click.IntRange(min=1)
SIZE = click.FloatRange(min=0)


def resolve_device(name: str) -> str:
    """``auto`` as cuda when available; any other name must be a device torch knows. Under
    ``torchrun`` this also joins the process group (:func:`join_ranks`), and a CUDA device is
    this rank's GPU."""
    return join_ranks(_device(name))


def join_ranks(device: str) -> str:
    """Started by ``torchrun``: join its process group for ``device`` (gloo on CPUs, NCCL on
    GPUs), send the other ranks' standard output to /dev/null (rank 0 prints the results), and
    return this rank's device. Started alone: ``device`` unchanged."""
    from .. import distributed

    if not distributed.launched():
        return device
    world = distributed.init(device)
    if not world.main and sys.stdout is sys.__stdout__:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return str(distributed.device_of_rank(device))


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise click.BadParameter(f"{name!r} is not a torch device (cpu, cuda, cuda:0, ...)",
                                 param_hint="--device") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is available here; use --device cpu", param_hint="--device")
    return name


def _normalize_value(ctx, param, value):
    if value is None:
        return None
    from ..models.specs import parse_normalize

    try:
        return parse_normalize(value)
    except ValueError as err:
        raise click.BadParameter(str(err).removeprefix(f"--normalize {value!r}: "), ctx, param) from None


CLASSIFIER_SPEC_HELP = ("a shipped name (`aeshield models`), a .safetensors path with its sidecar, "
                        "package.module:factory or path/to/file.py:factory (a function returning an "
                        "nn.Module) optionally followed by =WEIGHTS.safetensors, or an exported program "
                        "FILE.pt2")


def classifier_options(*, multiple: bool = False, required: bool = True, help: str | None = None
                       ) -> Callable[[Callable], Callable]:
    """``--classifier SPEC`` (repeatable with ``multiple``, for an ensemble) and ``--normalize
    MEAN,STD``; the command receives ``classifier`` (a tuple with ``multiple``) and
    ``normalize`` (``(mean, std)`` tuples or None). Load with ``load_cli_classifier``."""
    def decorate(f: Callable) -> Callable:
        f = click.option("--normalize", metavar="MEAN,STD", default=None, callback=_normalize_value,
                         help="The classifier expects normalised input: MEAN,STD for one channel (or "
                              "the same for every channel), or m1,..,mC,s1,..,sC; it is fed (x - mean) / "
                              "std of the [0, 1] images that shields and attacks work on.")(f)
        return click.option("--classifier", "classifier", metavar="SPEC", multiple=multiple,
                            required=required, default=None,
                            help=(help or "The classifier") + ": " + CLASSIFIER_SPEC_HELP
                            + (" (repeatable)." if multiple else "."))(f)
    return decorate


def load_cli_classifier(spec: str, normalize=None, device: str = "cpu"):
    """``(module, ModelInfo)`` for a ``--classifier SPEC`` (``models.specs.load_classifier_spec``):
    eval mode, frozen, on ``device``."""
    from ..models.specs import load_classifier_spec

    return load_classifier_spec(spec, normalize=normalize, device=device)


def data_options(f: Callable) -> Callable:
    """``--dataset NAME`` (a registered dataset) or ``--data SPEC`` (a dataset name, a .npz file
    or an image folder); the command receives ``dataset`` and ``data_file`` (the name it had
    when it took .npz files only). Load with ``load_cli_data``."""
    f = click.option("--data", "data_file", metavar="SPEC", default=None,
                     help="The images: a registered dataset name, a .npz file with arrays x ((N,C,H,W) or "
                          "(N,H,W,C), uint8 or float in [0,1]) and y (integer labels), or an image folder "
                          "with one subfolder per class (sorted names are labels 0..K-1).")(f)
    return click.option("--dataset", type=dataset_choice(), default=None,
                        help="A registered dataset (the same as --data NAME).")(f)


def data_spec(dataset: str | None, data: str | None) -> str:
    """The one data spec that ``--dataset`` or ``--data`` gives (``UsageError`` for none or both)."""
    if (dataset is None) == (data is None):
        raise click.UsageError("give either --dataset NAME or --data SPEC (a dataset name, a .npz file or an "
                               "image folder)" + (", not both" if dataset is not None else ""))
    return dataset if dataset is not None else data


def load_cli_data(dataset: str | None, data: str | None, *, split: str = "test", n: int | None = None,
                  seed: int = 0, num_classes: int | None = None, val_fraction: float = 0.1):
    """The images ``--dataset``/``--data`` name (``data.user.load_data``): ``split`` of a
    registered dataset, or of a file or folder (``"train"``/``"val"``: a seeded partition with
    ``val_fraction``; ``"test"``: all of it), then a seeded subset of ``n`` when given."""
    from ..data.user import load_data

    spec = data_spec(dataset, data)
    if dataset is not None:  # the registered dataset, even where a folder of that name exists here
        from ..data import load_dataset

        images = load_dataset(dataset, split)
    else:
        images = load_data(spec, split, val_fraction=val_fraction, seed=seed, num_classes=num_classes)
    return images.subset(n, seed=seed) if n is not None else images


def chosen_test_images(dataset: str | None, data_file: str | None, *, n: int, seed: int, num_classes: int | None):
    """The seeded subset of ``n`` test images named by ``--dataset`` or ``--data``."""
    return load_cli_data(dataset, data_file, n=n, seed=seed, num_classes=num_classes)


def force_option() -> Callable[[Callable], Callable]:
    return click.option("--force", is_flag=True,
                        help="Go on although the shield, the classifier(s) and the data do not fit each "
                             "other (dataset, input shape, value range, classes); the mismatches are "
                             "recorded with the result.")


def check_cli_compatible(data, classifiers, *, shield: str | None = None, force: bool = False) -> list[str]:
    """Refuse a shield (name or path), classifiers (``(module, ModelInfo)`` pairs) and data
    (``LabeledImages``) that do not fit (``defenses.compat``; several classifiers must also fit
    each other), before any work starts; with ``force``, return the mismatches (each logged as a
    warning) for the result's record."""
    from ..defenses.compat import (check_compatible, check_members, classifier_signature, data_signature,
                                   shield_signature)

    images = data_signature(data)
    guard = shield_signature(shield) if shield else None
    signatures = [classifier_signature(info, module, images.input_shape) for module, info in classifiers]
    found = [line for signature in signatures
             for line in check_compatible(data=images, classifier=signature, shield=guard, force=force)]
    if guard is None:  # with a shield, each classifier was compared with it
        found += check_members(signatures, force=force)
    return list(dict.fromkeys(found))  # check_compatible has logged each as a warning


def deployment_description(shield: str | None) -> str | None:
    """What besides the weights defines the audited pipeline (None: shield + classifier)."""
    if not shield:
        return None
    from ..defenses.cards import read_card
    from ..defenses.registry import get_defense, list_defenses
    from ..models.io import read_sidecar, resolve_weights

    side = read_sidecar(resolve_weights(shield))
    method = side.get("method")
    if method not in list_defenses() or get_defense(method).deploy is None:
        return None
    if side.get("source_target"):
        return f"{method} as configured in {side['source_target']}, detectors calibrated there"
    deployment = read_card(side).deployment or {}
    if deployment.get("calibration") == "stored":
        return (f"{method} as its card configures it, detectors at the thresholds its card stores "
                f"(false-positive rate {deployment.get('false_positive_rate')} on clean held-out images)")
    return f"{method} as its card configures it, detectors calibrated on {deployment.get('calibration_split')}"


def deployed_pipeline(shield: str, classifier, device: str):
    """``shield`` in front of ``classifier`` as its card deploys it: a shipped PuVAE or MagNet
    comes with its detectors, calibrated on the card's clean split with its seed (a shield of
    ``train_shield`` with the thresholds its card stores), so that eval and the audit attack
    the whole defense and not its autoencoder alone."""
    from .. import load_shield
    from ..defenses.base import Shielded
    from ..defenses.registry import load_pipeline

    if deployment_description(shield) is None:  # no detectors (or an old file of a method aeshield lacks)
        return Shielded(load_shield(shield, device=device), classifier).eval()
    return load_pipeline(shield, classifier, device=device)


def _field(cls: type, name: str) -> tuple[dataclasses.Field, Any]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f, hints[name]
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def config_option(cls: type, name: str, *param_decls: str, help: str, **overrides: Any
                  ) -> Callable[[Callable], Callable]:
    """A click option for field ``name`` of the config dataclass ``cls``: its type and default
    are the field's, so a hyperparameter is defined once (``--step-size`` for ``step_size``).
    ``overrides`` pass through to ``click.option`` (e.g. a ``click.Choice`` type)."""
    f, hint = _field(cls, name)
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    flag = "--" + name.replace("_", "-")
    settings: dict[str, Any] = {"default": default, "show_default": default is not None, "help": help}
    if base is bool:
        decls = param_decls or (f"{flag}/--no-{flag[2:]}",)
    else:
        decls = param_decls or (flag,)
        settings["type"] = base
    settings.update(overrides)
    return click.option(*decls, name, **settings)


def source_checkout() -> Path | None:
    """The git checkout aeshield runs from (an editable install), or None for an installed
    package: committed results and shipped weights can only be written from a checkout."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / ".git").exists() and (root / "pyproject.toml").is_file() else None


def guard_published(out: Path, publish: bool) -> None:
    checkout = source_checkout()
    if checkout is None or publish:
        return
    committed = (checkout / "docs" / "results").resolve()
    if out.resolve() == committed or committed in out.resolve().parents:
        raise click.UsageError(f"{out} holds the committed results; write there only with --publish")
