"""AAA as a runner method: train the autoencoder against the frozen classifiers it names."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..defenses.aaa import AAAConfig, train_aaa
from ..defenses.base import Shielded
from ..models import create_model
from ..models.io import load_weights, save_weights
from ..train.classifier import accuracy
from .config import ShieldSpec
from .methods import Method

if TYPE_CHECKING:
    from .runner import Runner


def train(runner: "Runner", spec: ShieldSpec, path: Path) -> None:
    classifiers = [runner.classifier(c) for c in spec.against]
    seed = runner.config.seed if spec.seed is None else spec.seed
    # The initial weights come from the seed too (a replicate's own seed, else the config's),
    # never from whatever the process's RNG held: that depended on the cells a worker had run
    # before, so the same target trained different shields from run to run.
    torch.manual_seed(seed)
    autoencoder = create_model(spec.autoencoder).to(runner.device)
    train_set = runner.train_subset(spec.train_limit)
    val = runner.val.subset(spec.val_n, seed=1)
    cfg = AAAConfig(loss=spec.loss, lam=spec.lam, eps=spec.eps, step_size=spec.step_size,
                    attack_steps=spec.attack_steps, epochs=spec.epochs, batch_size=spec.batch_size,
                    lr=spec.lr, seed=seed, warmup_steps=spec.warmup_steps,
                    cosine_lr=spec.cosine_lr)
    result = train_aaa(autoencoder, classifiers, train_set.images, train_set.labels, cfg,
                       x_val=val.images, y_val=val.labels, checkpoint=path.with_suffix(".ckpt"),
                       progress=runner.progress)
    native_clean = {c: accuracy(Shielded(autoencoder, runner.classifier(c)), runner.test.images,
                                runner.test.labels) for c in spec.against}
    save_weights(autoencoder, path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                 kind="shield", method="aaa", trained_against=runner.classifier_specs(spec.against),
                 config=asdict(cfg), clean_accuracy=native_clean, history=result.history,
                 visits=result.visits, data_hash=runner.train.sha256)


def load(runner: "Runner", spec: ShieldSpec, path: Path) -> nn.Module:
    model, _ = load_weights(path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                            device=runner.device)
    return model


METHOD = Method(name="aaa", spec=ShieldSpec, train=train, load=load, artifact_kind="shield")
