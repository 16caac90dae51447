"""Purifiers, detectors and the shielded pipeline.

A *purifier* maps images to images of the same shape and range. A *detector* scores how
suspicious an input is and rejects it above a calibrated threshold. ``Shielded`` chains them in
front of a classifier and is itself an ``nn.Module`` from images to logits, so every attack
attacks the whole pipeline without knowing it is there.
"""

from __future__ import annotations

import torch
from torch import nn

from ..inputs import InputError, checked_logits, validate_images
from ..models.predict import REJECT, predict

__all__ = ["REJECT", "AutoencoderPurifier", "Detector", "InputError", "Purifier", "Shielded", "predict",
           "validate_images"]


class Purifier(nn.Module):
    """Base class of shields: images in, images of the same shape and range out.

    ``stochastic`` tells evaluations to use EOT. ``bpda_forward`` is the differentiable
    stand-in a BPDA attack should use for the backward pass (identity by default).
    """

    stochastic: bool = False

    def bpda_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class AutoencoderPurifier(Purifier):
    """Wrap any autoencoder ``nn.Module`` as a purifier."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.autoencoder, "stochastic", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder(x)

    # encode/decode exist only when the wrapped autoencoder has them (a MagNet ensemble of
    # random members has no single latent space): ``hasattr(purifier, "encode")`` is how the
    # harness and the audit decide whether a latent-space attack applies.
    @property
    def encode(self):
        return self._part("encode")

    @property
    def decode(self):
        return self._part("decode")

    def _part(self, name: str):
        part = getattr(self.autoencoder, name, None)
        if not callable(part):
            raise AttributeError(f"{type(self.autoencoder).__name__} has no {name}()")
        return part


class Detector(nn.Module):
    """Scores inputs (higher is more suspicious) and rejects those above ``threshold``.

    ``forward`` returns the differentiable score, so detector-aware attacks can target it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float("inf")))

    def score(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x)

    def rejects(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x) > self.threshold

    def calibration_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Clean scores whose upper quantile is the threshold; a random detector may return
        several scores per image (one per outcome of its randomness) to calibrate on."""
        return self.score(x)

    @torch.no_grad()
    def calibrate(self, clean: torch.Tensor, false_positive_rate: float, batch_size: int = 500) -> float:
        """Set the threshold so that ``false_positive_rate`` of ``clean`` inputs are rejected."""
        if not 0 <= false_positive_rate < 1:
            raise ValueError(f"false_positive_rate must be in [0, 1), got {false_positive_rate}")
        scores = torch.cat([self.calibration_scores(b) for b in clean.split(batch_size)])
        threshold = torch.quantile(scores.float(), 1 - false_positive_rate)
        self.threshold.fill_(threshold.item())
        return float(threshold)


class Shielded(nn.Module):
    """``classifier(purifier(x))``, with an optional detector that answers ``REJECT`` (-1).

    ``forward`` returns logits (what attacks differentiate); ``predict`` returns labels.
    """

    def __init__(self, purifier: nn.Module | None, classifier: nn.Module,
                 detector: Detector | None = None) -> None:
        super().__init__()
        for name, part, kind in (("purifier", purifier, nn.Module), ("classifier", classifier, nn.Module),
                                 ("detector", detector, Detector)):
            if (part is not None or name == "classifier") and not isinstance(part, kind):
                raise TypeError(f"Shielded: {name} must be {'a Detector' if kind is Detector else 'an nn.Module'}"
                                f"{' or None' if name != 'classifier' else ''}, got {type(part).__name__}")
        self.purifier = purifier if purifier is not None else nn.Identity()
        self.classifier = classifier
        self.detector = detector
        # Built from parts loaded for use (all in eval mode), the pipeline is in eval mode too, so
        # a library that restores the mode it found (torchattacks) cannot switch BatchNorm layers
        # to training; a trainer (AAA trains G inside a Shielded) passes a part in training mode.
        parts = [m for m in (purifier, classifier, detector) if m is not None]
        self.training = any(m.training for m in parts)

    @property
    def in_shape(self) -> tuple[int, ...] | None:
        """(C, H, W) the pipeline takes: the classifier's, else the shield's (from its card)."""
        return getattr(self.classifier, "in_shape", None) or getattr(self.purifier, "in_shape", None)

    @property
    def stochastic(self) -> bool:
        return bool(getattr(self.purifier, "stochastic", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purifier(x))

    def to_onnx(self, path, input_shape: tuple[int, ...] | None = None):
        """Write this pipeline, detector included, as one ONNX file (``defenses.export``:
        outputs ``logits``, ``labels``, ``reject_margin``); ``input_shape`` ``(C, H, W)``
        defaults to the classifier's ``in_shape``. Returns the path."""
        from .export import export_onnx

        return export_onnx(self, path, input_shape=input_shape or self.in_shape)

    def to_pt2(self, path, input_shape: tuple[int, ...] | None = None):
        """As ``to_onnx``, as a ``torch.export`` program (``.pt2``)."""
        from .export import export_pt2

        return export_pt2(self, path, input_shape=input_shape or self.in_shape)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Labels for a batch of images in [0, 1]; ``REJECT`` where the detector fires."""
        validate_images(x, self.in_shape)
        out = []
        for batch in x.split(batch_size):
            labels = checked_logits(self, batch).argmax(1)
            if self.detector is not None:
                labels = labels.masked_fill(self.detector.rejects(batch), REJECT)
            out.append(labels)
        return torch.cat(out)
