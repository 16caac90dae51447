"""Cards: what a saved defense is, written into its weights' JSON sidecar under ``"card"``.

A card names the defense and its config, the dataset and input shape, the classifiers it was
trained against, the threat model of its training, the figures it was evaluated at (each with
its threat model) and, for a shield a validation selection chose, that selection, so that
``load_shield`` rebuilds it with no other file and a reader knows what it claims. Sidecars
written before cards (``"method"``, ``"shield_spec"``, ``"config"``) are migrated on read, and
``migrate_sidecar`` writes the card into one while keeping every key it had (``spec_hash``
above all: the runner finds shipped files by it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import DATASETS
from .registry import Defense, config_to_dict, get_defense, json_safe

CARD_VERSION = 1


@dataclass(frozen=True)
class Card:
    defense: str
    config: dict
    dataset: str
    input_shape: tuple[int, ...]
    trained_against: tuple[str, ...] = ()
    training_threat: dict | None = None  # None: trained on clean data only
    # Each: {"classifier", "threat", "clean", "robust", "n", "budget", "source"}.
    evaluated: tuple[dict, ...] = ()
    version: int = CARD_VERSION
    # For a defense with calibrated detectors (``Defense.deploy``): the split of ``dataset`` whose
    # clean images calibrate them, and the seed of the calibration, {"calibration_split", "seed"};
    # or, for a shield trained by ``train_shield``, the thresholds themselves:
    # {"calibration": "stored", "false_positive_rate", "thresholds": {detector: threshold}, "seed"}.
    deployment: dict | None = None
    # Written for shields of user data (``train_shield``); None in cards written before, whose
    # dataset names both.
    num_classes: int | None = None
    value_range: tuple[float, float] | None = None
    # For a shield shipped as the one a validation selection chose (``reproduce --ship`` with a
    # ``select`` entry): {"name", "rule" (in words), "chosen" (the config's shield key),
    # "report" (the selection's report file)}; None otherwise.
    selection: dict | None = None

    def to_dict(self) -> dict:
        return {"version": self.version, "defense": self.defense, "config": json_safe(self.config),
                "dataset": self.dataset, "input_shape": list(self.input_shape),
                "trained_against": list(self.trained_against),
                "training_threat": self.training_threat, "evaluated": [dict(e) for e in self.evaluated],
                **({"deployment": dict(self.deployment)} if self.deployment is not None else {}),
                **({"num_classes": self.num_classes} if self.num_classes is not None else {}),
                **({"value_range": list(self.value_range)} if self.value_range is not None else {}),
                **({"selection": dict(self.selection)} if self.selection is not None else {})}

    @classmethod
    def from_dict(cls, data: dict) -> "Card":
        if data.get("version") != CARD_VERSION:
            raise ValueError(f"card version {data.get('version')!r} is not one this aeshield reads "
                             f"({CARD_VERSION}); upgrade aeshield")
        return cls(defense=data["defense"], config=dict(data["config"]), dataset=data["dataset"],
                   input_shape=tuple(data["input_shape"]),
                   trained_against=tuple(data.get("trained_against") or ()),
                   training_threat=data.get("training_threat"),
                   evaluated=tuple(data.get("evaluated") or ()), version=data["version"],
                   deployment=data.get("deployment"),
                   num_classes=int(data["num_classes"]) if data.get("num_classes") is not None else None,
                   value_range=tuple(data["value_range"]) if data.get("value_range") is not None else None,
                   selection=dict(data["selection"]) if data.get("selection") is not None else None)


def default_deployment(defense: Defense, config: dict) -> dict | None:
    """How a defense with detectors was deployed when its card did not say: on the clean
    validation split, with the training seed (the reproduce runner deploys with the target's
    seed, which is also the seed it trains with)."""
    if defense.deploy is None:
        return None
    return {"calibration_split": "val", "seed": int((config.get("training") or {}).get("seed", 0))}


def make_card(defense: Defense, config: Any, dataset: str, *, trained_against: Sequence[str] = (),
              evaluated: Sequence[dict] = (), deployment: dict | None = None,
              input_shape: Sequence[int] | None = None, num_classes: int | None = None,
              value_range: Sequence[float] | None = None) -> Card:
    """The card of a trained ``defense``. ``input_shape`` defaults to the registered
    ``dataset``'s shape (``()`` for another name); ``num_classes`` and ``value_range`` are
    written only when given (``train_shield`` gives them; its value range is [0, 1])."""
    threat = defense.training_threat(config)
    config_dict = config_to_dict(config)
    if input_shape is None:
        input_shape = DATASETS[dataset].shape if dataset in DATASETS else ()
    return Card(defense=defense.name, config=config_dict, dataset=dataset,
                input_shape=tuple(int(d) for d in input_shape),
                trained_against=tuple(trained_against),
                training_threat=threat.to_dict() if threat is not None else None,
                evaluated=tuple(evaluated),
                deployment=deployment if deployment is not None else default_deployment(defense, config_dict),
                num_classes=int(num_classes) if num_classes is not None else None,
                value_range=tuple(float(v) for v in value_range) if value_range is not None else None)


def card_from_sidecar(side: dict) -> Card:
    """The card of a sidecar written before cards, from its ``method`` and the config its
    defense reads back (``Defense.from_sidecar``)."""
    # The first shields carried no method: an ensemble (``members``) was MagNet's, one
    # autoencoder AAA's.
    name = side.get("method") or ("magnet" if side.get("members") is not None else "aaa")
    defense = get_defense(name)
    if defense.from_sidecar is None:
        raise ValueError(f"a {name} sidecar without a card cannot be read; re-save the weights")
    against = side.get("trained_against") or ()
    return make_card(defense, defense.from_sidecar(side), side["dataset"],
                     trained_against=list(against))  # a dict (config keys) or a list of names


def read_card(side: dict) -> Card:
    """The sidecar's card, or one migrated from its older keys (a card written before cards
    named their deployment gets the default one)."""
    if "card" not in side:
        return card_from_sidecar(side)
    card = Card.from_dict(side["card"])
    if card.deployment is None:
        deployment = default_deployment(get_defense(card.defense), card.config)
        if deployment is not None:
            card = Card(**{**card.__dict__, "deployment": deployment})
    return card


def with_card(side: dict, evaluated: Sequence[dict] | None = None) -> dict:
    """``side`` with its (migrated) card; ``evaluated`` replaces the card's figures if given.
    Every other key is kept as it was."""
    card = read_card(side)
    if evaluated is not None:
        card = Card(**{**card.__dict__, "evaluated": tuple(evaluated)})
    return {**side, "card": card.to_dict()}


def migrate_sidecar(path: str | Path, evaluated: Sequence[dict] | None = None) -> bool:
    """Write the card into the sidecar of ``path`` (the weights' bytes are not touched);
    returns whether the file changed. Re-running it is a no-op."""
    from ..models.io import sidecar_path, write_sidecar

    side_path = sidecar_path(path)
    side = json.loads(side_path.read_text())
    if side.get("kind") != "shield":
        return False
    migrated = with_card(side, evaluated)
    if migrated == side:
        return False
    write_sidecar(side_path, migrated)
    return True


def audited_figures(audit_dirs: Sequence[str | Path], shield: str) -> list[dict]:
    """The figures ``aeshield audit`` measured for ``shield`` (``<audit_dir>/<shield>__<classifier>
    /audit.json``), as card entries, by folder and classifier."""
    out = []
    reports = [r for d in audit_dirs for r in sorted(Path(d).glob(f"{shield}__*/audit.json"))]
    for report in reports:
        summary = json.loads(report.read_text())["summary"]
        out.append({"classifier": report.parent.name.split("__", 1)[1], "threat": summary["threat"],
                    "clean": summary["clean"]["accuracy"], "robust": summary["robust"]["accuracy"],
                    "n": summary["n"], "budget": summary["budget"],
                    "source": f"{report.parent.parent.name}/{report.parent.name}/audit.json"})
    return out


def migrate_folder(folder: str | Path, audit_dirs: Sequence[str | Path] | None = None) -> list[Path]:
    """Migrate every shield sidecar in ``folder`` (the shipped weights), with the figures
    audited in ``audit_dirs`` when given (e.g. ``docs/results/audit``); returns the sidecars
    that changed."""
    changed = []
    for side in sorted(Path(folder).glob("*.json")):
        evaluated = audited_figures(audit_dirs, side.stem) if audit_dirs is not None else None
        if migrate_sidecar(side, evaluated):
            changed.append(side)
    return changed


if __name__ == "__main__":  # python -m aeshield.defenses.cards [AUDIT_DIR ...]
    import sys

    from ..models.io import shipped_dir

    for changed in migrate_folder(shipped_dir(), sys.argv[1:] or None):
        print(f"migrated {changed.name}")
