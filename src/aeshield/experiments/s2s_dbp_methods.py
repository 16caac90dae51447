"""S2SNet and DBP autoencoders as runner methods (``method: s2snet`` / ``method: dbp``)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..defenses.base import AutoencoderPurifier, Shielded
from ..defenses.dbp import DRAW, VAE, DBPConfig, reconstruction_error, train_vae
from ..defenses.s2snet import S2SNet, StageConfig, train_stage1, train_stage2
from ..records import config_hash
from ..models import create_model
from ..models.io import load_weights, save_weights
from ..train.classifier import accuracy
from .methods import Method

if TYPE_CHECKING:
    from .runner import Runner


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


def _stage1(runner: "Runner", spec: S2SNetSpec) -> nn.Module:
    """The unsupervised stage-1 autoencoder, cached by its own settings so that the plain AE
    and every stage-2 variant share one stage 1."""
    settings = {"autoencoder": spec.autoencoder, "epochs": spec.epochs1, "batch_size": spec.batch_size,
                "lr": spec.lr1, "train_limit": spec.train_limit, "val_n": spec.val_n,
                "seed": runner.config.seed}
    key = config_hash({"kind": "s2snet-stage1", "spec": settings, "data": runner.train.sha256})
    path = runner.artifacts / f"s2snet-stage1-{key}.safetensors"
    if path.exists():
        model, _ = load_weights(path, architecture=spec.autoencoder, device=runner.device)
        return model
    start = time.perf_counter()
    torch.manual_seed(runner.config.seed)  # the initial weights, not the process's RNG state
    model = create_model(spec.autoencoder).to(runner.device)
    train = runner.train_subset(spec.train_limit)
    val = runner.val.subset(spec.val_n, seed=1)
    result = train_stage1(model, train.images.to(runner.device),
                          StageConfig(spec.epochs1, spec.batch_size, spec.lr1, runner.config.seed),
                          x_val=val.images.to(runner.device), checkpoint=path.with_suffix(".ckpt"),
                          progress=runner.progress)
    save_weights(model, path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                 kind="autoencoder", method="s2snet-stage1", config=settings, history=result.history,
                 data_hash=runner.train.sha256)
    path.with_suffix(".ckpt").unlink(missing_ok=True)
    runner.timings["train s2snet stage 1"] = time.perf_counter() - start
    return model


def train_s2snet(runner: "Runner", spec: S2SNetSpec, path: Path) -> None:
    if spec.stage2 not in ("ce", "kl", "none"):
        raise ValueError(f"s2snet stage2 must be ce, kl or none, got {spec.stage2!r}")
    model = _stage1(runner, spec)
    history: list = []
    if spec.stage2 != "none":
        if len(spec.against) != 1:
            raise ValueError(f"s2snet stage 2 is trained against exactly one classifier; got {spec.against}")
        classifier = runner.classifier(spec.against[0])
        train = runner.train_subset(spec.train_limit)
        val = runner.val.subset(spec.val_n, seed=1)
        result = train_stage2(model, classifier, train.images.to(runner.device),
                              train.labels.to(runner.device),
                              StageConfig(spec.epochs2, spec.batch_size, spec.lr2, runner.config.seed),
                              loss=spec.stage2, x_val=val.images.to(runner.device),
                              y_val=val.labels.to(runner.device), checkpoint=path.with_suffix(".ckpt"),
                              progress=runner.progress)
        history = result.history
    clean = {c: accuracy(Shielded(model, runner.classifier(c)), runner.test.images, runner.test.labels)
             for c in spec.against}
    save_weights(model, path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                 kind="shield", method="s2snet", shield_spec=asdict(spec), clean_accuracy=clean,
                 trained_against=runner.classifier_specs(spec.against) if spec.stage2 != "none" else {},
                 history=history, data_hash=runner.train.sha256)


def load_s2snet(runner: "Runner", spec: S2SNetSpec, path: Path) -> nn.Module:
    model, _ = load_weights(path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                            device=runner.device)
    return S2SNet(model).eval()


def _s2snet_depends(spec: S2SNetSpec) -> tuple[str, ...]:
    return tuple(spec.against) if spec.stage2 != "none" else ()


S2SNET = Method(name="s2snet", spec=S2SNetSpec, train=train_s2snet, load=load_s2snet,
                depends_on=_s2snet_depends)


ARCHITECTURES = ("vae", "draw", "draw-attn")


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


def _vae(spec: DBPSpec) -> nn.Module:
    if spec.architecture == "vae":
        return VAE(latent=spec.latent, hidden=spec.hidden)
    if spec.architecture in ("draw", "draw-attn"):
        return DRAW(glimpses=spec.glimpses, hidden=spec.hidden, latent=spec.latent,
                    attention=spec.architecture == "draw-attn", read_n=spec.read_n, write_n=spec.write_n)
    raise ValueError(f"dbp architecture must be one of {ARCHITECTURES}, got {spec.architecture!r}")


def train_dbp(runner: "Runner", spec: DBPSpec, path: Path) -> None:
    torch.manual_seed(runner.config.seed)
    vae = _vae(spec).to(runner.device)  # weights from the seeded global generator
    train = runner.train_subset(spec.train_limit)
    val = runner.val.subset(spec.val_n, seed=1)
    cfg = DBPConfig(lambda2=spec.lambda2, penalty=spec.penalty, projections=spec.projections,
                    beta=spec.beta, epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr,
                    seed=runner.config.seed)
    result = train_vae(vae, train.images.to(runner.device), cfg, x_val=val.images.to(runner.device),
                       checkpoint=path.with_suffix(".ckpt"), progress=runner.progress)
    with torch.no_grad():
        error = torch.cat([reconstruction_error(vae(b), b) for b in runner.test.images.split(1000)])
    save_weights(vae, path, architecture=spec.architecture, dataset=runner.config.dataset, kind="autoencoder",
                 method="dbp", shield_spec=asdict(spec), config=asdict(cfg), history=result.history,
                 test_reconstruction_error=float(error.mean()), data_hash=runner.train.sha256)


def load_dbp(runner: "Runner", spec: DBPSpec, path: Path) -> nn.Module:
    model, _ = load_weights(path, architecture=spec.architecture, dataset=runner.config.dataset,
                            model=_vae(spec), device=runner.device)
    return model


def _dbp_pipeline(runner: "Runner", spec: DBPSpec, module: nn.Module, classifier: str) -> nn.Module:
    return Shielded(AutoencoderPurifier(module), runner.classifier(classifier))


DBP = Method(name="dbp", spec=DBPSpec, train=train_dbp, load=load_dbp, pipeline=_dbp_pipeline,
             depends_on=lambda spec: ())
