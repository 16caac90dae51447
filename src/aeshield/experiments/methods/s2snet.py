"""S2SNet as a runner method (``method: s2snet``): stage 1 cached on its own settings, so that
the plain autoencoder (``stage2: none``) and every stage-2 variant share it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ...defenses import s2snet
from ...defenses.base import Shielded
from ...io import file_lock, lock_path
from ...records import config_hash
from ...models.io import load_weights, save_weights
from ...train.classifier import accuracy
from . import Method

if TYPE_CHECKING:
    from ..runner import Runner


@dataclass(frozen=True)
class S2SNetSpec:
    """``stage2: none`` is the plain (stage-1) autoencoder, the S2SNet paper's baseline."""

    method: str
    autoencoder: str = "conv-ae"
    against: tuple[str, ...] = ()
    stage2: str = "ce"  # ce | kl | none
    epochs1: int = 3
    epochs2: int = 2
    batch_size: int = 64
    lr1: float = 1e-3
    lr2: float = 1e-3
    train_limit: int | None = None
    val_n: int = 500


def config(spec: S2SNetSpec, seed: int) -> s2snet.S2SNetConfig:
    return s2snet.S2SNetConfig(
        architecture=spec.autoencoder, loss=spec.stage2,
        stage1=s2snet.StageConfig(spec.epochs1, spec.batch_size, spec.lr1, seed),
        stage2=s2snet.StageConfig(spec.epochs2, spec.batch_size, spec.lr2, seed))


def _stage1(runner: "Runner", spec: S2SNetSpec) -> nn.Module:
    """The unsupervised stage-1 autoencoder, cached by its own settings so that the plain AE
    and every stage-2 variant share one stage 1."""
    settings = {"autoencoder": spec.autoencoder, "epochs": spec.epochs1, "batch_size": spec.batch_size,
                "lr": spec.lr1, "train_limit": spec.train_limit, "val_n": spec.val_n,
                "seed": runner.config.seed}
    key = config_hash({"kind": "s2snet-stage1", "spec": settings, "data": runner.train.sha256})
    path = runner.artifacts / f"s2snet-stage1-{key}.safetensors"
    with file_lock(lock_path(path), f"training {path.name}"):  # another process may be training it
        if path.exists():
            model, _ = load_weights(path, architecture=spec.autoencoder, device=runner.device)
            return model
        start = time.perf_counter()
        trained = s2snet.train(replace(config(spec, runner.config.seed), loss="none"), [],
                               runner.train_subset(spec.train_limit),
                               val=runner.val.subset(spec.val_n, seed=1),
                               checkpoint=path.with_suffix(".ckpt"), progress=runner.progress,
                               device=runner.device)
        save_weights(trained.module, path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                     kind="autoencoder", method="s2snet-stage1", config=settings, history=trained.history,
                     data_hash=runner.train.sha256)
        path.with_suffix(".ckpt").unlink(missing_ok=True)
    runner.timings["train s2snet stage 1"] = time.perf_counter() - start
    return trained.module


def train_s2snet(runner: "Runner", spec: S2SNetSpec, path: Path) -> None:
    cfg = config(spec, runner.config.seed)  # checks stage2 before anything is trained
    model = _stage1(runner, spec)
    classifiers = [] if spec.stage2 == "none" else [runner.classifier(c) for c in spec.against]
    trained = s2snet.train(cfg, classifiers, runner.train_subset(spec.train_limit),
                           val=runner.val.subset(spec.val_n, seed=1), checkpoint=path.with_suffix(".ckpt"),
                           progress=runner.progress, device=runner.device, autoencoder=model)
    clean = {c: accuracy(Shielded(model, runner.classifier(c)), runner.test.images, runner.test.labels)
             for c in spec.against}
    save_weights(model, path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                 kind="shield", method="s2snet", shield_spec=asdict(spec), clean_accuracy=clean,
                 trained_against=runner.classifier_specs(spec.against) if spec.stage2 != "none" else {},
                 history=trained.history, data_hash=runner.train.sha256)


def load_s2snet(runner: "Runner", spec: S2SNetSpec, path: Path) -> nn.Module:
    model, _ = load_weights(path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                            device=runner.device)
    return s2snet.DEFENSE.purifier(model, config(spec, runner.config.seed)).eval()


def _s2snet_depends(spec: S2SNetSpec) -> tuple[str, ...]:
    return tuple(spec.against) if spec.stage2 != "none" else ()


METHOD = Method(name="s2snet", spec=S2SNetSpec, train=train_s2snet, load=load_s2snet,
                depends_on=_s2snet_depends, config=config)
S2SNET = METHOD
