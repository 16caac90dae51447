"""AAA as a runner method: train the autoencoder against the frozen classifiers it names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ...defenses import aaa
from ...defenses.base import Shielded
from ...models.io import load_weights, save_weights
from ...models.query import QueryOnly
from ...records import config_dict
from ...train.classifier import accuracy
from ..config import ShieldSpec
from . import Method, from_spec

if TYPE_CHECKING:
    from ..runner import Runner


def config(spec: ShieldSpec, seed: int) -> aaa.AAAShieldConfig:
    """The defense's config; a spec's own ``seed`` (a replicate) overrides the target's."""
    return aaa.AAAShieldConfig(
        architecture=spec.autoencoder,
        training=from_spec(aaa.AAAConfig, spec, seed=seed if spec.seed is None else spec.seed))


def train(runner: "Runner", spec: ShieldSpec, path: Path) -> None:
    classifiers = [QueryOnly(runner.classifier(c), output=spec.query_output, decimals=spec.query_decimals,
                             budget=spec.query_budget) if c in spec.query_only else runner.classifier(c)
                   for c in spec.against]
    cfg = config(spec, runner.config.seed)
    train_set = runner.train_subset(spec.train_limit)
    val = runner.val.subset(spec.val_n, seed=1)
    trained = aaa.train(cfg, classifiers, train_set, val=val, checkpoint=path.with_suffix(".ckpt"),
                        progress=runner.progress, device=runner.device)
    autoencoder = trained.module
    native_clean = {c: accuracy(Shielded(autoencoder, runner.classifier(c)), runner.test.images,
                                runner.test.labels) for c in spec.against}
    save_weights(autoencoder, path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                 kind="shield", method="aaa", trained_against=runner.classifier_specs(spec.against),
                 config=config_dict(cfg.training), clean_accuracy=native_clean, history=trained.history,
                 visits=trained.details["visits"], data_hash=runner.train.sha256,
                 **({"query_only": list(spec.query_only), "queries": trained.details.get("queries", 0),
                     "query_output": trained.details["query_output"]} if spec.query_only else {}))


def load(runner: "Runner", spec: ShieldSpec, path: Path) -> nn.Module:
    model, _ = load_weights(path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                            device=runner.device)
    return model


METHOD = Method(name="aaa", spec=ShieldSpec, train=train, load=load, artifact_kind="shield",
                config=config, plain_pipeline=True, method_in_record_key=False)
