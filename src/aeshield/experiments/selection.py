"""Choose one of several trained shields on held-out validation images, before any test figure.

A config's ``selections`` entry names candidate shields (one hyperparameter grid, e.g. AAA's
lambda), the classifier they protect, one validation attack, and the largest cost in natural
accuracy the user accepts. The chosen candidate is the most robust one on the validation
images among those whose clean accuracy there is within ``max_clean_drop`` of the undefended
classifier's on the same images; if none is, the cleanest one. Only the ``val`` split (training
images that no model trained on) is read, so a row showing the chosen shield reports test
figures that played no part in choosing it.

A row selects with ``select: NAME`` instead of ``shield:``; the runner resolves it before it
plans anything, so the row's records are keyed by the shield that was chosen.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

from ..eval.harness import evaluate
from ..records import Accuracy
from ..io import write_text_atomic
from .config import ExperimentConfig, SelectionSpec
from .record_cache import RecordCache
from .zoo import ModelZoo

logger = logging.getLogger(__name__)


def choose(candidates: dict[str, dict], undefended_clean: float, max_clean_drop: float) -> str:
    """The most robust candidate whose clean accuracy is within the allowed drop (ties: the
    cleaner, then the first listed); if none qualifies, the cleanest."""
    order = list(candidates)
    eligible = [c for c in order if candidates[c]["clean"] >= undefended_clean - max_clean_drop - 1e-12]
    if eligible:
        return max(eligible, key=lambda c: (candidates[c]["robust"], candidates[c]["clean"], -order.index(c)))
    return max(order, key=lambda c: (candidates[c]["clean"], -order.index(c)))


def _measure(config: ExperimentConfig, sel: SelectionSpec, model, defense: str, val,
             progress: bool) -> dict:
    record = evaluate(model, val.images, val.labels, [sel.attack], sel.threat,
                      batch_size=config.batch_size, seed=sel.seed, defense=defense,
                      classifier=sel.classifier, dataset=config.dataset,
                      data_source=val.source, data_hash=val.sha256, progress=progress)
    return {"clean": record.clean.to_dict(), "robust": record.robust.to_dict()}


def select(name: str, zoo: ModelZoo, records: RecordCache, out: Path, progress: bool = True) -> str:
    """Measure every candidate of selection ``name`` on the validation images (each one a
    cached record) and return the chosen shield; writes ``<out>/selection_<name>.md``."""
    config = zoo.config
    sel = config.selections[name]
    val = zoo.val.subset(sel.n, seed=sel.seed)
    if val.split != "val":
        raise ValueError(f"selection {name!r} must be measured on validation images, got the "
                         f"{val.split!r} split")
    positions = [] if val.indices is None else val.indices.tolist()
    base = {"selection": name, "classifier": sel.classifier, "threat": sel.threat.to_dict(),
            "attack": sel.attack.to_dict(), "n": sel.n, "seed": sel.seed, "split": val.split,
            "dataset_sha256": val.sha256,
            "positions_sha256": hashlib.sha256(json.dumps(positions).encode()).hexdigest()}
    undefended = zoo.classifier(sel.classifier)
    weights = zoo.weight_hashes([sel.classifier])
    reference = records.get(
        f"selection-{name}-undefended", {**base, "weights": weights},
        lambda: _measure(config, sel, undefended, "none", val, progress))
    candidates = {}
    for shield in sel.among:
        spec = config.shields[shield]
        pipeline = zoo.shield_pipeline(shield, sel.classifier)
        spec_weights = zoo.weight_hashes([f"shield-{shield}", sel.classifier])
        rec = records.get(
            f"selection-{name}-{shield}", {**base, "shield": shield, "weights": spec_weights},
            lambda: _measure(config, sel, pipeline, f"{spec.method} {shield}", val, progress))
        candidates[shield] = {"clean": rec["clean"]["accuracy"], "robust": rec["robust"]["accuracy"],
                              "record": rec}
    ref_clean = reference["clean"]["accuracy"]
    chosen = choose(candidates, ref_clean, sel.max_clean_drop)
    _render(config, out, name, sel, reference, candidates, chosen)
    logger.info("selection %s: chose %s", name, chosen)
    return chosen


def resolve(zoo: ModelZoo, records: RecordCache, out: Path, progress: bool = True) -> ExperimentConfig:
    """The zoo's config with every ``select`` row pointing at its chosen shield."""
    config = zoo.config
    if not any(row.select for row in config.rows):
        return config
    names = dict.fromkeys(r.select for r in config.rows if r.select)
    chosen = {name: select(name, zoo, records, out, progress) for name in names}
    rows = tuple(replace(row, shield=chosen[row.select]) if row.select else row for row in config.rows)
    return replace(config, rows=rows)


def rule(sel: SelectionSpec) -> str:
    """The selection's rule in words (for a card or a report)."""
    return (f"the most robust under {sel.attack.title} ({sel.threat.describe()}) on {sel.n} validation "
            f"images (seed {sel.seed}) among {', '.join(sel.among)}, of those whose clean accuracy "
            f"behind {sel.classifier} is within {100 * sel.max_clean_drop:g} points of "
            f"{sel.classifier}'s own on the same images; if none is, the cleanest")


def card_entry(name: str, sel: SelectionSpec, chosen: str) -> dict:
    """What a shipped shield's card says of the selection that chose it."""
    return {"name": name, "rule": rule(sel), "chosen": chosen, "report": f"selection_{name}.md"}


def _fmt(d: dict) -> str:
    return Accuracy(d["correct"], d["n"]).format()


def _render(config: ExperimentConfig, out: Path, name: str, sel: SelectionSpec, reference: dict,
            candidates: dict[str, dict], chosen: str) -> None:
    ref = reference["clean"]["accuracy"]
    lines = [f"# Selection `{name}`: which shield the table's selected row shows", "",
             f"Target `{config.name}`, profile `{config.profile}`. Measured on "
             f"n = {sel.n} validation images (training images held out from every model; seeded "
             f"subset, seed {sel.seed}), never on test images. Classifier {sel.classifier}. "
             f"Attack: {sel.attack.title}, threat model {sel.threat.describe()} (white-box, "
             "whole pipeline). Cells: accuracy % [Wilson 95% interval].", "",
             f"Rule: the most robust candidate whose validation clean accuracy is at least the "
             f"undefended classifier's minus {100 * sel.max_clean_drop:g} points; if none is, "
             "the cleanest.", "",
             "| candidate | clean | clean - undefended (points) | robust | chosen |",
             "|---|---|---|---|---|",
             f"| undefended {sel.classifier} | {_fmt(reference['clean'])} | 0 | "
             f"{_fmt(reference['robust'])} | |"]
    for shield, c in candidates.items():
        rec = c["record"]
        lines.append(f"| {shield} | {_fmt(rec['clean'])} | {100 * (c['clean'] - ref):+.1f} | "
                     f"{_fmt(rec['robust'])} | {'yes' if shield == chosen else ''} |")
    write_text_atomic(out / f"selection_{name}.md", "\n".join(lines) + "\n")


__all__ = ["card_entry", "choose", "resolve", "rule", "select"]
