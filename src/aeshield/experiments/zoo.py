"""The models of one target: its data splits, and every classifier, adversarially trained copy,
shield and evaluated pipeline, trained on first use when the artifact store has none.

A ``ModelZoo`` is what a method adapter, a selection or an analysis asks for a model; it knows
the config (what each name means), the store (where the weights are) and the splits (what they
are trained and calibrated on), and nothing about records, tables or figures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from ..data import load_dataset
from ..defenses.adversarial_training import AdversarialTrainingConfig, adversarial_training
from ..models import create_model
from ..records import config_dict
from ..store import ArtifactStore
from ..train.classifier import ClassifierConfig, accuracy, train_classifier
from .config import ExperimentConfig, RowSpec, spec_dict
from .methods import from_spec, get_method

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Splits:
    """A target's train, validation and test data, cut to its ``data_limit``, on its device."""

    train: Any
    val: Any
    test: Any


def load_splits(config: ExperimentConfig, device: str = "cpu") -> Splits:
    train, val, test = (_on_device(_limited(load_dataset(config.dataset, split), config.data_limit,
                                            config.seed), device)
                        for split in ("train", "val", "test"))
    return Splits(train, val, test)


class ModelZoo:
    """Models by config name, loaded once per process. ``timings`` receives the seconds of
    every training it does (the caller's dict, shared with the manifest)."""

    def __init__(self, config: ExperimentConfig, data: Splits, store: ArtifactStore,
                 device: str = "cpu", progress: bool = True,
                 timings: dict[str, float] | None = None) -> None:
        self.config = config
        self.data = data
        self.store = store
        self.device = device
        self.progress = progress
        self.timings = {} if timings is None else timings
        self._pipelines: dict[tuple[RowSpec, str], tuple[nn.Module, str]] = {}

    # What the method adapters read (``runner.train``, ``runner.artifacts``, ...).
    @property
    def train(self) -> Any:
        return self.data.train

    @property
    def val(self) -> Any:
        return self.data.val

    @property
    def test(self) -> Any:
        return self.data.test

    @property
    def artifacts(self) -> Path:
        return self.store.root

    def train_subset(self, limit: int | None) -> Any:
        return self.train.subset(limit, seed=self.config.seed) if limit else self.train

    # ---- artifact keys -----------------------------------------------------------------
    def classifier_artifact(self, name: str) -> tuple[Path, str]:
        return self.store.path("classifier", asdict(self.config.classifiers[name]))

    def adversarially_trained_artifact(self, name: str) -> tuple[Path, str]:
        return self.store.path("adv-trained", {"base": asdict(self.config.classifiers[name]),
                                               "at": spec_dict(self.config.adversarial_training)})

    def shield_artifact(self, name: str) -> tuple[Path, str]:
        spec = self.config.shields[name]
        method = get_method(spec.method)
        return self.store.path(method.kind, {"spec": spec_dict(spec),
                                             "against": self.classifier_specs(method.depends_on(spec))})

    def classifier_specs(self, names: Any) -> dict[str, dict]:
        return {c: asdict(self.config.classifiers[c]) for c in names}

    # ---- models ------------------------------------------------------------------------
    def _artifact(self, name: str, path: Path, key: str, timing: str, train: Callable[[], None],
                  load: Callable[[Path], nn.Module]) -> nn.Module:
        """The module remembered as ``name``, else loaded from the stored file of ``key``
        (shipped or cached), after ``train()`` writes ``path`` if there is none (under the
        store's lock on ``path``: a process that trains the same artifact is waited for)."""
        loaded = self.store.loaded(name)
        if loaded is not None:
            return loaded
        found = self.store.find(path, key)
        if found is None:
            # Another process sharing the store may be training it: wait for it, then look again.
            with self.store.lock(path):
                found = self.store.find(path, key)
                if found is None:
                    start = time.perf_counter()
                    train()
                    self.timings[timing] = time.perf_counter() - start
                    found = path
        return self.store.remember(name, load(found), found)

    def classifier(self, name: str) -> nn.Module:
        spec = self.config.classifiers[name]
        path, key = self.classifier_artifact(name)

        def train() -> None:
            logger.info("training classifier %s (%s)", name, spec.model)
            limit = self.config.data_limit
            # train_classifier reads its own splits: cut them as this zoo's are cut.
            limits = ({"train_limit": min(spec.train_limit or limit, limit), "test_limit": limit,
                       "val_limit": min(ClassifierConfig.val_limit, limit)} if limit else
                      {"train_limit": spec.train_limit})
            cfg = ClassifierConfig(model=spec.model, dataset=self.config.dataset, epochs=spec.epochs,
                                   batch_size=spec.batch_size, lr=spec.lr, optimizer=spec.optimizer,
                                   seed=self.config.seed, augment=spec.augment, **limits)
            train_classifier(cfg, path, progress=self.progress, device=self.device)
            self.store.stamp(path, key)

        return self._artifact(name, path, key, f"train classifier {name}", train,
                              lambda found: self._load(found, spec.model))

    def adversarially_trained(self, name: str) -> nn.Module:
        spec = self.config.adversarial_training
        base = self.config.classifiers[name]
        path, key = self.adversarially_trained_artifact(name)

        def train() -> None:
            logger.info("adversarial training of %s", name)
            model = create_model(base.model).to(self.device)
            model.load_state_dict(self.classifier(name).state_dict())
            train = self.train_subset(spec.train_limit)
            val = self.val.subset(spec.val_n, seed=1)
            cfg = from_spec(AdversarialTrainingConfig, spec, seed=self.config.seed)
            result = adversarial_training(model, train.images, train.labels, cfg, x_val=val.images,
                                          y_val=val.labels, checkpoint=path.with_suffix(".ckpt"),
                                          progress=self.progress)
            clean = accuracy(model, self.test.images, self.test.labels)
            self.store.save_weights(model, path, architecture=base.model, dataset=self.config.dataset,
                                    kind="classifier", training="pgd-adversarial-training",
                                    clean_accuracy=clean, config=config_dict(cfg), spec_hash=key,
                                    history=result.history, data_hash=self.train.sha256)
            path.with_suffix(".ckpt").unlink(missing_ok=True)

        return self._artifact(f"AT-{name}", path, key, f"adversarial training {name}", train,
                              lambda found: self._load(found, base.model))

    def shield(self, name: str) -> nn.Module:
        """The trained module of shield ``name`` (trained now if neither cached nor shipped)."""
        spec = self.config.shields[name]
        method = get_method(spec.method)
        path, key = self.shield_artifact(name)

        def train() -> None:
            logger.info("training %s shield %s", spec.method, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            method.train(self, spec, path)
            self.store.stamp(path, key)
            path.with_suffix(".ckpt").unlink(missing_ok=True)

        return self._artifact(f"shield-{name}", path, key, f"train shield {name}", train,
                              lambda found: method.load(self, spec, found))

    def _load(self, path: Path, architecture: str) -> nn.Module:
        return self.store.load_weights(path, architecture=architecture, dataset=self.config.dataset,
                                       device=self.device)

    # ---- evaluated pipelines -------------------------------------------------------------
    def shield_pipeline(self, shield: str, classifier: str) -> nn.Module:
        """Shield ``shield`` in front of ``classifier``, as its method deploys it."""
        spec = self.config.shields[shield]
        return get_method(spec.method).pipeline(self, spec, self.shield(shield), classifier)

    def pipeline(self, row: RowSpec, classifier: str) -> tuple[nn.Module, str]:
        """The evaluated model of a row behind ``classifier`` and its defense label, built once
        per zoo (a detector calibrates once, not per suite or per analysis)."""
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
            return self.shield_pipeline(row.shield, classifier), f"{spec.method} {row.shield}"
        raise ValueError(f"unknown row kind {row.kind!r}")

    def surrogate(self, row: RowSpec, classifier: str) -> nn.Module | None:
        """The model a row's ``wrap: surrogate`` attacks craft on, from its method (or None)."""
        if row.kind != "shield":
            return None
        spec = self.config.shields[row.shield]
        method = get_method(spec.method)
        if method.surrogate is None:
            return None
        return method.surrogate(self, spec, self.shield(row.shield), classifier)

    # ---- what a record depends on --------------------------------------------------------
    def weight_hashes(self, names: Any) -> dict[str, str]:
        """SHA-256 prefixes of loaded weight files, by model key ("A", "AT-A", "shield-s")."""
        return self.store.weight_hashes(names)

    def weights_of(self, row: RowSpec, classifier: str) -> dict[str, str]:
        """SHA-256 prefixes of the weight files behind a row's pipeline (loaded by then)."""
        names = {"natural": [classifier], "adversarial-training": [f"AT-{classifier}"],
                 "shield": [f"shield-{row.shield}", classifier]}[row.kind]
        return self.weight_hashes(names)

    def model_key(self, row: RowSpec, classifier: str) -> dict:
        """The specs a row's pipeline is built from, as its records' spec names them."""
        base = asdict(self.config.classifiers[classifier])
        if row.kind == "adversarial-training":
            return {"base": base, "at": config_dict(self.config.adversarial_training)}
        if row.kind == "shield":
            spec = self.config.shields[row.shield]
            key = {"base": base, "shield": spec_dict(spec)}
            return {**key, "method": spec.method} if get_method(spec.method).method_in_record_key else key
        return {"base": base}


def _on_device(data: Any, device: str) -> Any:
    if str(device) == "cpu":
        return data
    return replace(data, images=data.images.to(device), labels=data.labels.to(device))


def _limited(data: Any, limit: int | None, seed: int) -> Any:
    return data.subset(limit, seed=seed) if limit else data


__all__ = ["ModelZoo", "Splits", "load_splits"]
