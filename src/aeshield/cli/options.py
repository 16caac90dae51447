"""Options shared by several commands, with their choices taken from the registries and their
types and defaults from the config dataclasses that define them."""

from __future__ import annotations

import dataclasses
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
    """``auto`` as cuda when available; any other name must be a device torch knows."""
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


def data_options(f: Callable) -> Callable:
    """``--dataset NAME`` (a registered dataset's test split) or ``--data FILE.npz`` (your own
    images: arrays x and y)."""
    f = click.option("--data", "data_file", type=click.Path(dir_okay=False), default=None,
                     help="Your own test images instead of --dataset: a .npz file with arrays x "
                          "((N,C,H,W) or (N,H,W,C), uint8 or float in [0,1]) and y (integer labels).")(f)
    return click.option("--dataset", type=dataset_choice(), default=None,
                        help="A registered dataset whose test split is used.")(f)


def chosen_test_images(dataset: str | None, data_file: str | None, *, n: int, seed: int, num_classes: int | None):
    """The seeded subset of ``n`` test images named by ``--dataset`` or ``--data``."""
    if (dataset is None) == (data_file is None):
        raise click.UsageError("give either --dataset NAME or --data FILE.npz")
    if data_file is not None:
        from ..data.user import load_npz

        return load_npz(data_file, num_classes=num_classes).subset(n, seed=seed)
    from ..data import load_dataset

    return load_dataset(dataset, "test").subset(n, seed=seed)


def check_fits(model_name: str, images, role: str = "classifier") -> None:
    """Refuse images of another shape than the weights were trained on (their sidecar's dataset),
    naming both sides, before any work starts."""
    from ..data import DATASETS
    from ..models.io import read_sidecar, resolve_weights

    trained_on = read_sidecar(resolve_weights(model_name)).get("dataset")
    if trained_on in DATASETS:
        shape = tuple(DATASETS[trained_on].shape)
        if tuple(images.shape[1:]) != shape:
            from ..errors import ConfigError

            raise ConfigError(f"the {role} {model_name} takes {trained_on} images of shape {shape} (C, H, W); "
                              f"the data are {tuple(images.shape[1:])}")


def classes_of(model_name: str) -> int | None:
    """The number of classes of weights trained on a registered dataset, else None."""
    from ..data import DATASETS
    from ..models.io import read_sidecar, resolve_weights

    trained_on = read_sidecar(resolve_weights(model_name)).get("dataset")
    return len(DATASETS[trained_on].classes) if trained_on in DATASETS else None


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
