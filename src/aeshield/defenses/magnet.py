"""MagNet: detectors and a reformer built from autoencoders trained on clean data only.

Meng and Chen (2017), "MagNet: a Two-Pronged Defense against Adversarial Examples".
An autoencoder ``AE`` is trained to reconstruct clean images from noisy copies (Gaussian noise
of standard deviation ``noise``, clipped to [0, 1]). Detectors flag an input whose

* reconstruction error ``mean |x - AE(x)|^p`` (p = 1 or 2), or
* probability divergence ``JSD(softmax(F(x)/T), softmax(F(AE(x))/T))`` (e.g. T = 10, 40)

exceeds a threshold set at a stated false-positive rate on clean validation images; the
*reformer* feeds ``AE(x)`` to the classifier. *Diversity* (one of several autoencoders at random
per query) is not implemented here.

``MultiDetector`` combines detectors: it rejects when any of them does, and its differentiable
score ``max_i (s_i(x) - t_i) / |t_i|`` is positive exactly then, so detector-aware attacks
(``detector_pgd``) can push every detector under its threshold at once. Threat model of an attack
on ``Shielded(reformer, F, MultiDetector)``: white-box, the whole pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..train.loop import LoopConfig, LoopResult, fit
from .base import AutoencoderPurifier, Detector, Shielded

if TYPE_CHECKING:
    from ..experiments.runner import Runner

logger = logging.getLogger(__name__)


class ReconstructionErrorDetector(Detector):
    """Score ``mean |x - AE(x)|^p`` per image (MagNet detectors I and II)."""

    def __init__(self, autoencoder: nn.Module, p: int = 2) -> None:
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p}")
        self.autoencoder = autoencoder
        self.p = p
        self.name = f"L{p} reconstruction error"

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.autoencoder(x)).abs().pow(self.p).flatten(1).mean(1)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row JSD between probability vectors (natural log)."""
    m = 0.5 * (p + q)
    kl = lambda a, b: (a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum(1)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


class JSDDetector(Detector):
    """Score ``JSD(softmax(F(x)/T), softmax(F(AE(x))/T))`` (MagNet's probability divergence)."""

    def __init__(self, autoencoder: nn.Module, classifier: nn.Module, temperature: float = 10.0) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.classifier = classifier
        self.temperature = temperature
        self.name = f"JSD T={temperature:g}"

    def score(self, x: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        p = torch.softmax(self.classifier(x) / t, dim=1)
        q = torch.softmax(self.classifier(self.autoencoder(x)) / t, dim=1)
        return jensen_shannon(p, q)


class MultiDetector(Detector):
    """Rejects if any member rejects; score ``max_i (s_i - t_i) / |t_i|`` with threshold 0."""

    def __init__(self, detectors: Sequence[Detector]) -> None:
        super().__init__()
        if not detectors:
            raise ValueError("MultiDetector needs at least one detector")
        self.members = nn.ModuleList(detectors)
        self.threshold.fill_(0.0)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for d in self.members:
            t = d.threshold
            scale = t.abs().clamp_min(1e-12) if torch.isfinite(t) else torch.ones_like(t)
            parts.append((d.score(x) - t) / scale)
        return torch.stack(parts, 1).amax(1)

    @torch.no_grad()
    def calibrate(self, clean: torch.Tensor, false_positive_rate: float, batch_size: int = 500) -> float:
        """Calibrate every member at ``false_positive_rate`` (MagNet's per-detector rate)."""
        for d in self.members:
            d.calibrate(clean, false_positive_rate, batch_size)
        self.threshold.fill_(0.0)
        return 0.0


def magnet_detectors(autoencoder: nn.Module, classifier: nn.Module, names: Sequence[str]) -> list[Detector]:
    """Detectors by name: ``l1``, ``l2``, ``jsd<T>`` (e.g. ``jsd10``, ``jsd40``)."""
    out: list[Detector] = []
    for name in names:
        if name in ("l1", "l2"):
            out.append(ReconstructionErrorDetector(autoencoder, int(name[1])))
        elif name.startswith("jsd"):
            out.append(JSDDetector(autoencoder, classifier, float(name[3:])))
        else:
            raise ValueError(f"unknown MagNet detector {name!r}; use l1, l2 or jsd<T> (e.g. jsd10)")
    return out


def magnet(autoencoder: nn.Module, classifier: nn.Module, *, detectors: Sequence[str] = ("l1", "l2", "jsd10", "jsd40"),
           fpr: float = 0.001, calibration: torch.Tensor | None = None, reformer: bool = True) -> Shielded:
    """The MagNet pipeline: reformer ``AE`` (or none), ``classifier``, detectors calibrated
    at ``fpr`` each on the clean ``calibration`` images."""
    detector = None
    if detectors:
        if calibration is None:
            raise ValueError("MagNet's detectors need clean calibration images")
        detector = MultiDetector(magnet_detectors(autoencoder, classifier, detectors))
        detector.calibrate(calibration, fpr)
    purifier = AutoencoderPurifier(autoencoder) if reformer else None
    return Shielded(purifier, classifier, detector).eval()


# ---- training ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MagNetTrainConfig:
    noise: float = 0.1
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0


def train_magnet_autoencoder(autoencoder: nn.Module, x: torch.Tensor, config: MagNetTrainConfig, *,
                             x_val: torch.Tensor | None = None, checkpoint: str | Path | None = None,
                             progress: bool = True) -> LoopResult:
    """Mean squared error from noisy clean images to the clean images (no classifier involved)."""
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=config.lr)

    def step(xb: torch.Tensor, _y: torch.Tensor, gen: torch.Generator):
        noise = torch.randn(xb.shape, generator=gen).to(xb.device) * config.noise
        loss = (autoencoder((xb + noise).clamp(0, 1)) - xb).pow(2).mean()
        return loss, {"mse": loss.detach()}

    def validate() -> dict:
        autoencoder.eval()
        with torch.no_grad():
            return {"val_loss": float((autoencoder(x_val) - x_val).pow(2).mean())}

    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    loop = LoopConfig(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                      val_metric="val_loss")
    result = fit({"autoencoder": autoencoder}, optimizer, step, x, labels, loop,
                 val_fn=validate if x_val is not None else None, checkpoint=checkpoint, progress=progress)
    autoencoder.eval()
    return result


# ---- runner method ---------------------------------------------------------------------------
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


def _train(runner: "Runner", spec: MagNetSpec, path: Path) -> None:
    from ..models import create_model
    from ..models.io import save_weights

    autoencoder = create_model(spec.autoencoder).to(runner.device)
    train_set = runner.train_subset(spec.train_limit)
    cfg = MagNetTrainConfig(noise=spec.noise, epochs=spec.epochs, batch_size=spec.batch_size,
                            lr=spec.lr, seed=runner.config.seed)
    result = train_magnet_autoencoder(autoencoder, train_set.images, cfg,
                                      x_val=runner.val.subset(spec.val_n, seed=1).images,
                                      checkpoint=path.with_suffix(".ckpt"), progress=runner.progress)
    save_weights(autoencoder, path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                 kind="shield", method="magnet", config=asdict(cfg), history=result.history,
                 train_n=len(train_set), data_hash=runner.train.sha256)


def _load(runner: "Runner", spec: MagNetSpec, path: Path) -> nn.Module:
    from ..models.io import load_weights

    model, _ = load_weights(path, architecture=spec.autoencoder, dataset=runner.config.dataset,
                            device=runner.device)
    return model


def _pipeline(runner: "Runner", spec: MagNetSpec, module: nn.Module, classifier: str) -> nn.Module:
    cache = runner.__dict__.setdefault("_purifier_pipelines", {})
    key = ("magnet", id(module), classifier, spec.detectors, spec.fpr, spec.reformer)
    if key not in cache:
        cache[key] = magnet(module, runner.classifier(classifier), detectors=spec.detectors,
                            fpr=spec.fpr, calibration=runner.val.images, reformer=spec.reformer)
    return cache[key]


def _method():
    from ..experiments.methods import Method

    # The autoencoder never sees the classifier, so no classifier enters its artifact hash.
    return Method(name="magnet", spec=MagNetSpec, train=_train, load=_load, pipeline=_pipeline,
                  depends_on=lambda spec: ())


def __getattr__(name: str):
    if name == "METHOD":
        return _method()
    raise AttributeError(name)
