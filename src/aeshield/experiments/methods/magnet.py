"""MagNet as a runner method: autoencoders trained on clean data, deployed with detectors
calibrated on the run's clean validation images; ``wrap: surrogate`` attacks craft on one
fixed member (the gray-box attacker)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ...defenses import magnet
from ...defenses.base import Shielded
from ...models.io import load_weights, save_weights
from . import Method, from_spec

if TYPE_CHECKING:
    from ..runner import Runner


@dataclass(frozen=True)
class MagNetSpec:
    """A MagNet shield in a config; ``fpr`` is per detector, on clean validation images."""

    method: str
    autoencoder: str = "conv-ae-small"
    noise: float = 0.1
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    train_limit: int | None = None
    val_n: int = 1000
    detectors: tuple[str, ...] = ("l1", "l2", "jsd10", "jsd40")
    fpr: float = 0.001
    reformer: bool = True
    # Diversity: K autoencoders, one at random per example. Left out of the artifact hash at
    # their defaults, so single-autoencoder specs (and their shipped weights) keep their hash.
    diversity: int = field(default=1, metadata={"hash_if_default": False})
    eta: float = field(default=0.1, metadata={"hash_if_default": False})
    surrogate_member: int = field(default=0, metadata={"hash_if_default": False})


def config(spec: MagNetSpec, seed: int) -> magnet.MagNetConfig:
    return from_spec(magnet.MagNetConfig, spec, architecture=spec.autoencoder,
                     training=from_spec(magnet.MagNetTrainConfig, spec, seed=seed))


def _train(runner: "Runner", spec: MagNetSpec, path: Path) -> None:
    cfg = config(spec, runner.config.seed)
    train_set = runner.train_subset(spec.train_limit)
    trained = magnet.train(cfg, (), train_set, val=runner.val.subset(spec.val_n, seed=1),
                           checkpoint=path.with_suffix(".ckpt"), progress=runner.progress,
                           device=runner.device)
    save_weights(trained.module, path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                 kind="shield", method="magnet", config=asdict(cfg.training), history=trained.history,
                 train_n=len(train_set), data_hash=runner.train.sha256)


def _load(runner: "Runner", spec: MagNetSpec, path: Path) -> nn.Module:
    model, side = load_weights(path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                               device=runner.device)
    if side.get("members", 1) != spec.diversity:
        raise ValueError(f"{path} holds {side.get('members', 1)} autoencoder(s), the spec asks for "
                         f"diversity {spec.diversity}")
    return model


def deploy(spec: MagNetSpec, module: nn.Module, classifier: nn.Module, val, seed: int) -> Shielded:
    """The configured pipeline, its detectors calibrated on the clean ``val`` images."""
    return magnet.DEFENSE.pipeline(module, config(spec, seed), classifier, val.images, seed)


def _pipeline(runner: "Runner", spec: MagNetSpec, module: nn.Module, classifier: str) -> nn.Module:
    cache = runner.__dict__.setdefault("_purifier_pipelines", {})
    key = ("magnet", id(module), classifier, spec.detectors, spec.fpr, spec.reformer)
    if key not in cache:
        cache[key] = deploy(spec, module, runner.classifier(classifier), runner.val, runner.config.seed)
    return cache[key]


def gray_box_surrogate(runner: "Runner", spec: MagNetSpec, module: nn.Module, classifier: str) -> nn.Module:
    """The gray-box attacker's model (Meng and Chen): the same pipeline with one fixed member,
    ``spec.surrogate_member``, its detectors calibrated on that member alone."""
    if not isinstance(module, nn.ModuleList):
        return _pipeline(runner, spec, module, classifier)
    cache = runner.__dict__.setdefault("_purifier_pipelines", {})
    key = ("magnet-surrogate", id(module), classifier, spec.detectors, spec.fpr, spec.reformer,
           spec.surrogate_member)
    if key not in cache:
        cache[key] = magnet.magnet(magnet.as_autoencoder(module, spec.surrogate_member),
                                   runner.classifier(classifier), detectors=spec.detectors,
                                   fpr=spec.fpr, calibration=runner.val.images,
                                   reformer=spec.reformer, seed=runner.config.seed)
    return cache[key]


# The autoencoder never sees the classifier, so no classifier enters its artifact hash.
METHOD = Method(name="magnet", spec=MagNetSpec, train=_train, load=_load, pipeline=_pipeline,
                depends_on=lambda spec: (), surrogate=gray_box_surrogate, deploy=deploy,
                config=config)
