"""The one runner behind every ``aeshield reproduce`` target.

It resolves a config, trains what is missing (cached by a hash of its spec and its data),
evaluates every (row, classifier, suite) through the cascade harness, and renders tables and
figures from the records it wrote. Results land in ``<out>/<target>/<profile>/``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from ..data import cache_dir
from ..attacks.registry import attacks as registered_attacks, get_attack
from ..defenses.base import Shielded
from ..eval.audit.battery import build_battery
from ..eval.audit.budget import get_budget
from ..eval.harness import AttackSpec, evaluate
from ..eval.sanity import detect_randomness
from ..io import write_json_atomic
from ..records import EvalRecord, config_dict, config_hash, manifest
from ..models.io import shipped_dir
from ..models.modes import eval_mode
from ..store import ArtifactStore
from ..train.classifier import accuracy
from .analyses import AnalysisContext, check_available, run_analyses
from .analyses.tables import render_tables
from .config import ExperimentConfig, RowSpec, SuiteSpec, load_config, spec_dict
from .methods import get_method
from .parallel import run_parallel, run_ranks
from .record_cache import RecordCache, slug
from .selection import card_entry as selection_card_entry, resolve as resolve_selections, select
from .zoo import ModelZoo, load_splits

logger = logging.getLogger(__name__)


def check_extras(config: ExperimentConfig) -> None:
    """``MissingExtraError`` now, before anything trains, if one of the target's attacks or
    figures needs an optional package that is not installed (e.g. the corruption targets)."""
    specs = [a for suite in config.suites for a in suite.attacks]
    specs += [selection.attack for selection in config.selections.values()]
    for spec in specs:
        get_attack(spec.name).check_available()
    # An audit suite may run every attack that joins the audit's battery at its norm.
    for suite in config.suites:
        if suite.audit is not None:
            for attack in registered_attacks():
                if attack.audit is not None and suite.threat.norm in attack.norms:
                    attack.check_available()
    check_available(config.figures)


def record_spec(config: ExperimentConfig, zoo: ModelZoo, row: RowSpec, classifier: str, suite: SuiteSpec,
                attacks: list[AttackSpec], audit: dict | None = None) -> dict:
    """What one cell's record depends on (its key is the hash of this): the row, the classifier,
    the suite's cascade as run, threat, n, seed and the specs of the models; for an audit suite
    also the budget (``audit``), so that a change of battery or budget re-measures."""
    return {"row": spec_dict(row), "classifier": classifier, "suite": suite.name,
            "attacks": [a.to_dict() for a in attacks], "threat": suite.threat.to_dict(),
            "n": suite.n or row.n or config.n, "seed": config.seed,
            "model": zoo.model_key(row, classifier), **(audit or {})}


class Runner:
    """One target at one profile: its models (``zoo``, over the artifact ``store``), its
    evaluation records and analysis records under ``out``, and the tables rendered from them."""

    def __init__(self, config: ExperimentConfig, out_root: str | Path = "docs/results",
                 artifacts: str | Path | None = None, use_shipped: bool = True,
                 progress: bool = True, device: str = "cpu") -> None:
        self.config = config
        self.out_root = Path(out_root)
        self.out = self.out_root / config.name / config.profile
        self.use_shipped = use_shipped
        self.progress = progress
        self.device = device
        self.timings: dict[str, float] = {}
        self._test_subsets: dict[int, object] = {}
        self.row_aliases: dict[str, str] = {}  # row label -> the row whose records it shows
        self.data = load_splits(config, device)
        self.store = ArtifactStore(Path(artifacts) if artifacts else cache_dir() / "artifacts",
                                   self.data.train.sha256, use_shipped=use_shipped)
        self.zoo = ModelZoo(config, self.data, self.store, device=device, progress=progress,
                            timings=self.timings)
        self.records = RecordCache(self.out / "records", self.data.test.sha256,
                                   {"target": config.name, "profile": config.profile,
                                    "dataset": config.dataset, "data_source": self.data.test.source},
                                   self.timings)

    # ---- what callers of the runner read -----------------------------------------------
    @property
    def train(self):
        return self.data.train

    @property
    def val(self):
        return self.data.val

    @property
    def test(self):
        return self.data.test

    @property
    def artifacts(self) -> Path:
        return self.store.root

    @property
    def sources(self) -> dict[str, dict]:
        return self.store.sources

    def classifier(self, name: str) -> nn.Module:
        return self.zoo.classifier(name)

    def adversarially_trained(self, name: str) -> nn.Module:
        return self.zoo.adversarially_trained(name)

    def shield(self, name: str) -> nn.Module:
        return self.zoo.shield(name)

    def classifier_artifact(self, name: str) -> tuple[Path, str]:
        return self.zoo.classifier_artifact(name)

    def adversarially_trained_artifact(self, name: str) -> tuple[Path, str]:
        return self.zoo.adversarially_trained_artifact(name)

    def shield_artifact(self, name: str) -> tuple[Path, str]:
        return self.zoo.shield_artifact(name)

    def weight_hashes(self, names) -> dict[str, str]:
        return self.zoo.weight_hashes(names)

    def ship(self) -> list[Path]:
        """Export the artifacts named in the config's ``ship`` section into the package's
        weight folder, as float16, with clean accuracy re-measured on the stored weights. A
        shield entry names its shield (``shield: KEY``) or a selection (``select: NAME``: the
        shield it chooses on validation images, named with its rule in the card)."""
        written = []
        as_shipped: dict[str, nn.Module] = {}  # config key -> classifier re-loaded from its file
        for ship_name, what in (self.config.raw.get("ship") or {}).items():
            if "classifier" in what:
                key = what["classifier"]
                spec = self.config.classifiers[key]
                model = self.classifier(key)
                _, spec_hash = self.classifier_artifact(key)
                path = self.store.save_weights(model, shipped_dir() / ship_name, architecture=spec.model,
                                               dataset=self.config.dataset, half=True, kind="classifier",
                                               training="natural", spec_hash=spec_hash,
                                               source_target=self.config.name)
                reloaded = self.store.load_weights(path)
                as_shipped[key] = reloaded
                extra = {"clean_accuracy": accuracy(reloaded, self.test.images, self.test.labels),
                         "test_n": len(self.test)}
            elif "adversarially_trained" in what:
                key = what["adversarially_trained"]
                base = self.config.classifiers[key]
                model = self.adversarially_trained(key)
                # The key the lookup uses (spec_dict): asdict here once shipped AT files under
                # hashes no run could find, so every run retrained them.
                _, spec_hash = self.adversarially_trained_artifact(key)
                path = self.store.save_weights(model, shipped_dir() / ship_name, architecture=base.model,
                                               dataset=self.config.dataset, half=True, kind="classifier",
                                               training="pgd-adversarial-training", spec_hash=spec_hash,
                                               source_target=self.config.name,
                                               adversarial_training=config_dict(self.config.adversarial_training))
                reloaded = self.store.load_weights(path)
                extra = {"clean_accuracy": accuracy(reloaded, self.test.images, self.test.labels),
                         "test_n": len(self.test)}
            else:
                selection = None
                if "select" in what:  # the shield a validation selection chose
                    name = what["select"]
                    key = select(name, self.zoo, self.records, self.out, self.progress)
                    selection = selection_card_entry(name, self.config.selections[name], key)
                else:
                    key = what["shield"]
                spec = self.config.shields[key]
                method = get_method(spec.method)
                _, spec_hash = self.shield_artifact(key)
                module = self.shield(key)
                stored = json.loads(self.store.file_of(f"shield-{key}").with_suffix(".json").read_text())
                path = self.store.save_weights(module, shipped_dir() / ship_name,
                                               architecture=stored["architecture"],
                                               dataset=self.config.dataset, half=True, kind="shield",
                                               method=spec.method,
                                               loss=getattr(spec, "loss", None), spec_hash=spec_hash,
                                               source_target=self.config.name, shield_spec=spec_dict(spec))
                reloaded = method.load(self.zoo, spec, path)
                names = what.get("classifier_names", {})
                against = method.depends_on(spec)

                def pipeline(c: str) -> nn.Module:
                    if method.plain_pipeline:
                        return Shielded(reloaded, as_shipped.get(c) or self.classifier(c))
                    return method.pipeline(self.zoo, spec, reloaded, c)

                extra = {"trained_against": [names.get(c, c) for c in against],
                         "transfer_classifiers": [names.get(c, c) for c in self.config.classifiers
                                                  if c not in against],
                         "clean_accuracy": {names.get(c, c): accuracy(
                             pipeline(c), self.test.images, self.test.labels)
                             for c in self.config.classifiers},
                         "clean_accuracy_note": "measured with the stored float16 shield in front of "
                                                "the shipped float16 classifiers (or, for one not "
                                                "shipped, the one this run trained)",
                         "test_n": len(self.test)}
                extra["card"] = method.card(spec, self.config.seed, self.config.dataset,
                                            extra["trained_against"])
                if selection is not None:
                    extra["card"]["selection"] = selection
            side = path.with_suffix(".json")
            write_json_atomic(side, {**json.loads(side.read_text()), **extra})
            written.append(path)
            logger.info("shipped %s (%.1f MB)", path.name, path.stat().st_size / 1e6)
        return written

    def resolve_selections(self) -> None:
        """Point every ``select`` row at the shield its selection chooses on validation images
        (``experiments.selection``); before planning, so workers get the resolved rows."""
        self.config = resolve_selections(self.zoo, self.records, self.out, self.progress)
        self.zoo.config = self.config
        # A selected row that shows the same shield on the same images as a listed row is
        # rendered from that row's records instead of attacking the same pipeline twice.
        listed = {(r.shield, r.n): r.label for r in self.config.rows if r.kind == "shield" and not r.select}
        self.row_aliases = {r.label: listed[(r.shield, r.n)] for r in self.config.rows
                            if r.select and (r.shield, r.n) in listed}

    # ---- evaluation ------------------------------------------------------------------
    def pipeline(self, row: RowSpec, classifier: str) -> tuple[nn.Module, str]:
        return self.zoo.pipeline(row, classifier)

    def evaluate_all(self) -> list[dict]:
        entries = []
        for row in self.config.rows:
            if row.label in self.row_aliases:
                continue
            for group in self.config.groups:
                for classifier in group.classifiers:
                    for suite in self.config.suites:
                        if suite.applies_to(row, classifier):
                            entries.append(self.evaluate_cell(row, classifier, suite))
        for alias, source in self.row_aliases.items():
            entries += [{**e, "row": alias} for e in entries if e["row"] == source]
        return entries

    def evaluate_cell(self, row: RowSpec, classifier: str, suite) -> dict:
        """One (row, classifier, suite) record: reused if its spec and weights match, else measured."""
        model, defense = self.pipeline(row, classifier)
        return self._evaluate_one(row, classifier, suite, model, defense,
                                  self.test_subset(suite.n or row.n))

    def test_subset(self, n: int | None = None):
        """The first ``n`` (default: the target's n) of the seeded test permutation."""
        n = n or self.config.n
        if n not in self._test_subsets:
            self._test_subsets[n] = self.test.subset(n, seed=self.config.seed)
        return self._test_subsets[n]

    def record_path(self, row_label: str, classifier: str, suite: str) -> Path:
        return self.out / "records" / f"{slug(row_label)}__{classifier}__{suite}.json"

    def suite_attacks(self, row: RowSpec, classifier: str, suite: SuiteSpec, model: nn.Module,
                      test) -> tuple[list[AttackSpec], dict]:
        """A cell's cascade and what the record's spec adds for it. A suite with ``audit`` runs
        the battery ``aeshield audit`` builds for this pipeline: through EOT when the pipeline is
        random (measured on the first 64 test images, as the audit measures it, or declared
        ``stochastic``), with a transfer attack from the row's surrogate when its method has one."""
        if suite.audit is None:
            return list(suite.attacks), {}
        budget = get_budget(suite.audit)
        devices = [test.images.device] if test.images.device.type == "cuda" else []
        # Measured without touching the random state: a random purifier's draws stay the evaluation's.
        with torch.no_grad(), torch.random.fork_rng(devices=devices), eval_mode(model):
            measured, _ = detect_randomness(model, test.images[:64])
        random = measured or bool(getattr(model, "stochastic", False))
        battery = build_battery(model, suite.threat, budget, random=random,
                                surrogate=self.zoo.surrogate(row, classifier))
        return battery, {"audit": budget.to_dict(), "random": random}

    def _evaluate_one(self, row, classifier, suite, model, defense, test) -> dict:
        attacks, audit = self.suite_attacks(row, classifier, suite, model, test)
        key = config_hash(record_spec(self.config, self.zoo, row, classifier, suite, attacks, audit))
        weights = self.zoo.weights_of(row, classifier)
        path = self.record_path(row.label, classifier, suite.name)
        if path.exists():
            old = EvalRecord.load(path)
            if old.extra.get("spec_hash") == key and old.extra.get("weights") == weights:
                logger.info("record %s is up to date", path.name)
                return {"row": row.label, "classifier": classifier, "suite": suite.name, "record": old}
            if old.extra.get("spec_hash") == key:
                # Same spec, other weights: a classifier retrained elsewhere (another torch
                # build) or the shipped float16 file instead of the cached float32 one.
                logger.info("record %s was measured on other weights; re-evaluating", path.name)
        start = time.perf_counter()
        surrogate = self.zoo.surrogate(row, classifier) if any(a.wrap == "surrogate" for a in attacks) else None
        record = evaluate(model, test.images, test.labels, attacks, suite.threat,
                          batch_size=self.config.batch_size, seed=self.config.seed,
                          defense=defense, classifier=f"{classifier} ({self.config.classifiers[classifier].model})",
                          dataset=self.config.dataset, data_source=test.source,
                          data_hash=test.sha256, progress=self.progress, surrogate=surrogate,
                          checkpoint=path.with_suffix(".partial.json"))
        record.extra.update({"spec_hash": key, "weights": weights, "row": row.label,
                             "suite": suite.name, "target": self.config.name,
                             "profile": self.config.profile,
                             **({"audit": {"budget": audit["audit"]["name"], "random": audit["random"]}}
                                if audit else {})})
        record.save(path)
        path.with_suffix(".partial.json").unlink(missing_ok=True)
        self.timings[f"eval {row.label} / {classifier} / {suite.name}"] = time.perf_counter() - start
        logger.info("%s | %s | %s: clean %s, robust %s", row.label, classifier, suite.name,
                    record.clean.format(), record.robust.format())
        return {"row": row.label, "classifier": classifier, "suite": suite.name, "record": record}

    def _measured_seconds(self) -> dict[str, float]:
        """Seconds of every training and evaluation behind the current results: this run's,
        and for what it reused, the run that measured it (a re-render used to overwrite them)."""
        try:
            old = json.loads((self.out / "manifest.json").read_text())
            kept = old.get("measured_seconds") or {k: v for k, v in old.get("timings_seconds", {}).items()
                                                   if k != "total"}
        except (OSError, ValueError, AttributeError):
            kept = {}
        # A renamed or removed row's evaluations are no longer behind the results.
        rows = {r.label for r in self.config.rows}
        kept = {k: v for k, v in kept.items() if not k.startswith("eval ") or k[5:].split(" / ")[0] in rows}
        return {**kept, **{k: v for k, v in self.timings.items() if k != "total"}}

    def run(self, jobs: int = 1) -> Path:
        """Train what is missing, evaluate every cell, render. ``jobs`` > 1 fills the cache and
        the records in that many worker processes first; the table is the same either way."""
        check_extras(self.config)
        start = time.perf_counter()
        if distributed.world().distributed:  # torchrun: each job and cell on one rank
            # The selections' candidates train on the ranks; rank 0 then resolves the
            # selections before the others read them from its files.
            self.timings.update(run_ranks(self, before_selections=True))
            if distributed.is_main():
                with distributed.alone():
                    self.resolve_selections()
            distributed.barrier()
            if not distributed.is_main():
                with distributed.alone():
                    self.resolve_selections()
            self.timings.update(run_ranks(self))
            if not distributed.is_main():
                return self.out  # rank 0 renders the tables from the records
        else:
            if jobs > 1:  # the selections' candidates train in the workers, beside the rest
                self.timings.update(run_parallel(self, jobs, before_selections=True))
            self.resolve_selections()
            if jobs > 1:
                self.timings.update(run_parallel(self, jobs))
        entries = self.evaluate_all()
        tables = render_tables(self.config, entries, self.out, self.row_aliases)
        run_analyses(self.config.figures, AnalysisContext(
            config=self.config, data=self.data, zoo=self.zoo, records=self.records, out=self.out,
            timings=self.timings))
        self.timings["total"] = time.perf_counter() - start
        write_json_atomic(self.out / "manifest.json", {
            **manifest(self.config.raw, {self.config.dataset: self.train.sha256}),
            "target": self.config.name, "profile": self.config.profile,
            "data_source": self.test.source, "weights": self.sources,
            "timings_seconds": self.timings,
            "measured_seconds": self._measured_seconds()})
        print(tables)
        return self.out


def reproduce(target: str, profile: str = "quick", out_root: str | Path = "docs/results",
              use_shipped: bool = True, progress: bool = True, ship: bool = False,
              device: str = "cpu", jobs: int = 1, smoke: bool = False) -> Path:
    """Run a target. ``jobs`` > 1 uses worker processes (spawned: a calling script needs the
    ``if __name__ == "__main__":`` guard); the CLI defaults to one per core. ``smoke`` runs
    the profile's code path at a few images and steps (``experiments.smoke``), with its own
    artifact cache under ``out_root``, and never ships."""
    if smoke and ship:
        raise ValueError("a smoke run measures nothing; it cannot ship weights")
    config = load_config(target, profile, smoke=smoke)
    check_extras(config)
    artifacts = Path(out_root) / "artifacts" if smoke else None
    runner = Runner(config, out_root, artifacts=artifacts, use_shipped=use_shipped and not smoke,
                    progress=progress, device=device)
    out = runner.run(jobs=jobs)
    if ship and distributed.is_main():
        runner.ship()
    return out
