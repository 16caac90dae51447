"""S2SNet: structure-to-signal autoencoders (Folz, Palacio, Hees and Dengel 2020).

Stage 1 trains an autoencoder ``S`` unsupervised (reconstruction loss only), so its code
carries the *structure* of the input. Stage 2 freezes the encoder and fine-tunes only the
decoder with gradients from the frozen classifier ``F`` to be protected, so that ``F(S(x))``
keeps ``F``'s *signal*:

- ``loss="ce"``: the classifier's cross-entropy on the reconstruction, ``CE(F(S(x)), y)``;
- ``loss="kl"``: ``KL(F(x) || F(S(x)))`` to the classifier's own output on the clean input,
  which needs no labels.

Gradients of ``F(S(.))`` w.r.t. the input then pass through an encoder trained only to
reconstruct, and carry structure rather than class information. Optional input-noise layers
(:class:`InputNoise`) go in front of ``S``. Threat models of the paper: white-box (attack
``F(S(.))``), white-box* (craft on ``F`` alone, evaluate ``F(S(.))``: BPDA with the identity)
and gray-box (craft on ``F(S(.))``, evaluate ``F`` alone).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..train.loop import LoopConfig, LoopResult, fit
from .base import Purifier
from .registry import Defense, Trained, pick, seeded_build

logger = logging.getLogger(__name__)

NOISE_KINDS = ("none", "gaussian", "uniform", "sign")
STAGE2_LOSSES = ("ce", "kl")


class InputNoise(nn.Module):
    """Additive input noise of scale ``s``, clipped back to [0, 1].

    ``gaussian``: ``N(0, s^2)``; ``uniform``: ``U(-s, s)``; ``sign``: ``s * sign(N(0, 1))``.
    The noise is drawn fresh on every call, in eval mode too: it is part of the defense, so an
    evaluation of a pipeline containing it must use EOT (``stochastic`` says so).
    """

    def __init__(self, kind: str = "gaussian", s: float = 0.1) -> None:
        super().__init__()
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {kind!r}; use one of {NOISE_KINDS}")
        if s < 0:
            raise ValueError(f"noise scale s must be >= 0, got {s}")
        self.kind, self.s = kind, float(s)

    @property
    def stochastic(self) -> bool:
        return self.kind != "none" and self.s > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.stochastic:
            return x
        if self.kind == "gaussian":
            noise = torch.randn_like(x) * self.s
        elif self.kind == "uniform":
            noise = (torch.rand_like(x) * 2 - 1) * self.s
        else:
            noise = torch.randn_like(x).sign() * self.s
        return (x + noise).clamp(0, 1)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, s={self.s}"


class S2SNet(Purifier):
    """``S(noise(x))``: an autoencoder with ``encode``/``decode``, optionally behind input noise."""

    def __init__(self, autoencoder: nn.Module, noise: InputNoise | None = None) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.noise = noise if noise is not None else InputNoise("none", 0.0)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.noise.stochastic

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(self.noise(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


@dataclass(frozen=True)
class StageConfig:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


def _val_mse(autoencoder: nn.Module, x_val: torch.Tensor | None):
    if x_val is None:
        return None

    @torch.no_grad()
    def validate() -> dict:
        autoencoder.eval()
        err = torch.cat([(autoencoder(b) - b).pow(2).flatten(1).sum(1) for b in x_val.split(500)])
        return {"val_loss": float(err.mean())}
    return validate


def train_stage1(autoencoder: nn.Module, x: torch.Tensor, config: StageConfig, *,
                 x_val: torch.Tensor | None = None, checkpoint: str | Path | None = None,
                 progress: bool = True) -> LoopResult:
    """Unsupervised stage: per-image sum of squared reconstruction errors, batch mean."""
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=config.lr)

    def step(xb: torch.Tensor, _yb: torch.Tensor, _gen: torch.Generator):
        loss = (autoencoder(xb) - xb).pow(2).flatten(1).sum(1).mean()
        return loss, {"mse": loss.detach()}

    loop = LoopConfig(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed)
    dummy = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return fit({"autoencoder": autoencoder}, optimizer, step, x, dummy, loop,
               val_fn=_val_mse(autoencoder, x_val), checkpoint=checkpoint, progress=progress)


def stage2_loss(loss: str, classifier: nn.Module, reconstruction: torch.Tensor, x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
    logits = classifier(reconstruction)
    if loss == "ce":
        return F.cross_entropy(logits, y)
    if loss == "kl":
        with torch.no_grad():
            target = F.log_softmax(classifier(x), dim=1)
        return F.kl_div(F.log_softmax(logits, dim=1), target, log_target=True, reduction="batchmean")
    raise ValueError(f"unknown stage-2 loss {loss!r}; use one of {STAGE2_LOSSES}")


def train_stage2(autoencoder: nn.Module, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 config: StageConfig, *, loss: str = "ce", x_val: torch.Tensor | None = None,
                 y_val: torch.Tensor | None = None, checkpoint: str | Path | None = None,
                 progress: bool = True) -> LoopResult:
    """Signal stage: only ``autoencoder.decoder`` learns, from the frozen classifier's loss.

    The encoder is frozen *and* kept in eval mode, so that not even its BatchNorm running
    statistics move: after this stage its state dict is bit-identical to stage 1's.
    """
    if loss not in STAGE2_LOSSES:
        raise ValueError(f"unknown stage-2 loss {loss!r}; use one of {STAGE2_LOSSES}")
    encoder, decoder = getattr(autoencoder, "encoder", None), getattr(autoencoder, "decoder", None)
    if encoder is None or decoder is None:
        raise TypeError("S2SNet stage 2 needs an autoencoder with .encoder and .decoder submodules")
    for p in encoder.parameters():
        p.requires_grad_(False)
    for p in classifier.parameters():
        p.requires_grad_(False)
    encoder.eval()
    classifier.eval()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.lr)

    def step(xb: torch.Tensor, yb: torch.Tensor, _gen: torch.Generator):
        encoder.eval()
        # encode() rather than the encoder itself: it pads images of sizes the strides do not divide
        value = stage2_loss(loss, classifier, autoencoder.decode(autoencoder.encode(xb)), xb, yb)
        return value, {loss: value.detach()}

    validate = None
    if x_val is not None and y_val is not None:
        @torch.no_grad()
        def _validate() -> dict:
            autoencoder.eval()
            values = [float(stage2_loss(loss, classifier, autoencoder(xb), xb, yb)) * len(xb)
                      for xb, yb in zip(x_val.split(500), y_val.split(500))]
            return {"val_loss": sum(values) / len(x_val)}
        validate = _validate

    loop = LoopConfig(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed)
    try:
        return fit({"autoencoder": autoencoder}, optimizer, step, x, y, loop, val_fn=validate,
                   checkpoint=checkpoint, progress=progress, trainable={"decoder": decoder})
    finally:
        for p in encoder.parameters():
            p.requires_grad_(True)


# ---- the defense: config, build, train ------------------------------------------------------
@dataclass(frozen=True)
class S2SNetConfig:
    """An S2SNet: the autoencoder (a model-zoo name), its two training stages (``loss``:
    ``ce`` or ``kl`` for stage 2, ``none`` for the plain stage-1 autoencoder) and the input
    noise it is deployed behind (``noise``: one of ``NOISE_KINDS``, scale ``noise_scale``)."""

    architecture: str = "conv-ae"
    loss: str = "ce"
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=lambda: StageConfig(epochs=2))
    noise: str = "none"
    noise_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in (*STAGE2_LOSSES, "none"):
            raise ValueError(f"s2snet stage2 must be ce, kl or none, got {self.loss!r}")


def build(config: S2SNetConfig, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """The autoencoder, for images of ``input_shape`` (default: the architecture's dataset's)."""
    from ..models import create_model

    return create_model(config.architecture, input_shape)


def train(config: S2SNetConfig, classifiers: list[nn.Module], data, *, val=None,
          checkpoint: str | Path | None = None, progress: bool = True, device: str = "cpu",
          autoencoder: nn.Module | None = None) -> Trained:
    """Stage 1 on ``data``'s images (skipped when a trained stage-1 ``autoencoder`` is given,
    which is then trained on in place), then, unless ``config.loss == "none"``, stage 2
    against the one classifier."""
    x_val = None if val is None else val.images
    history: list[dict] = []
    if autoencoder is None:
        autoencoder = seeded_build(build, config, config.stage1.seed, device, input_shape=data.images.shape[1:])
        stage1_checkpoint = checkpoint
        if checkpoint is not None and config.loss != "none":
            # Both stages in one call: stage 1 keeps its own checkpoint, else stage 2 would find
            # stage 1's finished one under the same name and stop at once.
            stage1_checkpoint = Path(checkpoint).with_suffix(".stage1.ckpt")
        history = train_stage1(autoencoder, data.images, config.stage1, x_val=x_val,
                               checkpoint=stage1_checkpoint, progress=progress).history
    if config.loss != "none":
        if len(classifiers) != 1:
            raise ValueError(f"s2snet stage 2 is trained against exactly one classifier; got {len(classifiers)}")
        history = train_stage2(autoencoder, classifiers[0], data.images, data.labels, config.stage2,
                               loss=config.loss, x_val=x_val, y_val=None if val is None else val.labels,
                               checkpoint=checkpoint, progress=progress).history
    return Trained(autoencoder, history)


def _from_sidecar(side: dict) -> S2SNetConfig:
    spec = side.get("shield_spec") or {}
    stage = {"batch_size": spec.get("batch_size")}
    return S2SNetConfig(
        architecture=side["architecture"], loss=spec.get("stage2", "ce"),
        stage1=pick(StageConfig, stage, epochs=spec.get("epochs1"), lr=spec.get("lr1")),
        stage2=pick(StageConfig, stage, epochs=spec.get("epochs2"), lr=spec.get("lr2")))


DEFENSE = Defense(
    name="s2snet", config=S2SNetConfig, train=train, build=build,
    purifier=lambda module, config: S2SNet(module, InputNoise(config.noise, config.noise_scale)),
    from_sidecar=_from_sidecar,
    reference="Folz, Palacio, Hees and Dengel (2020), Adversarial Defense based on "
              "Structure-to-Signal Autoencoders")
