"""The one runner behind every ``aeshield reproduce`` target.

It resolves a config, trains what is missing (cached by a hash of its spec and its data),
evaluates every (row, classifier, suite) through the cascade harness, and renders tables and
figures from the records it wrote. Results land in ``<out>/<target>/<profile>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from torch import nn

from ..data import cache_dir, load_dataset
from ..defenses.adversarial_training import AdversarialTrainingConfig, adversarial_training
from ..defenses.base import Shielded
from ..eval.harness import evaluate
from ..records import EvalRecord, config_hash, manifest
from ..io import write_json_atomic
from ..models import create_model
from ..models.io import load_weights, save_weights, shipped_dir
from ..train.classifier import ClassifierConfig, accuracy, train_classifier
from .config import ExperimentConfig, RowSpec, load_config, spec_dict
from .methods import get_method
from .parallel import run_parallel
from .report import render_figures, render_tables
from .selection import resolve as resolve_selections

logger = logging.getLogger(__name__)


class Runner:
    def __init__(self, config: ExperimentConfig, out_root: str | Path = "docs/results",
                 artifacts: str | Path | None = None, use_shipped: bool = True,
                 progress: bool = True, device: str = "cpu") -> None:
        self.config = config
        self.out_root = Path(out_root)
        self.out = self.out_root / config.name / config.profile
        self.artifacts = Path(artifacts) if artifacts else cache_dir() / "artifacts"
        self.use_shipped = use_shipped
        self.progress = progress
        self.device = device
        self._models: dict[str, nn.Module] = {}
        self._paths: dict[str, Path] = {}
        self.sources: dict[str, dict] = {}
        self.timings: dict[str, float] = {}
        self._test_subsets: dict[int, object] = {}
        self._pipelines: dict[tuple, tuple[nn.Module, str]] = {}
        self.row_aliases: dict[str, str] = {}  # row label -> the row whose records it shows
        self.train, self.val, self.test = (
            _on_device(_limited(load_dataset(config.dataset, split), config.data_limit, config.seed), device)
            for split in ("train", "val", "test"))

    # ---- artifacts -------------------------------------------------------------------
    def _artifact(self, kind: str, spec: dict) -> tuple[Path, str]:
        key = config_hash({"kind": kind, "spec": spec, "data": self.train.sha256})
        return self.artifacts / f"{kind}-{key}.safetensors", key

    def _find(self, path: Path, key: str) -> Path | None:
        """The shipped file of this spec if there is one (unless ``use_shipped`` is off), else
        the cached one. Shipped first: those are the bytes a clean checkout evaluates, so the
        records a maintainer commits after ``--ship`` are the ones every user finds up to date
        (cache first had kept them on the float32 originals, stale everywhere else)."""
        if self.use_shipped and shipped_dir().exists():
            for side in sorted(shipped_dir().glob("*.json")):
                try:
                    if json.loads(side.read_text()).get("spec_hash") == key:
                        return side.with_suffix(".safetensors")
                except (OSError, json.JSONDecodeError):
                    continue
        return path if path.exists() else None

    def classifier(self, name: str) -> nn.Module:
        if name in self._models:
            return self._models[name]
        spec = self.config.classifiers[name]
        path, key = self.classifier_artifact(name)
        found = self._find(path, key)
        if found is None:
            start = time.perf_counter()
            logger.info("training classifier %s (%s)", name, spec.model)
            limit = self.config.data_limit
            # train_classifier reads its own splits: cut them as this runner's are cut.
            limits = ({"train_limit": min(spec.train_limit or limit, limit), "test_limit": limit,
                       "val_limit": min(ClassifierConfig.val_limit, limit)} if limit else
                      {"train_limit": spec.train_limit})
            cfg = ClassifierConfig(model=spec.model, dataset=self.config.dataset, epochs=spec.epochs,
                                   batch_size=spec.batch_size, lr=spec.lr, optimizer=spec.optimizer,
                                   seed=self.config.seed, augment=spec.augment, **limits)
            train_classifier(cfg, path, progress=self.progress, device=self.device)
            _stamp(path, key)
            self.timings[f"train classifier {name}"] = time.perf_counter() - start
            found = path
        model, _ = load_weights(found, architecture=spec.model, dataset=self.config.dataset,
                                device=self.device)
        self._note_source(name, found)
        self._models[name] = model
        return model

    def adversarially_trained(self, name: str) -> nn.Module:
        key_name = f"AT-{name}"
        if key_name in self._models:
            return self._models[key_name]
        spec = self.config.adversarial_training
        base = self.config.classifiers[name]
        path, key = self.adversarially_trained_artifact(name)
        found = self._find(path, key)
        if found is None:
            start = time.perf_counter()
            logger.info("adversarial training of %s", name)
            model = create_model(base.model).to(self.device)
            model.load_state_dict(self.classifier(name).state_dict())
            train = self.train_subset(spec.train_limit)
            val = self.val.subset(spec.val_n, seed=1)
            cfg = AdversarialTrainingConfig(eps=spec.eps, step_size=spec.step_size,
                                            attack_steps=spec.attack_steps, epochs=spec.epochs,
                                            batch_size=spec.batch_size, lr=spec.lr, seed=self.config.seed,
                                            eps_ramp_steps=spec.eps_ramp_steps,
                                            cosine_lr=spec.cosine_lr)
            result = adversarial_training(model, train.images, train.labels, cfg, x_val=val.images,
                                          y_val=val.labels, checkpoint=path.with_suffix(".ckpt"),
                                          progress=self.progress)
            clean = accuracy(model, self.test.images, self.test.labels)
            save_weights(model, path, architecture=base.model, dataset=self.config.dataset,
                         kind="classifier", training="pgd-adversarial-training", clean_accuracy=clean,
                         config=asdict(cfg), spec_hash=key, history=result.history,
                         data_hash=self.train.sha256)
            path.with_suffix(".ckpt").unlink(missing_ok=True)
            self.timings[f"adversarial training {name}"] = time.perf_counter() - start
            found = path
        model, _ = load_weights(found, architecture=base.model, dataset=self.config.dataset,
                                device=self.device)
        self._note_source(key_name, found)
        self._models[key_name] = model
        return model

    def classifier_artifact(self, name: str) -> tuple[Path, str]:
        return self._artifact("classifier", asdict(self.config.classifiers[name]))

    def adversarially_trained_artifact(self, name: str) -> tuple[Path, str]:
        return self._artifact("adv-trained", {"base": asdict(self.config.classifiers[name]),
                                              "at": spec_dict(self.config.adversarial_training)})

    def classifier_specs(self, names) -> dict[str, dict]:
        return {c: asdict(self.config.classifiers[c]) for c in names}

    def shield_artifact(self, name: str) -> tuple[Path, str]:
        spec = self.config.shields[name]
        method = get_method(spec.method)
        return self._artifact(method.kind, {"spec": spec_dict(spec),
                                            "against": self.classifier_specs(method.depends_on(spec))})

    def shield(self, name: str) -> nn.Module:
        """The trained module of shield ``name`` (trained now if neither cached nor shipped)."""
        key_name = f"shield-{name}"
        if key_name in self._models:
            return self._models[key_name]
        spec = self.config.shields[name]
        method = get_method(spec.method)
        path, key = self.shield_artifact(name)
        found = self._find(path, key)
        if found is None:
            start = time.perf_counter()
            logger.info("training %s shield %s", spec.method, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            method.train(self, spec, path)
            _stamp(path, key)
            path.with_suffix(".ckpt").unlink(missing_ok=True)
            self.timings[f"train shield {name}"] = time.perf_counter() - start
            found = path
        model = method.load(self, spec, found)
        self._paths[key_name] = found
        self._note_source(key_name, found)
        self._models[key_name] = model
        return model

    def cached_record(self, name: str, spec: dict, compute) -> dict:
        """Measured numbers of an analysis: ``<out>/records/<name>.json``, recomputed only when
        ``spec`` (everything the numbers depend on) changed. ``compute()`` returns a JSON-able dict."""
        key = config_hash({"spec": spec, "data": self.test.sha256})
        path = self.out / "records" / f"{name}.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
                if old.get("spec_hash") == key:
                    logger.info("record %s is up to date", path.name)
                    return old
            except json.JSONDecodeError:
                logger.warning("record %s is corrupt; recomputing", path)
        start = time.perf_counter()
        result = {**compute(), "spec": spec, "spec_hash": key, "target": self.config.name,
                  "profile": self.config.profile, "dataset": self.config.dataset,
                  "data_source": self.test.source}
        write_json_atomic(path, result)
        self.timings[f"analysis {name}"] = time.perf_counter() - start
        return result

    def _note_source(self, name: str, path: Path) -> None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        origin = "shipped" if path.parent == shipped_dir() else "trained (cache)"
        self.sources[name] = {"file": path.name, "sha256_16": digest, "origin": origin}

    def ship(self) -> list[Path]:
        """Export the artifacts named in the config's ``ship`` section into the package's
        weight folder, as float16, with clean accuracy re-measured on the stored weights."""
        written = []
        as_shipped: dict[str, nn.Module] = {}  # config key -> classifier re-loaded from its file
        for ship_name, what in (self.config.raw.get("ship") or {}).items():
            if "classifier" in what:
                key = what["classifier"]
                spec = self.config.classifiers[key]
                model = self.classifier(key)
                _, spec_hash = self.classifier_artifact(key)
                path = save_weights(model, shipped_dir() / ship_name, architecture=spec.model,
                                    dataset=self.config.dataset, half=True, kind="classifier",
                                    training="natural", spec_hash=spec_hash, source_target=self.config.name)
                reloaded, _ = load_weights(path)
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
                path = save_weights(model, shipped_dir() / ship_name, architecture=base.model,
                                    dataset=self.config.dataset, half=True, kind="classifier",
                                    training="pgd-adversarial-training", spec_hash=spec_hash,
                                    source_target=self.config.name,
                                    adversarial_training=asdict(self.config.adversarial_training))
                reloaded, _ = load_weights(path)
                extra = {"clean_accuracy": accuracy(reloaded, self.test.images, self.test.labels),
                         "test_n": len(self.test)}
            else:
                key = what["shield"]
                spec = self.config.shields[key]
                method = get_method(spec.method)
                _, spec_hash = self.shield_artifact(key)
                module = self.shield(key)
                stored = json.loads(self._paths[f"shield-{key}"].with_suffix(".json").read_text())
                path = save_weights(module, shipped_dir() / ship_name,
                                    architecture=stored["architecture"], dataset=self.config.dataset,
                                    half=True, kind="shield", method=spec.method,
                                    loss=getattr(spec, "loss", None), spec_hash=spec_hash,
                                    source_target=self.config.name, shield_spec=asdict(spec))
                reloaded = method.load(self, spec, path)
                names = what.get("classifier_names", {})
                against = method.depends_on(spec)

                def pipeline(c: str) -> nn.Module:
                    if method.plain_pipeline:
                        return Shielded(reloaded, as_shipped.get(c) or self.classifier(c))
                    return method.pipeline(self, spec, reloaded, c)

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
            side = path.with_suffix(".json")
            write_json_atomic(side, {**json.loads(side.read_text()), **extra})
            written.append(path)
            logger.info("shipped %s (%.1f MB)", path.name, path.stat().st_size / 1e6)
        return written

    def resolve_selections(self) -> None:
        """Point every ``select`` row at the shield its selection chooses on validation images
        (``experiments.selection``); before planning, so workers get the resolved rows."""
        self.config = resolve_selections(self)
        # A selected row that shows the same shield on the same images as a listed row is
        # rendered from that row's records instead of attacking the same pipeline twice.
        listed = {(r.shield, r.n): r.label for r in self.config.rows if r.kind == "shield" and not r.select}
        self.row_aliases = {r.label: listed[(r.shield, r.n)] for r in self.config.rows
                            if r.select and (r.shield, r.n) in listed}

    def train_subset(self, limit: int | None):
        return self.train.subset(limit, seed=self.config.seed) if limit else self.train

    # ---- evaluation ------------------------------------------------------------------
    def pipeline(self, row: RowSpec, classifier: str) -> tuple[nn.Module, str]:
        """The evaluated model of a row behind ``classifier`` and its defense label, built once
        per runner (a detector calibrates once, not per suite or per analysis)."""
        if (row, classifier) not in self._pipelines:
            self._pipelines[(row, classifier)] = self._build_pipeline(row, classifier)
        return self._pipelines[(row, classifier)]

    def _build_pipeline(self, row: RowSpec, classifier: str) -> tuple[nn.Module, str]:
        if row.kind == "natural":
            return self.classifier(classifier), "none"
        if row.kind == "adversarial-training":
            return self.adversarially_trained(classifier), "adversarial training"
        if row.kind == "shield":
            spec = self.config.shields[row.shield]
            pipeline = get_method(spec.method).pipeline(self, spec, self.shield(row.shield), classifier)
            return pipeline, f"{spec.method} {row.shield}"
        raise ValueError(f"unknown row kind {row.kind!r}")

    def evaluate_all(self) -> list[dict]:
        entries = []
        for row in self.config.rows:
            if row.label in self.row_aliases:
                continue
            for group in self.config.groups:
                for classifier in group.classifiers:
                    for suite in self.config.suites:
                        if suite.applies_to(row):
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
        return self.out / "records" / f"{_slug(row_label)}__{classifier}__{suite}.json"

    def surrogate(self, row: RowSpec, classifier: str) -> nn.Module | None:
        """The model a row's ``wrap: surrogate`` attacks craft on, from its method (or None)."""
        if row.kind != "shield":
            return None
        spec = self.config.shields[row.shield]
        method = get_method(spec.method)
        if method.surrogate is None:
            return None
        return method.surrogate(self, spec, self.shield(row.shield), classifier)

    def _evaluate_one(self, row, classifier, suite, model, defense, test) -> dict:
        spec = {"row": spec_dict(row), "classifier": classifier, "suite": suite.name,
                "attacks": [a.to_dict() for a in suite.attacks], "threat": suite.threat.to_dict(),
                "n": suite.n or row.n or self.config.n, "seed": self.config.seed,
                "model": self._model_key(row, classifier)}
        key = config_hash(spec)
        weights = self._weights_of(row, classifier)
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
        surrogate = self.surrogate(row, classifier) if any(a.wrap == "surrogate" for a in suite.attacks) else None
        record = evaluate(model, test.images, test.labels, suite.attacks, suite.threat,
                          batch_size=self.config.batch_size, seed=self.config.seed,
                          defense=defense, classifier=f"{classifier} ({self.config.classifiers[classifier].model})",
                          dataset=self.config.dataset, data_source=test.source,
                          data_hash=test.sha256, progress=self.progress, surrogate=surrogate,
                          checkpoint=path.with_suffix(".partial.json"))
        record.extra.update({"spec_hash": key, "weights": weights, "row": row.label,
                             "suite": suite.name, "target": self.config.name,
                             "profile": self.config.profile})
        record.save(path)
        path.with_suffix(".partial.json").unlink(missing_ok=True)
        self.timings[f"eval {row.label} / {classifier} / {suite.name}"] = time.perf_counter() - start
        logger.info("%s | %s | %s: clean %s, robust %s", row.label, classifier, suite.name,
                    record.clean.format(), record.robust.format())
        return {"row": row.label, "classifier": classifier, "suite": suite.name, "record": record}

    def weight_hashes(self, names) -> dict[str, str]:
        """SHA-256 prefixes of loaded weight files, by model key ("A", "AT-A", "shield-s")."""
        return {n: self.sources[n]["sha256_16"] for n in names if n in self.sources}

    def _weights_of(self, row: RowSpec, classifier: str) -> dict[str, str]:
        """SHA-256 prefixes of the weight files behind a row's pipeline (loaded by then)."""
        names = {"natural": [classifier], "adversarial-training": [f"AT-{classifier}"],
                 "shield": [f"shield-{row.shield}", classifier]}[row.kind]
        return self.weight_hashes(names)

    def _model_key(self, row: RowSpec, classifier: str) -> dict:
        base = asdict(self.config.classifiers[classifier])
        if row.kind == "adversarial-training":
            return {"base": base, "at": asdict(self.config.adversarial_training)}
        if row.kind == "shield":
            spec = self.config.shields[row.shield]
            return {"base": base, "shield": spec_dict(spec), "method": spec.method} \
                if get_method(spec.method).method_in_record_key else {"base": base, "shield": spec_dict(spec)}
        return {"base": base}

    def _measured_seconds(self) -> dict[str, float]:
        """Seconds of every training and evaluation behind the current results: this run's,
        and for what it reused, the run that measured it (a re-render used to overwrite them)."""
        try:
            old = json.loads((self.out / "manifest.json").read_text())
            kept = old.get("measured_seconds") or {k: v for k, v in old.get("timings_seconds", {}).items()
                                                   if k != "total"}
        except (OSError, ValueError, AttributeError):
            kept = {}
        return {**kept, **{k: v for k, v in self.timings.items() if k != "total"}}

    def run(self, jobs: int = 1) -> Path:
        """Train what is missing, evaluate every cell, render. ``jobs`` > 1 fills the cache and
        the records in that many worker processes first; the table is the same either way."""
        start = time.perf_counter()
        self.resolve_selections()
        if jobs > 1:
            self.timings.update(run_parallel(self, jobs))
        entries = self.evaluate_all()
        tables = render_tables(self.config, entries, self.out, self.row_aliases)
        render_figures(self, self.out)
        self.timings["total"] = time.perf_counter() - start
        write_json_atomic(self.out / "manifest.json", {
            **manifest(self.config.raw, {self.config.dataset: self.train.sha256}),
            "target": self.config.name, "profile": self.config.profile,
            "data_source": self.test.source, "weights": self.sources,
            "timings_seconds": self.timings,
            "measured_seconds": self._measured_seconds()})
        print(tables)
        return self.out


def _on_device(data, device: str):
    if str(device) == "cpu":
        return data
    return replace(data, images=data.images.to(device), labels=data.labels.to(device))


def _limited(data, limit: int | None, seed: int):
    return data.subset(limit, seed=seed) if limit else data


def _stamp(path: Path, key: str) -> None:
    side = path.with_suffix(".json")
    data = json.loads(side.read_text())
    data["spec_hash"] = key
    write_json_atomic(side, data)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


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
    artifacts = Path(out_root) / "artifacts" if smoke else None
    runner = Runner(config, out_root, artifacts=artifacts, use_shipped=use_shipped and not smoke,
                    progress=progress, device=device)
    out = runner.run(jobs=jobs)
    if ship:
        runner.ship()
    return out
