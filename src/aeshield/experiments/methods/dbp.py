"""DBP (and plain VAE / DRAW) autoencoders as a runner method (``method: dbp``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...defenses import dbp
from ...defenses.base import AutoencoderPurifier, Shielded
from ...models.io import load_weights, save_weights
from . import Method, from_spec

if TYPE_CHECKING:
    from ..runner import Runner

ARCHITECTURES = dbp.ARCHITECTURES


@dataclass(frozen=True)
class DBPSpec:
    """A VAE or DRAW; ``lambda2 > 0`` adds the DBP penalty (``penalty``: recon-grad | jacobian).

    ``architecture``: ``vae`` (fully connected; ``hidden`` units, ``latent`` codes), ``draw`` or
    ``draw-attn`` (``glimpses`` steps, LSTMs of ``hidden`` units, ``latent`` codes per step,
    ``read_n`` / ``write_n`` attention grids for ``draw-attn``).
    """

    method: str
    # DRAW's settings stay out of the spec hash at their defaults, so VAE artifacts keep theirs.
    architecture: str = field(default="vae", metadata={"hash_if_default": False})
    latent: int = 16
    hidden: int = 512
    glimpses: int = field(default=64, metadata={"hash_if_default": False})
    read_n: int = field(default=2, metadata={"hash_if_default": False})
    write_n: int = field(default=5, metadata={"hash_if_default": False})
    lambda2: float = 0.0
    penalty: str = "recon-grad"
    projections: int = 1
    beta: float = 1.0
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    train_limit: int | None = None
    val_n: int = 500


def config(spec: DBPSpec, seed: int) -> dbp.DBPShieldConfig:
    return from_spec(dbp.DBPShieldConfig, spec, training=from_spec(dbp.DBPConfig, spec, seed=seed))


def train_dbp(runner: "Runner", spec: DBPSpec, path: Path) -> None:
    cfg = config(spec, runner.config.seed)
    trained = dbp.train(cfg, [], runner.train_subset(spec.train_limit),
                        val=runner.val.subset(spec.val_n, seed=1), checkpoint=path.with_suffix(".ckpt"),
                        progress=runner.progress, device=runner.device)
    vae = trained.module
    with torch.no_grad():
        error = torch.cat([dbp.reconstruction_error(vae(b), b) for b in runner.test.images.split(1000)])
    save_weights(vae, path, architecture=spec.architecture, dataset=runner.config.dataset, kind="autoencoder",
                 method="dbp", shield_spec=asdict(spec), config=asdict(cfg.training), history=trained.history,
                 test_reconstruction_error=float(error.mean()), data_hash=runner.train.sha256)


def load_dbp(runner: "Runner", spec: DBPSpec, path: Path) -> nn.Module:
    model, _ = load_weights(path, architecture=spec.architecture, dataset=runner.config.dataset,
                            model=dbp.build(config(spec, runner.config.seed)), device=runner.device)
    return model


def _dbp_pipeline(runner: "Runner", spec: DBPSpec, module: nn.Module, classifier: str) -> nn.Module:
    return Shielded(AutoencoderPurifier(module), runner.classifier(classifier))


METHOD = Method(name="dbp", spec=DBPSpec, train=train_dbp, load=load_dbp, pipeline=_dbp_pipeline,
                depends_on=lambda spec: (), config=config)
DBP = METHOD
