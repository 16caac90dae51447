"""MagNet: detectors and a reformer built from autoencoders trained on clean data only.

Meng and Chen (2017), "MagNet: a Two-Pronged Defense against Adversarial Examples".
An autoencoder ``AE`` is trained to reconstruct clean images from noisy copies (Gaussian noise
of standard deviation ``noise``, clipped to [0, 1]). Detectors flag an input whose

* reconstruction error ``mean |x - AE(x)|^p`` (p = 1 or 2), or
* probability divergence ``JSD(softmax(F(x)/T), softmax(F(AE(x))/T))`` (e.g. T = 10, 40)

exceeds a threshold set at a stated false-positive rate on clean validation images; the
*reformer* feeds ``AE(x)`` to the classifier. *Diversity*: ``DiverseAutoencoder`` holds K
autoencoders and sends each example through one drawn at random, the same one for the reformer
and every detector of a query; they are trained jointly with a term that rewards disagreement
(``diversity_loss``). A pipeline built on it is random, so it is attacked with EOT (adaptive,
white-box) or through one fixed member (``gray_box_surrogate``: the paper's gray-box attacker,
who knows the defense but not which autoencoder answers).

``MultiDetector`` combines detectors: it rejects when any of them does, and its differentiable
score ``max_i (s_i(x) - t_i) / |t_i|`` is positive exactly then, so detector-aware attacks
(``detector_pgd``) can push every detector under its threshold at once. Threat model of an attack
on ``Shielded(reformer, F, MultiDetector)``: white-box, the whole pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..distributed import rows_randn
from ..inputs import check_training_config
from ..train.loop import LoopConfig, LoopResult, fit
from .base import AutoencoderPurifier, Detector, Shielded
from .registry import Defense, Trained, pick, seeded_build

logger = logging.getLogger(__name__)


class DiverseAutoencoder(nn.Module):
    """K autoencoders; each example of a batch goes through one member drawn uniformly at random.

    The draw is cached per input tensor (as in ``PuVAE``): the reformer and every detector that
    see the same tensor in one ``Shielded`` call use the same member, and a new tensor gets a
    new draw. ``member=k`` fixes member ``k`` for every example (deterministic mode, for tests,
    debugging and the gray-box surrogate); ``generator`` makes the random draws reproducible.
    """

    def __init__(self, members: Sequence[nn.Module], *, member: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.members = members if isinstance(members, nn.ModuleList) else nn.ModuleList(members)
        if len(self.members) == 0:
            raise ValueError("DiverseAutoencoder needs at least one autoencoder")
        if member is not None and not 0 <= member < len(self.members):
            raise ValueError(f"member must be in [0, {len(self.members)}), got {member}")
        self.member = member
        self.generator = generator
        self._cache: tuple | None = None

    @property
    def stochastic(self) -> bool:
        return self.member is None and len(self.members) > 1

    def draw(self, n: int, device: torch.device | str) -> torch.Tensor:
        """Member index per example: uniform over the K members, or the fixed ``member``."""
        if self.member is not None:
            return torch.full((n,), self.member, dtype=torch.long, device=device)
        if self.generator is not None:
            return torch.randint(len(self.members), (n,), generator=self.generator).to(device)
        return torch.randint(len(self.members), (n,), device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x._version, torch.is_grad_enabled(), self.member)
        cached = self._cache
        if cached is not None and cached[0] is x and cached[1] == key:
            return cached[3]
        index = self.draw(x.shape[0], x.device)
        # A fixed member runs on the whole batch: what reconstruct computes then, without its
        # data-dependent grouping, which torch.export and ONNX cannot trace.
        out = self.members[self.member](x) if self.member is not None else self.reconstruct(x, index)
        self._cache = (x, key, index, out)
        return out

    def last_draw(self, x: torch.Tensor) -> torch.Tensor | None:
        """The member indices drawn for ``x`` by the last call on this very tensor (else None)."""
        cached = self._cache
        return cached[2] if cached is not None and cached[0] is x else None

    def reconstruct(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``AE_index[i](x[i])`` for every example ``i``.

        Examples are grouped by member, so each member runs once on its share of the batch:
        the cost of one autoencoder pass, not K passes over everything and a gather.
        """
        if len(self.members) == 1:
            return self.members[0](x)
        order = torch.argsort(index, stable=True)
        counts = torch.bincount(index, minlength=len(self.members)).tolist()
        parts = [ae(chunk) for ae, chunk in zip(self.members, x[order].split(counts)) if chunk.shape[0]]
        return torch.cat(parts)[torch.argsort(order)]

    def reconstruct_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's reconstruction, ``(K, N, C, H, W)``."""
        return torch.stack([ae(x) for ae in self.members])

    def fixed(self, member: int) -> "DiverseAutoencoder":
        """A deterministic view that always uses ``member`` (shares the weights)."""
        return DiverseAutoencoder(self.members, member=member)


def diversity_loss(reconstructions: torch.Tensor, x: torch.Tensor, eta: float) -> tuple[torch.Tensor, dict]:
    """Meng and Chen's joint loss for K autoencoders, per pixel:
    ``sum_i MSE(r_i, x) - eta * sum_i MSE(r_i, mean_j r_j)`` for ``reconstructions`` ``(K, N, ...)``.

    Since ``sum_i |r_i - x|^2 = sum_i |r_i - r_mean|^2 + K |r_mean - x|^2``, the loss is
    ``(1 - eta) * spread + K * error of the mean``: ``eta`` in [0, 1) lets members disagree
    while each still reconstructs; ``eta = 0`` trains K independent autoencoders.
    """
    if not 0 <= eta < 1:
        raise ValueError(f"eta must be in [0, 1) (at 1 only the members' mean is trained), got {eta}")
    error = (reconstructions - x[None]).pow(2).flatten(2).mean(2).mean(1)           # (K,)
    spread = (reconstructions - reconstructions.mean(0, keepdim=True)).pow(2).flatten(2).mean(2).mean(1)
    loss = error.sum() - eta * spread.sum()
    return loss, {"mse": error.mean().detach(), "spread": spread.mean().detach()}


class _AutoencoderDetector(Detector):
    """A detector that scores through ``self.autoencoder``.

    With a random ``DiverseAutoencoder`` a clean query is scored by a uniformly drawn member,
    independent of the image, so its false-positive rate at threshold ``t`` is the mean over
    members of ``P(s_k(x) > t)``: the exceedance rate of all members' scores pooled. Calibrating
    on one random draw per image instead estimates a 0.1% tail from a fifth as many scores,
    and on MNIST put the held-out rate of JSD T=40 at 3x the calibrated one.
    """

    autoencoder: nn.Module

    def calibration_scores(self, x: torch.Tensor) -> torch.Tensor:
        diverse = self.autoencoder
        if not (isinstance(diverse, DiverseAutoencoder) and diverse.stochastic):
            return self.score(x)
        pooled = []
        try:
            for k in range(len(diverse.members)):
                self.autoencoder = diverse.fixed(k)
                pooled.append(self.score(x))
        finally:
            self.autoencoder = diverse
        return torch.cat(pooled)


class ReconstructionErrorDetector(_AutoencoderDetector):
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


class JSDDetector(_AutoencoderDetector):
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
            # torch.where rather than a Python branch on the threshold: a data-dependent branch
            # does not export (torch.export, ONNX), and the values are the same.
            scale = torch.where(torch.isfinite(t), t.abs().clamp_min(1e-12), torch.ones_like(t))
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
           fpr: float = 0.001, calibration: torch.Tensor | None = None, reformer: bool = True,
           seed: int = 0, thresholds: dict[str, float] | None = None) -> Shielded:
    """The MagNet pipeline: reformer ``AE`` (or none), ``classifier``, detectors calibrated
    at ``fpr`` each on the clean ``calibration`` images, or set to stored ``thresholds`` (by
    detector name, as ``detector_thresholds`` reads them). A ``DiverseAutoencoder`` makes it
    random; each threshold is then calibrated on every member's clean scores pooled, which
    is the rate a query meets whichever member it draws."""
    detector = None
    if detectors:
        detector = MultiDetector(magnet_detectors(autoencoder, classifier, detectors))
        if thresholds is not None:
            missing = [name for name in detectors if name not in thresholds]
            if missing:
                raise ValueError(f"stored MagNet thresholds lack detector(s) {missing}; have {sorted(thresholds)}")
            for name, member in zip(detectors, detector.members):
                member.threshold.fill_(float(thresholds[name]))
        else:
            if calibration is None:
                raise ValueError("MagNet's detectors need clean calibration images")
            torch.manual_seed(seed)  # any randomness left in a detector's scores is reproducible
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
    eta: float = 0.1  # diversity weight; only used with several autoencoders

    def __post_init__(self) -> None:
        check_training_config(self)


def train_magnet_autoencoder(autoencoder: nn.Module, x: torch.Tensor, config: MagNetTrainConfig, *,
                             x_val: torch.Tensor | None = None, checkpoint: str | Path | None = None,
                             progress: bool = True) -> LoopResult:
    """Mean squared error from noisy clean images to the clean images (no classifier involved)."""

    def step(xb: torch.Tensor, _y: torch.Tensor, gen: torch.Generator):
        noise = rows_randn(xb.shape, gen).to(xb.device) * config.noise
        loss = (autoencoder((xb + noise).clamp(0, 1)) - xb).pow(2).mean()
        return loss, {"mse": loss.detach()}

    def validate() -> dict:
        autoencoder.eval()
        with torch.no_grad():
            return {"val_loss": float((autoencoder(x_val) - x_val).pow(2).mean())}

    return _fit_unlabelled("autoencoder", autoencoder, step, validate, x, config,
                           x_val=x_val, checkpoint=checkpoint, progress=progress)


def train_diverse_autoencoders(autoencoders: nn.ModuleList, x: torch.Tensor, config: MagNetTrainConfig, *,
                               x_val: torch.Tensor | None = None, checkpoint: str | Path | None = None,
                               progress: bool = True) -> LoopResult:
    """Train K autoencoders jointly (in place) with ``diversity_loss`` at ``config.eta``.

    Every member sees the same noisy batch (the noise is drawn once per step), so the spread
    term compares their answers to the same input; different initializations (the members
    are built one after another from one seed) make them differ even at ``eta = 0``.
    """

    def step(xb: torch.Tensor, _y: torch.Tensor, gen: torch.Generator):
        noise = rows_randn(xb.shape, gen).to(xb.device) * config.noise
        noisy = (xb + noise).clamp(0, 1)
        return diversity_loss(torch.stack([ae(noisy) for ae in autoencoders]), xb, config.eta)

    def validate() -> dict:
        autoencoders.eval()
        with torch.no_grad():
            loss, metrics = diversity_loss(torch.stack([ae(x_val) for ae in autoencoders]), x_val, config.eta)
        return {"val_loss": float(loss), "val_mse": float(metrics["mse"]), "val_spread": float(metrics["spread"])}

    return _fit_unlabelled("autoencoders", autoencoders, step, validate, x, config,
                           x_val=x_val, checkpoint=checkpoint, progress=progress)


def _fit_unlabelled(name: str, module: nn.Module, step, validate, x: torch.Tensor, config: MagNetTrainConfig, *,
                    x_val: torch.Tensor | None, checkpoint: str | Path | None, progress: bool) -> LoopResult:
    """Adam on ``module`` through ``fit`` with ``config``'s budget; MagNet never needs labels.
    ``name`` keys the module in the checkpoint, so keep it stable for resume."""
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    loop = LoopConfig(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                      val_metric="val_loss")
    result = fit({name: module}, optimizer, step, x, labels, loop,
                 val_fn=validate if x_val is not None else None, checkpoint=checkpoint, progress=progress)
    module.eval()
    return result


# ---- the defense: config, build, train ------------------------------------------------------
@dataclass(frozen=True)
class MagNetConfig:
    """A MagNet defense: ``diversity`` autoencoders of ``architecture`` (a model-zoo name),
    their training, and how they are deployed: the ``detectors`` (``l1``, ``l2``, ``jsd<T>``),
    each calibrated at ``fpr`` on clean images, and whether the reformer is used."""

    architecture: str = "conv-ae-small"
    diversity: int = 1
    training: MagNetTrainConfig = field(default_factory=MagNetTrainConfig)
    detectors: tuple[str, ...] = ("l1", "l2", "jsd10", "jsd40")
    fpr: float = 0.001
    reformer: bool = True


def build(config: MagNetConfig, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """One autoencoder, or an ``nn.ModuleList`` of ``diversity`` of them, for images of
    ``input_shape`` (default: the architecture's dataset's)."""
    from ..models import create_model

    if config.diversity < 1:
        raise ValueError(f"MagNet diversity must be >= 1 autoencoders, got {config.diversity}")
    if config.diversity == 1:
        return create_model(config.architecture, input_shape)
    return nn.ModuleList(create_model(config.architecture, input_shape) for _ in range(config.diversity))


def train(config: MagNetConfig, classifiers: Sequence[nn.Module], data, *, val=None,
          checkpoint: str | Path | None = None, progress: bool = True, device: str = "cpu") -> Trained:
    """Autoencoders trained on clean images only (``classifiers`` are not used: MagNet's
    autoencoders never see the classifier). ``init_seed`` seeds their initial weights."""
    # every member's initialization
    built = seeded_build(build, config, config.training.seed, device, input_shape=data.images.shape[1:])
    autoencoders = built if isinstance(built, nn.ModuleList) else nn.ModuleList([built])
    x_val = None if val is None else val.images
    if config.diversity == 1:
        (autoencoder,) = autoencoders
        result = train_magnet_autoencoder(autoencoder, data.images, config.training, x_val=x_val,
                                          checkpoint=checkpoint, progress=progress)
        return Trained(autoencoder, result.history)
    result = train_diverse_autoencoders(autoencoders, data.images, config.training, x_val=x_val,
                                        checkpoint=checkpoint, progress=progress)
    return Trained(autoencoders, result.history)


def as_autoencoder(module: nn.Module, member: int | None = None) -> nn.Module:
    """The trained module as MagNet's autoencoder: a ``DiverseAutoencoder`` for several."""
    if isinstance(module, nn.ModuleList):
        return DiverseAutoencoder(module, member=member)
    return module


def _deploy(module: nn.Module, config: MagNetConfig, classifier: nn.Module,
            calibration: torch.Tensor | None, seed: int = 0, *,
            thresholds: dict[str, float] | None = None) -> Shielded:
    return magnet(as_autoencoder(module), classifier, detectors=config.detectors, fpr=config.fpr,
                  calibration=calibration, reformer=config.reformer, seed=seed, thresholds=thresholds)


def detector_thresholds(pipeline: Shielded, config: MagNetConfig) -> dict[str, float]:
    """The calibrated threshold of each detector of a deployed MagNet, by its name in
    ``config.detectors`` (what ``magnet(thresholds=...)`` takes back)."""
    if pipeline.detector is None:
        return {}
    return {name: float(member.threshold) for name, member in zip(config.detectors, pipeline.detector.members)}


def _from_sidecar(side: dict) -> MagNetConfig:
    spec = side.get("shield_spec") or {}
    return pick(MagNetConfig, spec, architecture=side["architecture"],
                diversity=side.get("members") or spec.get("diversity") or 1,
                training=pick(MagNetTrainConfig, side.get("config"), spec))


DEFENSE = Defense(
    name="magnet", config=MagNetConfig, train=train, build=build,
    purifier=lambda module, config: AutoencoderPurifier(as_autoencoder(module)),
    deploy=_deploy, from_sidecar=_from_sidecar, thresholds=detector_thresholds,
    reference="Meng and Chen (2017), MagNet: a Two-Pronged Defense against Adversarial Examples")
