"""Experiment configs: typed, frozen dataclasses read from YAML.

A target (``aeshield reproduce NAME``) is one YAML file in ``aeshield/configs``. Its
``profiles`` section holds the numbers that differ between the ``quick`` (CPU, minutes) and
``paper`` (published protocol, GPU) profiles; they are deep-merged over the base.

Values are typed: YAML is read with YAML 1.2's floats (``1e-2`` is the float 0.01, where
PyYAML's YAML 1.1 reads a string), and every value is checked against its dataclass field's
type when the config is built (``_typed``); a mismatch is a ``ValueError`` naming the target,
the key and the expected type.
"""

from __future__ import annotations

import copy
import functools
import re
import types
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from ..errors import ConfigError
from ..defenses.query_access import QuerySettings
from ..defenses.schedules import ScheduleSettings
from ..eval.audit.budget import BUDGETS, AuditBudget, get_budget
from ..eval.harness import AttackSpec
from ..records import added_later, config_dict
from ..threat import Norm, ThreatModel
from .methods import get_method
from .smoke import SUFFIX, smoke_budget, smoke_config, smoke_spec


@dataclass(frozen=True)
class ClassifierSpec:
    model: str
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    train_limit: int | None = None
    augment: bool = False


@dataclass(frozen=True)
class AdvTrainSpec(ScheduleSettings):
    """Madry adversarial training of a target's classifiers. The attack schedule of training
    (``schedule``, ``replays``, ``guard_*``, ``precision``, ...) is ``ScheduleSettings``, the
    same keyword-only fields as the defense's config: one place to add a schedule setting."""

    eps: float = 0.3
    step_size: float = 0.01
    attack_steps: int = 40
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    train_limit: int | None = None
    val_n: int = 500
    eps_ramp_steps: int = 0
    cosine_lr: bool = field(default=False, metadata={"hash_if_default": False})


@dataclass(frozen=True)
class ShieldSpec(ScheduleSettings, QuerySettings):
    """A shield a target trains. Its attack schedule of training is ``ScheduleSettings`` and
    its query access ``QuerySettings``, as in ``AAAConfig``."""

    method: str  # "aaa"
    autoencoder: str
    against: tuple[str, ...]
    loss: str = "xent+mse"
    lam: float = 0.01
    eps: float = 0.3
    step_size: float = 0.01
    attack_steps: int = 40
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    train_limit: int | None = None
    val_n: int = 500
    cosine_lr: bool = field(default=False, metadata={"hash_if_default": False})
    # A training seed of its own (a replicate); None trains on the target's seed as before.
    seed: int | None = field(default=None, metadata={"hash_if_default": False})
    # Classifiers of ``against`` the shield's trainer reaches only through queries (issue 28):
    # each behind ``models.query.QueryOnly(output=query_output, decimals=query_decimals,
    # budget=query_budget)``, and reached per ``query_method`` (``defenses.query_access``).
    # ``query_method`` and its settings are inherited from ``QuerySettings``.
    query_only: tuple[str, ...] = added_later(())
    query_output: str = added_later("probs")
    query_decimals: int | None = added_later(None)
    query_budget: int | None = added_later(None)


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    threat: ThreatModel
    attacks: tuple[AttackSpec, ...]
    shields: tuple[str, ...] = ()  # evaluate only the rows of these shields (empty: every row)
    # Evaluate only behind these classifiers (empty: every group's); e.g. a costly black-box
    # attack run only where the question is asked.
    classifiers: tuple[str, ...] = field(default=(), metadata={"hash_if_default": False})
    # Test images for this suite's cells when it differs from the rows' (e.g. a suite with no
    # attack measuring clean accuracy on the whole test split); the first n of the same subset.
    n: int | None = None
    # An audit budget (quick | standard | paper): the suite's cascade is then, for each pipeline,
    # the battery `aeshield audit` builds for it (``eval.audit.battery``), and it lists no
    # attacks of its own. A smoke run holds the budget itself, at smoke size (``smoke_budget``).
    audit: str | AuditBudget | None = field(default=None, metadata={"hash_if_default": False})
    # Evaluate only the rows of these labels (empty: every row); e.g. a costly audit run on the
    # headline rows and not on the ablations.
    rows: tuple[str, ...] = field(default=(), metadata={"hash_if_default": False})

    def applies_to(self, row: RowSpec, classifier: str | None = None) -> bool:
        if classifier is not None and self.classifiers and classifier not in self.classifiers:
            return False
        if self.rows and row.label not in self.rows:
            return False
        return not self.shields or (row.kind == "shield" and row.shield in self.shields)


@dataclass(frozen=True)
class RowSpec:
    label: str
    kind: str = "natural"  # natural | adversarial-training | shield
    shield: str | None = None
    # Test images for this row's cells when it differs from the target's ``n`` (a quick
    # profile's ablation rows); always the first n of the same seeded subset.
    n: int | None = field(default=None, metadata={"hash_if_default": False})
    # A shield chosen on validation images (``selections``) instead of a named one; the runner
    # fills ``shield`` with the choice before it plans anything.
    select: str | None = field(default=None, metadata={"hash_if_default": False})


@dataclass(frozen=True)
class GroupSpec:
    label: str
    classifiers: tuple[str, ...]


@dataclass(frozen=True)
class ColumnSpec:
    label: str
    value: str = "robust"  # clean | robust | difference
    suites: tuple[str, ...] = ()
    after: str | None = None  # report the accuracy after this attack of the (single) suite
    # For ``difference``: the row (label) whose accuracy in this column is subtracted, paired
    # example by example (with no attack in the suites, that is clean accuracy).
    versus: str | None = None


@dataclass(frozen=True)
class SelectionSpec:
    """Candidate shields and the rule that picks one on validation images
    (``experiments.selection``)."""

    among: tuple[str, ...]  # shield names of the config, in the order the table lists them
    classifier: str  # the classifier the candidates protect (a native one)
    threat: ThreatModel
    attack: AttackSpec
    max_clean_drop: float  # accuracy, as a fraction (0.06 = six points)
    n: int = 2000  # validation images (seeded subset of the val split)
    # A draw of its own from the val split, not the trainer's early-stopping subset (seed 1),
    # though the two may share images.
    seed: int = 11


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    title: str
    dataset: str
    profile: str
    seed: int = 0
    n: int = 1000
    batch_size: int = 500
    notes: str = ""
    classifiers: dict[str, ClassifierSpec] = field(default_factory=dict)
    adversarial_training: AdvTrainSpec | None = None
    shields: dict[str, ShieldSpec] = field(default_factory=dict)
    selections: dict[str, SelectionSpec] = field(default_factory=dict)
    suites: tuple[SuiteSpec, ...] = ()
    rows: tuple[RowSpec, ...] = ()
    groups: tuple[GroupSpec, ...] = ()
    columns: tuple[ColumnSpec, ...] = ()
    figures: tuple[dict, ...] = ()
    # Use only the first N images (seeded) of every split: smoke runs, whose full-size models
    # would otherwise spend minutes measuring a 10,000-image test set they cannot learn.
    data_limit: int | None = None
    raw: dict = field(default_factory=dict, compare=False)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float syntax: ``1e-2`` and ``1E3`` are floats (YAML
    1.1 wants a dot in the mantissa, so PyYAML reads them as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class _Mismatch(Exception):
    pass


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_name(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in get_args(hint))
    if get_origin(hint) is tuple:
        return f"a list of {_type_name(get_args(hint)[0])}"
    if get_origin(hint) is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as a field of type ``hint`` holds it, or ``_Mismatch``.

    An int is a valid float and stays an int: spec hashes are computed from the values as
    written (``lambda2: 2`` hashes as 2, not 2.0), and changing them would orphan every trained
    artifact. Lists become tuples for tuple fields, as the hashes always saw them (JSON lists)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        item = args[0] if args else Any
        return tuple(_coerce(v, item) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise _Mismatch
    return value


def _typed(cls: type, data: dict, where: str) -> dict:
    """``data`` with every value checked against its field's type (a key that is no field of
    ``cls`` passes through, for the constructor to refuse)."""
    hints = _field_types(cls)
    out = {}
    for key, value in data.items():
        if key not in hints:
            out[key] = value
            continue
        try:
            out[key] = _coerce(value, hints[key])
        except _Mismatch:
            name = f"{where} {key}" if where.endswith(":") else f"{where}.{key}"
            raise ValueError(f"{name}: expected {_type_name(hints[key])}, got {value!r} "
                             f"({type(value).__name__})") from None
    return out


def _build(cls, data: dict, where: str | None = None):
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    return cls(**_typed(cls, data, where or cls.__name__))


def _attack(d: dict, where: str = "attack") -> AttackSpec:
    d = dict(d)
    if "threat" in d and d["threat"] is not None:
        d["threat"] = ThreatModel(**d["threat"])
    return _build(AttackSpec, d, where)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def config_dir() -> Path:
    return Path(str(resources.files("aeshield") / "configs"))


def list_targets() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def load_config(target: str | Path, profile: str = "quick", smoke: bool = False) -> ExperimentConfig:
    """Read a target's YAML (by name or path) and resolve one profile. ``smoke`` cuts every
    size to a few images and steps (``aeshield.experiments.smoke``); its profile is then
    named ``<profile>-smoke`` so that nothing it writes passes for a measurement."""
    path = Path(target)
    if not path.exists():
        path = config_dir() / f"{target}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"unknown target {target!r}; known targets: {', '.join(list_targets())}")
    raw = read_yaml(path.read_text())
    profiles = raw.pop("profiles", {}) or {}
    if profile not in profiles:
        raise ValueError(f"target {raw.get('name', path.stem)!r} has no profile {profile!r}; "
                         f"choose from {sorted(profiles)}")
    data = deep_merge(raw, profiles[profile] or {})
    if smoke:
        return smoke_experiment(data, profile)
    return from_dict(data, profile)


def smoke_experiment(data: dict[str, Any], profile: str) -> ExperimentConfig:
    """The typed config of a resolved profile dict, as a smoke run named ``<profile>-smoke``:
    every size capped, those the config states (``smoke_config``) and those its specs leave at
    their dataclass defaults (``smoke_spec``)."""
    config = from_dict(smoke_config(data), profile + SUFFIX)
    return replace(
        config, suites=tuple(replace(s, attacks=tuple(smoke_spec(a) for a in s.attacks),
                                     audit=s.audit and smoke_budget(get_budget(s.audit)))
                             for s in config.suites),
        classifiers={k: smoke_spec(v) for k, v in config.classifiers.items()},
        shields={k: smoke_spec(v) for k, v in config.shields.items()},
        adversarial_training=config.adversarial_training and smoke_spec(config.adversarial_training))


def from_dict(data: dict[str, Any], profile: str) -> ExperimentConfig:
    d = dict(data)
    resolved = copy.deepcopy(d)
    target = str(d.get("name", "config"))
    classifiers = {k: _build(ClassifierSpec, v, f"{target}: classifiers.{k}")
                   for k, v in (d.pop("classifiers", {}) or {}).items()}
    at = d.pop("adversarial_training", None)
    shields = {}
    for k, v in (d.pop("shields", {}) or {}).items():
        shields[k] = shield_spec(v, f"{target}: shields.{k}")
    suites = tuple(_suite(s, f"{target}: suites.{s.get('name', i)}") for i, s in enumerate(d.pop("suites", [])))
    rows = tuple(_build(RowSpec, r, f"{target}: rows.{i}") for i, r in enumerate(d.pop("rows", [])))
    groups = tuple(_build(GroupSpec, g, f"{target}: groups.{i}") for i, g in enumerate(d.pop("groups", [])))
    columns = tuple(_build(ColumnSpec, {**c, "suites": tuple(c.get("suites", ()))}, f"{target}: columns.{i}")
                    for i, c in enumerate(d.pop("columns", [])))
    figures = tuple(d.pop("figures", []) or [])
    selections = {k: _build(SelectionSpec, {**v, "among": tuple(v["among"]),
                                            "threat": ThreatModel(**v["threat"]),
                                            "attack": _attack(v["attack"], f"{target}: selections.{k}.attack")},
                            f"{target}: selections.{k}")
                  for k, v in (d.pop("selections", {}) or {}).items()}
    d.pop("ship", None)  # read by Runner.ship from the raw config
    at_spec = _build(AdvTrainSpec, at, f"{target}: adversarial_training") if at else None
    config = ExperimentConfig(
        profile=profile, classifiers=classifiers, adversarial_training=at_spec, shields=shields,
        selections=selections, suites=suites, rows=rows, groups=groups, columns=columns,
        figures=figures, raw=resolved, **_typed(ExperimentConfig, d, f"{target}:"))
    _check(config)
    return config


def _suite(s: dict, where: str) -> SuiteSpec:
    audit = s.get("audit")
    if audit is not None:
        if s.get("attacks"):
            raise ConfigError(f"{where}: a suite with `audit: {audit}` runs the audit's battery for each "
                              "pipeline; it lists no `attacks` of its own (put them in another suite)")
        if not isinstance(audit, str) or audit not in BUDGETS:
            raise ConfigError(f"{where}.audit: unknown audit budget {audit!r}; budgets: "
                              f"{', '.join(BUDGETS)}")
    elif "attacks" not in s:
        raise ConfigError(f"{where}: a suite needs `attacks` (a list, empty for clean accuracy) "
                          "or `audit: <budget>`")
    unknown = set(s) - {f.name for f in fields(SuiteSpec)}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: "
                          f"{sorted(f.name for f in fields(SuiteSpec))}")
    attacks = tuple(_attack(a, f"{where}.attacks.{i}") for i, a in enumerate(s.get("attacks") or ()))
    fields_ = {"name": s["name"], "threat": ThreatModel(**s["threat"]), "attacks": attacks,
               "shields": tuple(s.get("shields", ()) or ()), "n": s.get("n"), "audit": audit,
               "classifiers": tuple(s.get("classifiers", ()) or ()), "rows": tuple(s.get("rows", ()) or ())}
    return SuiteSpec(**_typed(SuiteSpec, fields_, where))


def spec_dict(spec: Any) -> dict:
    """``asdict(spec)`` for hashing: a field whose metadata says ``hash_if_default: False`` is
    left out while it holds its default, so adding such a field keeps existing hashes (a field
    declared ``records.added_later`` also is, in every other dict of the spec: record keys, cards)."""
    out = config_dict(spec)
    for f in fields(spec):
        if f.metadata.get("hash_if_default", True) is False and f.name in out and out[f.name] == f.default:
            del out[f.name]
    return out


def shield_spec(entry: dict, where: str | None = None) -> Any:
    """The typed spec of one ``shields`` entry, chosen by its ``method``."""
    v = {k: tuple(x) if isinstance(x, list) else x for k, x in dict(entry).items()}
    if "method" not in v:
        raise ValueError(f"shield entry {entry} needs a `method`")
    return _build(get_method(v["method"]).spec, v, where)


def _check(config: ExperimentConfig) -> None:
    suite_names = {s.name for s in config.suites}
    _check_selections(config)
    for row in config.rows:
        if row.select is not None and (row.kind != "shield" or row.shield is not None):
            raise ValueError(f"row {row.label!r}: `select` picks the shield of a `kind: shield` row; "
                             "give it instead of `shield:`, not with it")
        if row.kind == "shield" and row.select is None and row.shield not in config.shields:
            raise ValueError(f"row {row.label!r} names unknown shield {row.shield!r}")
        if row.kind == "adversarial-training" and config.adversarial_training is None:
            raise ValueError(f"row {row.label!r} needs an adversarial_training section")
    for group in config.groups:
        for c in group.classifiers:
            if c not in config.classifiers:
                raise ValueError(f"group {group.label!r} names unknown classifier {c!r}")
    for shield in config.shields.values():
        for c in getattr(shield, "against", ()) or ():
            if c not in config.classifiers:
                raise ValueError(f"shield trained against unknown classifier {c!r}")
        outside = set(getattr(shield, "query_only", ()) or ()) - set(getattr(shield, "against", ()) or ())
        if outside:
            raise ValueError(f"query_only names {sorted(outside)}, which the shield is not trained against")
    _check_training_eps(config)
    for suite in config.suites:
        unknown = set(suite.shields) - set(config.shields)
        if unknown:
            raise ValueError(f"suite {suite.name!r} names unknown shields {sorted(unknown)}")
        unknown = set(suite.classifiers) - set(config.classifiers)
        if unknown:
            raise ValueError(f"suite {suite.name!r} names unknown classifiers {sorted(unknown)}")
    labels = {r.label for r in config.rows}
    for suite in config.suites:
        unknown = set(suite.rows) - labels
        if unknown:
            raise ValueError(f"suite {suite.name!r} names unknown rows {sorted(unknown)}; rows: {sorted(labels)}")
    for column in config.columns:
        if column.value not in ("clean", "robust", "difference"):
            raise ValueError(f"column {column.label!r}: value must be clean, robust or difference, "
                             f"got {column.value!r}")
        if (column.value == "difference") != (column.versus is not None):
            raise ValueError(f"column {column.label!r}: `versus: <row label>` goes with, and only "
                             "with, `value: difference`")
        if column.versus is not None and column.versus not in labels:
            raise ValueError(f"column {column.label!r} compares with unknown row {column.versus!r}")
        if column.value == "difference" and column.after is not None:
            # An attack's record keeps only its count of survivors, not which examples: nothing to pair.
            raise ValueError(f"column {column.label!r}: a difference pairs examples, and `after` keeps only "
                             "counts; difference the whole suite instead")
        missing = set(column.suites) - suite_names
        if missing:
            raise ValueError(f"column {column.label!r} names unknown suites {sorted(missing)}")


def _check_selections(config: ExperimentConfig) -> None:
    for name, sel in config.selections.items():
        missing = [s for s in sel.among if s not in config.shields]
        if missing:
            raise ValueError(f"selection {name!r} names unknown shields {missing}")
        if sel.classifier not in config.classifiers:
            raise ValueError(f"selection {name!r} names unknown classifier {sel.classifier!r}")
        if not 0 <= sel.max_clean_drop < 1:
            raise ValueError(f"selection {name!r}: max_clean_drop is a fraction of accuracy "
                             f"(0.06 = six points), got {sel.max_clean_drop}")
    for ship_name, what in (config.raw.get("ship") or {}).items():
        if isinstance(what, dict) and "select" in what and what["select"] not in config.selections:
            raise ConfigError(f"ship entry {ship_name!r} selects with unknown selection {what['select']!r}; "
                              f"known: {sorted(config.selections)}")
    for row in config.rows:
        if row.select is not None and row.select not in config.selections:
            raise ValueError(f"row {row.label!r} selects with unknown selection {row.select!r}; "
                             f"known: {sorted(config.selections)}")


def _check_training_eps(config: ExperimentConfig) -> None:
    """An adversarially trained artifact must be trained at the eps its table attacks with.

    The spec dataclasses default to MNIST's 0.3; a config for another dataset that forgets to
    set ``eps`` would silently train against a larger ball than it evaluates (this happened:
    the first Fashion-MNIST shields were trained at 0.3 and evaluated at 0.2).
    """
    linf = {round(s.threat.eps, 6) for s in config.suites if s.threat.norm.lower() == "linf"}
    if not linf:
        return
    from .methods import get_method

    trained = []
    for name, spec in config.shields.items():
        threat = get_method(spec.method).training_threat(spec)
        if threat is not None and threat.norm is Norm.LINF:
            trained.append((f"shield {name!r}", threat.eps))
    if config.adversarial_training is not None:
        trained.append(("adversarial_training", config.adversarial_training.eps))
    for what, eps in trained:
        if round(eps, 6) not in linf:
            raise ValueError(f"{what} trains at L-inf eps {eps:g} but the L-inf suites attack at "
                             f"{sorted(linf)}; set `eps:` in its config entry to the evaluated eps")
