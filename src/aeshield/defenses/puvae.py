"""PuVAE: purification by a class-conditional VAE, with an optional RMSE detector.

Hwang, Jeong, Lee, Yoon and Lee (2019), "PuVAE: A Variational Autoencoder to Purify
Adversarial Examples"; the detector follows Wester and Thisted (2020). A conditional VAE
``q(z|x,y)``, ``p(x|z,y)`` is trained on clean data in front of a frozen classifier ``F`` with

    L = recon(x, x_hat) + kl_weight * KL(q(z|x,y) || N(0, I)) + ce_weight * CE(F(x_hat), y)

At inference the input is reconstructed once per class; the reconstruction with the smallest
RMSE to the input goes to the classifier. The detector rejects an input whose smallest RMSE
exceeds a threshold set at a stated false-positive rate on clean validation images.

Attacking it. ``PuVAE.forward`` gathers the selected reconstruction, so autograd follows the
chosen class's encoder and decoder and treats the arg-min as a fixed choice at each step
(which is BPDA for the selection: the arg-min itself has no gradient). ``sample=True`` draws
``z`` from ``q``; evaluate it with EOT. ``sample=False`` decodes the mean (deterministic mode).
Threat model of an attack on ``Shielded(PuVAE, F, RMSEDetector)``: white-box, the whole
pipeline, L-inf.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..inputs import check_training_config
from ..train.loop import LoopConfig, LoopResult, fit
from .aaa import frozen
from .adversarial_training import ramp
from .base import Detector, Purifier, Shielded
from .registry import Defense, Trained, pick, seeded_build

logger = logging.getLogger(__name__)


class PuVAE(Purifier):
    """Purifier: the class-conditional reconstruction with the smallest RMSE to the input.

    The last purification is cached per input tensor, so that ``Shielded.predict`` and an
    attack's objective take the label and the detector's score from the *same* draw of ``z``
    (a stochastic PuVAE would otherwise classify one sample and reject on another).
    """

    def __init__(self, vae: nn.Module, sample: bool = False) -> None:
        super().__init__()
        self.vae = vae
        self.sample = sample
        self._cache: tuple | None = None

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.sample

    def purify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(selected reconstruction, its RMSE, chosen class)`` for a batch ``x``."""
        key = (x, x._version, torch.is_grad_enabled(), self.sample)
        cached = self._cache
        if cached is not None and cached[0][0] is x and cached[0][1:] == key[1:]:
            return cached[1]
        recons = self.vae.reconstruct_all(x, sample=self.sample)               # (N, K, C, H, W)
        rmse = ((recons - x[:, None]).pow(2).flatten(2).mean(2) + 1e-12).sqrt()  # (N, K)
        best, index = rmse.min(1)
        selected = recons[torch.arange(x.shape[0], device=x.device), index]
        out = (selected, best, index)
        self._cache = (key, out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.purify(x)[0]

    def min_rmse(self, x: torch.Tensor) -> torch.Tensor:
        return self.purify(x)[1]

    def reconstructions(self, x: torch.Tensor) -> torch.Tensor:
        """All N class-conditional reconstructions, ``(N, K, C, H, W)``."""
        return self.vae.reconstruct_all(x, sample=self.sample)


class RMSEDetector(Detector):
    """Rejects inputs whose best class-conditional reconstruction is farther than ``threshold``
    (RMSE) from the input (Wester and Thisted 2020). The score is differentiable."""

    def __init__(self, puvae: PuVAE) -> None:
        super().__init__()
        self.puvae = puvae

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.puvae.min_rmse(x)


# ---- training ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PuVAETrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    kl_weight: float = 1.0
    ce_weight: float = 10.0
    seed: int = 0
    checkpoint_every: int = 100
    # KL weight grown linearly from 0 over this many updates (Bowman et al. 2016): on CIFAR-10
    # the full KL weight from the first step collapsed the posterior (KL -> 0.01 nats, every
    # reconstruction a class prototype whatever the input).
    kl_warmup_steps: int = 0

    def __post_init__(self) -> None:
        check_training_config(self)


def puvae_loss(vae: nn.Module, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
               kl_weight: float, ce_weight: float) -> tuple[torch.Tensor, dict]:
    """Per-image summed BCE reconstruction + weighted KL + weighted CE, averaged over the batch."""
    recon, mu, logvar = vae(x, y, sample=True)
    rec = F.binary_cross_entropy(recon, x, reduction="none").flatten(1).sum(1).mean()
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
    logits = classifier(recon)
    ce = F.cross_entropy(logits, y)
    total = rec + kl_weight * kl + ce_weight * ce
    return total, {"recon": rec.detach(), "kl": kl.detach(), "ce": ce.detach(),
                   "acc": (logits.argmax(1) == y).float().mean()}


def train_puvae(vae: nn.Module, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
                config: PuVAETrainConfig, *, x_val: torch.Tensor | None = None,
                y_val: torch.Tensor | None = None, checkpoint: str | Path | None = None,
                progress: bool = True) -> LoopResult:
    """Train ``vae`` (in place) on clean data against the frozen ``classifier``."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr)

    def step(xb: torch.Tensor, yb: torch.Tensor, _gen: torch.Generator):
        kl_weight = config.kl_weight * ramp(optimizer, config.kl_warmup_steps)
        return puvae_loss(vae, classifier, xb, yb, kl_weight, config.ce_weight)

    def validate() -> dict:
        vae.eval()
        torch.manual_seed(config.seed)  # the validation loss samples z; keep it comparable
        with torch.no_grad():
            loss, metrics = puvae_loss(vae, classifier, x_val, y_val, config.kl_weight,
                                       config.ce_weight)
            purified = Shielded(PuVAE(vae), classifier).predict(x_val)
        return {"val_loss": float(loss), "val_recon": float(metrics["recon"]),
                "val_acc_puvae": float((purified == y_val).float().mean())}

    loop = LoopConfig(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                      checkpoint_every=config.checkpoint_every, val_metric="val_loss")
    with frozen(classifier):
        result = fit({"vae": vae}, optimizer, step, x, y, loop,
                     val_fn=validate if x_val is not None else None, checkpoint=checkpoint,
                     progress=progress)
    vae.eval()
    return result


def build_pipeline(vae: nn.Module, classifier: nn.Module, *, detector: bool, sample: bool,
                   fpr: float, calibration: torch.Tensor | None, seed: int = 0,
                   thresholds: dict[str, float] | None = None) -> Shielded:
    """``Shielded(PuVAE, classifier[, RMSEDetector calibrated to fpr on calibration])``; the
    detector's threshold is ``thresholds["rmse"]`` instead when stored thresholds are given."""
    puvae = PuVAE(vae, sample=sample)
    model = Shielded(puvae, classifier)
    if detector:
        model.detector = RMSEDetector(puvae)
        if thresholds is not None:
            if "rmse" not in thresholds:
                raise ValueError(f"stored PuVAE thresholds lack 'rmse'; have {sorted(thresholds)}")
            model.detector.threshold.fill_(float(thresholds["rmse"]))
        else:
            if calibration is None:
                raise ValueError("a PuVAE detector needs clean calibration images")
            torch.manual_seed(seed)  # the sampled mode's scores are random: fix the draw
            model.detector.calibrate(calibration, fpr)
    return model.eval()


# ---- the defense: config, build, train ------------------------------------------------------
@dataclass(frozen=True)
class PuVAEConfig:
    """A PuVAE defense: the conditional VAE (a model-zoo name), its training, and how it is
    deployed: sampled or mean decoding, and the RMSE detector calibrated at ``fpr``."""

    architecture: str = "cvae-mnist"
    training: PuVAETrainConfig = field(default_factory=PuVAETrainConfig)
    detector: bool = True
    fpr: float = 0.001
    sample: bool = False
    # Clean images the detector's threshold is calibrated on: the first n of the calibration
    # set's seeded permutation (seed 2), or all of it (None).
    calibration_n: int | None = None


def build(config: PuVAEConfig, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """The conditional VAE; its architectures take their dataset's image shape only."""
    from ..models import create_model

    return create_model(config.architecture, input_shape)


def train(config: PuVAEConfig, classifiers: list[nn.Module], data, *, val=None,
          checkpoint: str | Path | None = None, progress: bool = True, device: str = "cpu") -> Trained:
    """A new VAE trained by ``train_puvae`` in front of the one frozen classifier."""
    if len(classifiers) != 1:
        raise ValueError(f"PuVAE trains against exactly one classifier, got {len(classifiers)}")
    vae = seeded_build(build, config, config.training.seed, device, input_shape=data.images.shape[1:])
    result = train_puvae(vae, classifiers[0], data.images, data.labels, config.training,
                         x_val=None if val is None else val.images,
                         y_val=None if val is None else val.labels, checkpoint=checkpoint,
                         progress=progress)
    return Trained(vae, result.history)


def _deploy(module: nn.Module, config: PuVAEConfig, classifier: nn.Module,
            calibration: torch.Tensor | None, seed: int = 0, *,
            thresholds: dict[str, float] | None = None) -> Shielded:
    if calibration is not None and config.calibration_n:
        from ..data import stable_permutation

        keep = stable_permutation(len(calibration), 2)[: config.calibration_n]
        calibration = calibration[torch.from_numpy(keep).to(calibration.device)]
    return build_pipeline(module, classifier, detector=config.detector, sample=config.sample,
                          fpr=config.fpr, calibration=calibration, seed=seed, thresholds=thresholds)


def detector_thresholds(pipeline: Shielded, config: PuVAEConfig) -> dict[str, float]:
    """``{"rmse": threshold}`` of a deployed PuVAE with its detector (``{}`` without one)."""
    return {} if pipeline.detector is None else {"rmse": float(pipeline.detector.threshold)}


def _from_sidecar(side: dict) -> PuVAEConfig:
    spec = side.get("shield_spec") or {}
    return pick(PuVAEConfig, spec, architecture=side["architecture"],
                training=pick(PuVAETrainConfig, side.get("config"), spec))


DEFENSE = Defense(
    name="puvae", config=PuVAEConfig, train=train, build=build,
    purifier=lambda module, config: PuVAE(module, sample=config.sample), deploy=_deploy,
    from_sidecar=_from_sidecar, thresholds=detector_thresholds,
    reference="Hwang, Jeong, Lee, Yoon and Lee (2019), PuVAE: A Variational Autoencoder to "
              "Purify Adversarial Examples")
