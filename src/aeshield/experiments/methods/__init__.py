"""Shield methods the runner knows: how to train one, and how to build its evaluated pipeline.

A config's ``shields`` entry names a ``method``; the remaining keys fill that method's typed
spec dataclass. Each method is one module of this package (``aaa``, ``magnet``, ``puvae``,
``s2snet``, ``dbp``): the adapter between the runner and a defense registered in
``aeshield.defenses.registry``. It exposes ``METHOD = Method(...)``; the table below maps
names to modules lazily, so that importing the runner does not import every defense.

A method provides:

- ``spec``: a frozen dataclass of its hyperparameters (unknown YAML keys are an error);
- ``train(runner, spec, path)``: train and write ``path`` (safetensors + JSON sidecar), with a
  resumable checkpoint at ``path.with_suffix(".ckpt")``;
- ``load(runner, spec, path)``: the trained module (purifier, VAE, ...), on ``runner.device``;
- ``pipeline(runner, spec, module, classifier_name)``: the whole thing the attacks see, e.g.
  ``Shielded(purifier, classifier, detector)``; detectors calibrate here on ``runner.val``;
- ``depends_on(spec)``: names of the config's classifiers it is trained against (their specs
  enter the artifact hash, so retraining a classifier retrains the shield).
- ``deploy(spec, module, classifier, val, seed)`` (optional): the pipeline built from explicit
  parts, for defenses with calibrated detectors; the audit deploys a shipped file with it.
- ``surrogate(runner, spec, module, classifier_name)`` (optional): the gray-box attacker's
  model, which the config's ``wrap: surrogate`` attacks craft on (e.g. MagNet with one fixed
  autoencoder out of its diverse set).
- ``config(spec, seed)``: the registered defense's config that the spec trains (the card of a
  shipped file, and the threat model the shield is trained against, come from it).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ...defenses.cards import make_card
from ...defenses.registry import get_defense
from ...threat import ThreatModel

if TYPE_CHECKING:
    from ..runner import Runner


def _shielded(runner: "Runner", spec: Any, module: nn.Module, classifier: str) -> nn.Module:
    from ...defenses.base import Shielded

    return Shielded(module, runner.classifier(classifier))


def _against(spec: Any) -> tuple[str, ...]:
    return tuple(getattr(spec, "against", ()) or ())


def from_spec(cls: type, spec: Any, **overrides: Any) -> Any:
    """The defense config ``cls`` filled from the spec's fields of the same names, then
    ``overrides``: a hyperparameter is named once, in the defense's config, and the spec's
    field of that name feeds it (tests check they agree in type and default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name in names}
    return cls(**{**values, **overrides})


@dataclass(frozen=True)
class Method:
    name: str
    spec: type
    train: Callable[["Runner", Any, Path], None]
    load: Callable[["Runner", Any, Path], nn.Module]
    pipeline: Callable[["Runner", Any, nn.Module, str], nn.Module] = _shielded
    depends_on: Callable[[Any], tuple[str, ...]] = _against
    artifact_kind: str | None = None  # file-name prefix and hash salt; default: the method name
    # (runner, spec, module, classifier_name) -> the model `wrap: surrogate` attacks craft on
    surrogate: Callable[["Runner", Any, nn.Module, str], nn.Module] | None = None
    # (spec, module, classifier, val, seed) -> the deployed pipeline, for a defense whose
    # pipeline is more than Shielded(module, classifier) (detectors calibrated on ``val``):
    # its ``pipeline`` and the audit of a shipped file both build it through this.
    deploy: Callable[[Any, nn.Module, nn.Module, Any, int], nn.Module] | None = None
    # (spec, seed) -> the config of the registered defense ``defense`` (default: ``name``)
    config: Callable[[Any, int], Any] | None = None
    defense: str | None = None
    # Its pipeline is ``Shielded(module, classifier)``, nothing calibrated on the run's data,
    # so a shipped file's clean accuracy is measured in front of the shipped classifiers.
    plain_pipeline: bool = False
    # Whether a row's record key names the method. AAA's keys predate methods and leave it
    # out, so that its records keep their keys.
    method_in_record_key: bool = True

    @property
    def kind(self) -> str:
        return self.artifact_kind or self.name

    def training_threat(self, spec: Any) -> ThreatModel | None:
        """The threat model the spec's shield is trained against (None: clean data only)."""
        if self.config is None:
            return None
        return get_defense(self.defense or self.name).training_threat(self.config(spec, 0))

    def card(self, spec: Any, seed: int, dataset: str, trained_against: list[str]) -> dict:
        """The card of the spec's shield trained on ``seed`` (for the sidecar of a shipped file)."""
        if self.config is None:
            raise ValueError(f"method {self.name!r} names no defense config; it cannot write a card")
        defense = get_defense(self.defense or self.name)
        return make_card(defense, self.config(spec, seed), dataset,
                         trained_against=trained_against).to_dict()


# name -> "module:attribute" of its Method; add a line to register a new defense.
METHODS: dict[str, str] = {
    "aaa": "aeshield.experiments.methods.aaa:METHOD",
    "puvae": "aeshield.experiments.methods.puvae:METHOD",
    "magnet": "aeshield.experiments.methods.magnet:METHOD",
    "s2snet": "aeshield.experiments.methods.s2snet:METHOD",
    "dbp": "aeshield.experiments.methods.dbp:METHOD",
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown shield method {name!r}; known: {sorted(METHODS)}")
    module, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)

