"""The one table of attacks, and the one way to run one: ``run_attack(name, model, x, y, threat,
generator, **settings)``.

Each attack module registers its attacks once, with ``@register``: the name, an adapter
``run(model, x, y, threat, generator, **settings) -> x_adv`` over the attack's public function,
a frozen settings dataclass (the keyword arguments besides the threat model, with their types
and defaults), the norms it supports, the paper it comes from, where it applies (``applies``)
and, optionally, how the robustness audit runs it (``AuditHook``) and the optional package it
needs (``requires``: a loader that raises ``MissingExtraError``). The harness, the audit, the
CLI and the experiment configs all go through ``run_attack``, which

1. checks the settings against the dataclass (unknown keys and wrong types raise, naming the
   key and the attack; an int is accepted where a float is expected);
2. checks that the threat model's norm is one the attack supports;
3. checks that the raw result lies in the threat model up to ``TOLERANCE`` and raises if not
   (a bug in the attack, never silently repaired);
4. only then projects onto the threat model the examples that lie outside it by round-off.

A new attack is one module that calls ``register`` (imported by ``aeshield.attacks``) and its test.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, nearest
from ..models.modes import eval_mode
from ..threat import Norm, ThreatModel

# A raw result may leave the threat model by this much (pixel units, in the threat's norm) before
# it counts as a bug: float32 round-off of a projection is about 1e-7.
TOLERANCE = 1e-6

AttackRun = Callable[..., torch.Tensor]


class AttackLeftThreatModel(RuntimeError):
    """An attack returned a point outside its threat model by more than round-off."""


class Stage(IntEnum):
    """Where an attack runs in the audit's cascade. Black-box attacks come last, so that what
    they add is exactly what every white-box and adaptive attack missed."""

    WHITE_BOX = 1
    ADAPTIVE = 2
    BLACK_BOX = 3


@dataclass(frozen=True)
class AuditHook:
    """How the audit battery runs an attack.

    ``settings(budget, threat)`` gives its settings from the audit budget (an
    ``aeshield.eval.audit.AuditBudget``) and the threat model. ``through_eot``: on a random
    pipeline it attacks the EOT average of the draws (attacks that need the pipeline's parts, or
    that only query it, say False). Within a stage, attacks run in registration order.
    """

    stage: Stage
    settings: Callable[[Any, ThreatModel], dict]
    through_eot: bool = True


class Untyped:
    """The settings of an attack registered without a dataclass (``aeshield.eval.register_attack``):
    every keyword passes through unchecked."""

    command_line: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class Attack:
    """One registered attack; see the module docstring."""

    name: str
    run: AttackRun
    settings: type
    norms: frozenset[Norm]
    reference: str
    applies: Callable[[nn.Module], bool] | None = None
    audit: AuditHook | None = None
    requires: Callable[[], Any] | None = None

    def check_available(self) -> None:
        """Raise ``MissingExtraError`` now if the attack needs an optional package that is not
        installed (the harness asks before it runs anything, so a cascade fails at its start)."""
        if self.requires is not None:
            self.requires()

    def parse(self, settings: Mapping[str, Any]) -> Any:
        """The settings dataclass from keyword values, checked and converted."""
        if self.settings is Untyped:
            return dict(settings)
        hints = typing.get_type_hints(self.settings)
        names = [f.name for f in dataclasses.fields(self.settings)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ValueError(f"attack {self.name!r}: unknown setting(s) {unknown}; "
                             f"its settings are {names}")
        return self.settings(**{key: _coerce(value, hints[key], key, self.name)
                                for key, value in settings.items()})

    def keywords(self, settings: Mapping[str, Any]) -> dict:
        """What ``run`` receives: every field of the parsed settings (defaults included)."""
        parsed = self.parse(settings)
        if self.settings is Untyped:
            return parsed
        return {f.name: getattr(parsed, f.name) for f in dataclasses.fields(parsed)}

    def applies_to(self, model: nn.Module) -> bool:
        return self.applies is None or bool(self.applies(model))


def _coerce(value: Any, expected: Any, key: str, attack: str) -> Any:
    """``value`` as the annotated type ``expected``; raises TypeError naming the key."""
    options = (typing.get_args(expected)
               if typing.get_origin(expected) in (typing.Union, types.UnionType) else (expected,))
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (bool, str) and isinstance(value, option):
            return value
    wanted = " or ".join("None" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise TypeError(f"attack {attack!r}: setting {key!r} must be {wanted}, "
                    f"got {type(value).__name__} {value!r}")


_REGISTRY: dict[str, Attack] = {}


def register(name: str, *, settings: type, reference: str,
             norms: tuple[Norm, ...] = (Norm.LINF, Norm.L2),
             applies: Callable[[nn.Module], bool] | None = None,
             audit: AuditHook | None = None,
             requires: Callable[[], Any] | None = None) -> Callable[[AttackRun], AttackRun]:
    """Decorator: register ``run(model, x, y, threat, generator, **settings)`` as attack ``name``.
    ``requires`` loads the optional package the attack needs, raising ``MissingExtraError``
    (``aeshield.errors.require``) if it is missing."""
    if settings is not Untyped and not (dataclasses.is_dataclass(settings)
                                        and settings.__dataclass_params__.frozen):
        raise TypeError(f"attack {name!r}: settings must be a frozen dataclass, got {settings!r}")

    def decorate(run: AttackRun) -> AttackRun:
        if name in _REGISTRY:
            raise ValueError(f"attack {name!r} is already registered "
                             f"(by {_REGISTRY[name].run.__module__}); unregister it first")
        _REGISTRY[name] = Attack(name, run, settings, frozenset(Norm.parse(n) for n in norms),
                                 reference, applies, audit, requires)
        return run
    return decorate


def unregister(name: str) -> Attack:
    """Remove attack ``name`` (e.g. at the end of a test that registered it); returns its entry."""
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise KeyError(f"no attack {name!r} is registered") from None


def replace_run(name: str, run: AttackRun) -> None:
    """Swap the implementation of a registered attack, keeping its settings and hooks."""
    _REGISTRY[name] = dataclasses.replace(get_attack(name), run=run)


class UnknownAttack(ConfigError, KeyError):
    """No attack of that name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def get_attack(name: str) -> Attack:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownAttack(f"unknown attack {name!r}{nearest(str(name), _REGISTRY)}; "
                            f"known: {sorted(_REGISTRY)}") from None


def attack_names() -> list[str]:
    """The registered attacks' names, in registration order."""
    return list(_REGISTRY)


def attacks() -> Iterator[Attack]:
    """The registered attacks, in registration order."""
    return iter(list(_REGISTRY.values()))


def ball(threat: ThreatModel) -> dict:
    """The keyword arguments by which the attack functions take a threat model."""
    return {"eps": threat.eps, "norm": threat.norm, "bounds": threat.bounds}


def run_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
               generator: torch.Generator, **settings) -> torch.Tensor:
    """Attack ``model`` on ``(x, y)`` within ``threat`` with the registered attack ``name``.

    Returns ``x_adv`` inside ``threat``, up to the round-off of measuring the distance (one
    float step). Raises ``ValueError``/``TypeError`` for bad settings or
    an unsupported norm and ``AttackLeftThreatModel`` when the attack's raw result lies outside
    the threat model by more than ``TOLERANCE``. The model is attacked in eval mode (an
    evaluation attacks the deployed function, never one that moves BatchNorm statistics), and
    every submodule's mode is given back afterwards.
    """
    attack = get_attack(name)
    keywords = attack.keywords(settings)
    if threat.norm not in attack.norms:
        raise ConfigError(f"attack {name!r} supports the norms "
                          f"{sorted(n.value for n in attack.norms)}, not {threat.norm.value}")
    with eval_mode(model):
        x_adv = attack.run(model, x, y, threat, generator, **keywords)
    return _inside(name, x_adv, x, threat)


def _inside(name: str, x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    if x_adv.shape != x.shape:
        raise AttackLeftThreatModel(f"attack {name!r} returned shape {tuple(x_adv.shape)} "
                                    f"for inputs of shape {tuple(x.shape)}")
    if not threat.contains(x_adv, x, tol=TOLERANCE).all():
        lo, hi = threat.bounds
        excess = max(float((threat.distance(x_adv, x) - threat.eps).max()),
                     float((lo - x_adv).max()), float((x_adv - hi).max()))
        raise AttackLeftThreatModel(f"attack {name!r} left its threat model {threat.describe()} "
                                    f"(bounds {list(threat.bounds)}) by {excess:.3g}, more than "
                                    f"round-off ({TOLERANCE:g}); this is a bug in the attack")
    # Only the examples outside by round-off move, so a result already inside keeps every bit.
    outside = ~threat.contains(x_adv, x, tol=0.0)
    if not outside.any():
        return x_adv
    mask = outside.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, threat.project(x_adv, x), x_adv)


__all__ = ["TOLERANCE", "Attack", "AttackLeftThreatModel", "AuditHook", "Stage", "Untyped",
           "attack_names", "attacks", "ball", "get_attack", "register", "replace_run",
           "run_attack", "unregister"]
