"""Options shared by several commands, with their choices taken from the registries and their
types and defaults from the config dataclasses that define them."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

import click


def dataset_choice(*, image_size: tuple[int, int] | None = None) -> click.Choice:
    """The registered datasets (only those of ``image_size`` pixels, for commands whose models
    are built for one size)."""
    from ..data import DATASETS

    names = [name for name, info in DATASETS.items()
             if image_size is None or tuple(info.shape[1:]) == tuple(image_size)]
    return click.Choice(names)


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
