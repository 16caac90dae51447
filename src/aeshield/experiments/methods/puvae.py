"""PuVAE as a runner method: a conditional VAE trained in front of one frozen classifier,
deployed with its RMSE detector calibrated on the run's clean validation images. Rows that
differ only in how the trained VAE is used share one training run."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ...defenses import puvae
from ...defenses.base import Shielded
from ...io import write_atomic
from ...records import config_hash
from ...models.io import load_weights, save_weights, shipped_dir
from ..config import spec_dict
from . import Method, from_spec

if TYPE_CHECKING:
    from ..runner import Runner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PuVAESpec:
    """A PuVAE shield in a config. ``detector``, ``fpr`` and ``sample`` only change how the
    trained VAE is used, so rows that differ only in them share one training run."""

    method: str
    vae: str
    against: tuple[str, ...]
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    kl_weight: float = 1.0
    ce_weight: float = 10.0
    train_limit: int | None = None
    val_n: int = 1000
    detector: bool = True
    fpr: float = 0.001
    sample: bool = False
    calibration_n: int | None = None  # clean validation images for the threshold (None: all)
    kl_warmup_steps: int = field(default=0, metadata={"hash_if_default": False})


_USE_FIELDS = ("detector", "fpr", "sample", "calibration_n")


def config(spec: PuVAESpec, seed: int) -> puvae.PuVAEConfig:
    return from_spec(puvae.PuVAEConfig, spec, architecture=spec.vae,
                     training=from_spec(puvae.PuVAETrainConfig, spec, seed=seed))


def training_key(spec: PuVAESpec, runner: "Runner") -> str:
    train_fields = {k: v for k, v in spec_dict(spec).items() if k not in _USE_FIELDS}
    return config_hash({"puvae": train_fields, "against": runner.classifier_specs(spec.against),
                        "data": runner.train.sha256})


def _same_training(meta: dict, key: str, spec: PuVAESpec, runner: "Runner") -> bool:
    """A stored VAE is this spec's training run: same training key, or (a shipped file, whose
    sidecar keeps the shield spec instead) same target, dataset and training fields."""
    if meta.get("training_key") == key:
        return True
    stored = meta.get("shield_spec")
    if not stored or meta.get("source_target") != runner.config.name or \
            meta.get("dataset") != runner.config.dataset:
        return False
    mine = {k: v for k, v in spec_dict(spec).items() if k not in _USE_FIELDS}
    theirs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items()
              if k not in _USE_FIELDS}
    return mine == theirs


def _train(runner: "Runner", spec: PuVAESpec, path: Path) -> None:
    if len(spec.against) != 1:
        raise ValueError(f"PuVAE trains against exactly one classifier, got {spec.against}")
    key = training_key(spec, runner)
    # Another row of the same config (or a shipped file) may hold this very training run.
    for folder in (runner.artifacts, shipped_dir()):
        for side in sorted(folder.glob("*.json")) if folder.exists() else ():
            try:
                meta = json.loads(side.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if meta.get("method") == "puvae" and _same_training(meta, key, spec, runner) and \
                    side.with_suffix(".safetensors").exists() and side.with_suffix(".safetensors") != path:
                # Sidecar first: the weights file, last, is what says the artifact is there.
                for source, target in ((side, path.with_suffix(".json")), (side.with_suffix(".safetensors"), path)):
                    write_atomic(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
                logger.info("PuVAE %s: reusing the VAE trained for %s", path.name, side.name)
                return
    classifier = runner.classifier(spec.against[0])
    train_set = runner.train_subset(spec.train_limit)
    cfg = config(spec, runner.config.seed)
    trained = puvae.train(cfg, [classifier], train_set, val=runner.val.subset(spec.val_n, seed=1),
                          checkpoint=path.with_suffix(".ckpt"), progress=runner.progress,
                          device=runner.device)
    save_weights(trained.module, path, architecture=spec.vae, dataset=runner.config.dataset,
                 kind="shield", method="puvae", training_key=key, config=asdict(cfg.training),
                 trained_against=runner.classifier_specs(spec.against), history=trained.history,
                 train_n=len(train_set), data_hash=runner.train.sha256)


def _load(runner: "Runner", spec: PuVAESpec, path: Path) -> nn.Module:
    vae, _ = load_weights(path, architecture=spec.vae, dataset=runner.config.dataset,
                          device=runner.device)
    return vae


def deploy(spec: PuVAESpec, module: nn.Module, classifier: nn.Module, val, seed: int) -> Shielded:
    """The configured pipeline, its detector calibrated on ``val`` (or a seeded subset of it)."""
    return puvae.DEFENSE.pipeline(module, config(spec, seed), classifier, val.images, seed)


def _pipeline(runner: "Runner", spec: PuVAESpec, module: nn.Module, classifier: str) -> nn.Module:
    cache = runner.__dict__.setdefault("_purifier_pipelines", {})
    key = ("puvae", id(module), classifier, spec.detector, spec.sample, spec.fpr, spec.calibration_n)
    if key not in cache:
        cache[key] = deploy(spec, module, runner.classifier(classifier), runner.val, runner.config.seed)
    return cache[key]


METHOD = Method(name="puvae", spec=PuVAESpec, train=_train, load=_load, pipeline=_pipeline,
                deploy=deploy, config=config)
