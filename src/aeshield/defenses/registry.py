"""Every defense, registered once: its config dataclass, how to train it, how to build its
untrained module, and how a trained module is deployed (as a purifier, with calibrated
detectors).

A defense module defines a frozen config dataclass, ``train(config, classifiers, data, ...)
-> Trained`` and ``build(config) -> nn.Module``, and exposes them as ``DEFENSE = Defense(...)``.
``BUILTIN`` below names the shipped ones (imported on first use, so importing one defense does
not import the others); ``register`` adds one at run time (a test's, a user's).

A trained shield is saved with a *card* in its sidecar (``defenses.cards``); ``load_shield``
rebuilds it from the card alone: ``build(config)``, the stored weights, then ``purifier``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import WeightsError
from ..models.modes import frozen_for_use
from ..records import config_dict
from ..threat import ThreatModel

# name -> "module:attribute" of its Defense; one line registers a defense shipped with aeshield.
BUILTIN: dict[str, str] = {
    "aaa": "aeshield.defenses.aaa:DEFENSE",
    "adversarial_training": "aeshield.defenses.adversarial_training:DEFENSE",
    "magnet": "aeshield.defenses.magnet:DEFENSE",
    "puvae": "aeshield.defenses.puvae:DEFENSE",
    "s2snet": "aeshield.defenses.s2snet:DEFENSE",
    "dbp": "aeshield.defenses.dbp:DEFENSE",
}
_REGISTERED: dict[str, "Defense"] = {}


@dataclass
class Trained:
    """What a defense's ``train`` returns: the trained module (in eval mode), the training
    loop's history, and anything else worth keeping in the sidecar (e.g. AAA's visits)."""

    module: nn.Module
    history: list[dict] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def seeded_build(build: Callable[..., nn.Module], config: Any, seed: int, device: str = "cpu", *,
                 input_shape: Sequence[int] | None = None) -> nn.Module:
    """``build(config[, input_shape])`` with its initial weights drawn after
    ``torch.manual_seed(seed)``: a training run is then fixed by its seed alone, never by
    whatever the process's RNG held (which depended on the cells a worker had run before)."""
    torch.manual_seed(seed)
    return build_for_shape(build, config, input_shape).to(device)


def build_for_shape(build: Callable[..., nn.Module], config: Any, input_shape: Sequence[int] | None) -> nn.Module:
    """``build(config, input_shape=...)`` for a build that takes the image shape (the shipped
    shields' do: their autoencoders adapt to it), else ``build(config)``. No shape (``None`` or
    ``()``, a card of data of unknown shape) builds the architecture's default module."""
    if input_shape and "input_shape" in inspect.signature(build).parameters:
        return build(config, input_shape=tuple(int(d) for d in input_shape))
    return build(config)


def _no_threat(config: Any) -> ThreatModel | None:
    return None


@dataclass(frozen=True)
class Defense:
    """One defense.

    - ``config``: its frozen config dataclass (nested dataclasses allowed); a field
      ``architecture`` names the trained module's architecture in the sidecar.
    - ``train(config, classifiers, data, *, val=None, checkpoint=None, progress=True,
      device="cpu", **options) -> Trained``: ``data``/``val`` are labelled image sets
      (``.images``, ``.labels``); ``classifiers`` the frozen models it is trained against.
    - ``build(config) -> nn.Module``: the untrained module, the shape the weights load into.
    - ``purifier(module, config) -> nn.Module``: the trained module as a purifier (images to
      images); ``None`` for a defense that is not a shield (adversarial training makes a
      classifier).
    - ``deploy(module, config, classifier, calibration, seed[, thresholds=])`` (optional): the
      whole pipeline ``Shielded(purifier, classifier, detector)``, detectors calibrated on the
      clean ``calibration`` images, or set to stored ``thresholds`` (what ``thresholds`` read
      from a calibrated pipeline); without it the pipeline is ``Shielded(purifier, classifier)``.
    - ``thresholds(pipeline, config) -> dict`` (with ``deploy``): the calibrated thresholds of
      a deployed pipeline by detector name, stored in a card so it deploys without data.
    - ``training_threat(config)``: the threat model it is trained against (None: clean data).
    - ``from_sidecar(sidecar) -> config``: the config of weights saved before cards existed.
    """

    name: str
    config: type
    train: Callable[..., Trained]
    build: Callable[[Any], nn.Module]
    purifier: Callable[[nn.Module, Any], nn.Module] | None
    deploy: Callable[..., nn.Module] | None = None
    training_threat: Callable[[Any], ThreatModel | None] = _no_threat
    from_sidecar: Callable[[dict], Any] | None = None
    reference: str = ""
    thresholds: Callable[[nn.Module, Any], dict[str, float]] | None = None

    @property
    def is_shield(self) -> bool:
        return self.purifier is not None

    def architecture(self, config: Any) -> str:
        return str(getattr(config, "architecture", self.name))

    def pipeline(self, module: nn.Module, config: Any, classifier: nn.Module,
                 calibration: torch.Tensor | None = None, seed: int = 0, *,
                 thresholds: dict[str, float] | None = None) -> nn.Module:
        """What attacks see: ``deploy``'s pipeline, or ``Shielded(purifier, classifier)``;
        detectors set to stored ``thresholds`` when given (no calibration images needed)."""
        from .base import Shielded

        if self.deploy is not None:
            if thresholds is not None:
                return self.deploy(module, config, classifier, None, seed, thresholds=thresholds)
            return self.deploy(module, config, classifier, calibration, seed)
        if self.purifier is None:
            raise TypeError(f"{self.name} is not a shield; its trained module is the classifier")
        return Shielded(self.purifier(module, config), classifier).eval()


def register(defense: Defense, *, replace: bool = False) -> Defense:
    """Add ``defense`` under its name (an error if the name is taken, unless ``replace``)."""
    if not replace and (defense.name in _REGISTERED or defense.name in BUILTIN):
        raise ValueError(f"a defense named {defense.name!r} is already registered")
    _REGISTERED[defense.name] = defense
    return defense


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def get_defense(name: str) -> Defense:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in BUILTIN:
        raise ValueError(f"unknown defense {name!r}; known: {list_defenses()}")
    module, attr = BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attr)


def list_defenses() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTERED))


# ---- configs as JSON ---------------------------------------------------------------------
def config_to_dict(config: Any) -> dict:
    """A config dataclass (nested ones included) as JSON-able values; a field declared
    ``records.added_later`` is left out while it holds its default (``records.config_dict``),
    so that the cards and checkpoint markers of configs written before it existed read the same."""
    return json_safe(config_dict(config))


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def config_from_dict(cls: type, data: dict) -> Any:
    """``cls`` from ``config_to_dict``'s output: nested dataclasses rebuilt, lists as tuples,
    unknown keys an error (a card written by a newer aeshield should not load silently)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    values = {}
    for name, value in data.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def pick(cls: type, *sources: dict | None, **overrides: Any) -> Any:
    """``cls`` from the fields of ``sources`` it knows (the first source holding a field wins,
    ``None`` values skipped, lists as tuples), then ``overrides``: how a defense reads the
    config of weights saved before cards, from their sidecar's ``config``/``shield_spec``."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        for source in sources:
            if source and source.get(f.name) is not None:
                value = source[f.name]
                values[f.name] = tuple(value) if isinstance(value, list) else value
                break
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


# ---- saving and loading trained defenses --------------------------------------------------
def save_defense(module: nn.Module, path: str | Path, *, defense: str, config: Any, dataset: str,
                 trained_against: Sequence[str] = (), evaluated: Sequence[dict] = (),
                 deployment: dict | None = None, half: bool = False,
                 input_shape: Sequence[int] | None = None, num_classes: int | None = None,
                 value_range: Sequence[float] | None = None, **metadata: Any) -> Path:
    """Write ``module``'s weights and a sidecar carrying its card (``defenses.cards``);
    ``deployment`` ({"calibration_split", "seed"}, or stored thresholds) for a defense with
    calibrated detectors; ``input_shape`` and ``num_classes`` for data that is not a
    registered dataset (the module is rebuilt for that shape on load)."""
    from ..models.io import save_weights
    from .cards import make_card

    info = get_defense(defense)
    card = make_card(info, config, dataset, trained_against=trained_against, evaluated=evaluated,
                     deployment=deployment, input_shape=input_shape, num_classes=num_classes,
                     value_range=value_range)
    return save_weights(module, path, architecture=info.architecture(config), dataset=dataset,
                        half=half, kind="shield" if info.is_shield else "classifier",
                        method=defense, card=card.to_dict(), **metadata)


def load_defense(name_or_path: str | Path, device: str | torch.device = "cpu"
                 ) -> tuple[nn.Module, Any, Defense, dict]:
    """``(trained module, config, defense, sidecar)`` of a saved defense, from its card (an
    old sidecar without one is migrated on read)."""
    from ..models.io import load_weights, read_sidecar, resolve_weights
    from .cards import read_card

    path = resolve_weights(name_or_path)
    side = read_sidecar(path)
    card = read_card(side)
    info = get_defense(card.defense)
    config = config_from_dict(info.config, card.config)
    # The card's shape rebuilds a module adapted to user data; at a dataset's own shape (every
    # shipped card) the build is the architecture's default module.
    module, side = load_weights(path, model=build_for_shape(info.build, config, card.input_shape), device=device)
    return module, config, info, side


def with_input_shape(purifier: nn.Module, input_shape) -> nn.Module:
    """``purifier`` carrying the (C, H, W) its card was trained on as ``in_shape``, so that a
    pipeline whose classifier declares none (a user's ``nn.Module``) still checks its inputs
    and exports without being told the shape."""
    if input_shape and getattr(purifier, "in_shape", None) is None:
        purifier.in_shape = tuple(int(d) for d in input_shape)
    return purifier


def _shaped(pipeline: nn.Module, side: dict) -> nn.Module:
    from .cards import read_card

    purifier = getattr(pipeline, "purifier", None)
    if purifier is not None:
        with_input_shape(purifier, read_card(side).input_shape)
    return pipeline


def load_shield(name_or_path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A trained shield as its purifier, from its card alone."""
    from ..models.io import read_sidecar, resolve_weights

    side = read_sidecar(resolve_weights(name_or_path))
    if side.get("kind") != "shield":
        raise WeightsError(f"{name_or_path} is a {side.get('kind')}, not a shield; give it as the classifier "
                           "(or pick a shield: `aeshield models`)")
    if "card" not in side and side.get("method") is not None and side["method"] not in list_defenses():
        # An autoencoder saved before cards by a method aeshield does not know: a plain purifier,
        # as load_shield always loaded such files.
        from ..models.io import load_weights
        from .base import AutoencoderPurifier

        return frozen_for_use(AutoencoderPurifier(load_weights(name_or_path, device=device)[0]))
    module, config, info, side = load_defense(name_or_path, device=device)
    if info.purifier is None:
        raise WeightsError(f"{name_or_path} holds a {info.name} model, which is not a shield")
    from .cards import read_card

    return frozen_for_use(with_input_shape(info.purifier(module, config), read_card(side).input_shape))


def load_pipeline(name_or_path: str | Path, classifier: nn.Module, *,
                  calibration: torch.Tensor | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The whole deployed defense in front of ``classifier``, from the shield's card alone: a
    plain shield gives ``Shielded(purifier, classifier)``; one with detectors (MagNet, PuVAE)
    gets the thresholds its card stores (``train_shield``'s shields: no data needed), or is
    calibrated as its card says, on the clean images of the card's calibration split (or on
    ``calibration`` when given, which also overrides stored thresholds)."""
    from .cards import read_card

    module, config, info, side = load_defense(name_or_path, device=device)
    if info.deploy is None:
        return _shaped(info.pipeline(module, config, classifier), side)
    deployment = read_card(side).deployment or {}
    if calibration is None and deployment.get("calibration") == "stored":
        return _shaped(info.pipeline(module, config, classifier, seed=deployment.get("seed", 0),
                                     thresholds=deployment["thresholds"]), side)
    if calibration is None:
        from ..data import load_dataset

        split = deployment.get("calibration_split")
        if split is None:
            raise ValueError(f"{name_or_path}: its card names no calibration split for the detectors; "
                             "pass calibration= clean images")
        calibration = load_dataset(side["dataset"], split).images
    return _shaped(info.pipeline(module, config, classifier, calibration.to(device), deployment.get("seed", 0)), side)
