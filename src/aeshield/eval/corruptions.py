"""Common-corruption robustness (Hendrycks and Dietterich, ICLR 2019).

Corrupted test sets are made with the corruption functions of ``imagecorruptions-imaug`` (the
maintained fork of ``imagecorruptions``; it imports as ``imagecorruptions``): its 15 common
corruptions at severities 1-5 (the "mean over 75") and its 4 extra (validation) ones. Applied
to MNIST or Fashion-MNIST this is "MNIST with imagecorruptions corruptions", not the official
MNIST-C.

* The library refuses images under 32 px, so smaller images are zero-padded (centred) to 32
  and cropped back afterwards; grey images are corrupted as three equal channels and turned
  back into one with the ITU-R 601 luma weights (PIL's "L"), since some corruptions (frost,
  saturate, spatter) add colour.
* Every image gets its own seed (``seed``, corruption, severity, position), so a corrupted
  image does not depend on batch composition and a rerun gives the same pixels. The library
  draws from NumPy's global generator; its state is restored afterwards.
* Generation runs once: corrupted sets are cached on disk as uint8 ``.npy`` files keyed by a
  hash of the quantized input pixels and every setting, so a changed input regenerates and an
  unchanged one is read back.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.cifar import save_npy_atomic
from ..errors import require
from ..models.predict import predict
from ..records import Accuracy

logger = logging.getLogger(__name__)

COMMON_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = COMMON_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_SIZE = 32  # the library refuses smaller images
# Bump when the way pixels are produced changes, so old cache entries are not reused.
CACHE_FORMAT = 1
_LUMA = np.array([0.299, 0.587, 0.114])


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imagecorruptions-imaug")
    except PackageNotFoundError:
        return "unknown"


def library():
    """The ``imagecorruptions`` module (installed by ``imagecorruptions-imaug``, the
    ``corruptions`` extra); ``MissingExtraError`` naming the pip command if it is missing."""
    return require("imagecorruptions", extra="corruptions", feature="corruption robustness")


def check_corruption(name: str, severity: int) -> None:
    if name not in ALL_CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(ALL_CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """NCHW floats in [0, 1] -> NHWC uint8 (rounded), the library's pixel format."""
    if images.ndim != 4:
        raise ValueError(f"images must be NCHW, got shape {tuple(images.shape)}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError("images must lie in [0, 1]")
    return (images.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """NHWC uint8 -> NCHW float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def pad_to_min(images: np.ndarray, size: int = MIN_SIZE) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Zero-pad NHWC images, centred, to at least ``size`` x ``size``.

    Returns the padded images and the box ``(top, left, height, width)`` to crop back.
    """
    _, h, w, _ = images.shape
    ph, pw = max(0, size - h), max(0, size - w)
    top, left = ph // 2, pw // 2
    padded = np.pad(images, ((0, 0), (top, ph - top), (left, pw - left), (0, 0)))
    return padded, (top, left, h, w)


def crop_back(images: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    top, left, h, w = box
    return images[:, top:top + h, left:left + w]


def _image_seed(seed: int, name: str, severity: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{severity}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def corrupt_array(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt NHWC uint8 images (1 or 3 channels, any size); returns the same shape and dtype."""
    check_corruption(name, severity)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected NHWC uint8 images with 1 or 3 channels, got "
                         f"{images.dtype} {images.shape}")
    ic = library()
    padded, box = pad_to_min(images)
    out = np.empty_like(padded)
    grey = images.shape[-1] == 1
    state = np.random.get_state()
    try:
        # The library works one image at a time (PIL, scipy, numba), so this loop is its API.
        for i, image in enumerate(padded):
            s = _image_seed(seed, name, severity, i)
            np.random.seed(s)
            # impulse_noise and glass_blur draw from their own generators unless given a seed.
            kwargs = {"seed": s} if name in ("impulse_noise", "glass_blur") else {}
            result = ic.corrupt(image[..., 0] if grey else image, severity=severity,
                                corruption_name=name, **kwargs)
            if grey:
                result = np.clip(np.rint(result.astype(np.float64) @ _LUMA), 0, 255)[..., None]
            out[i] = result
    finally:
        np.random.set_state(state)
    return np.ascontiguousarray(crop_back(out, box))


def content_key(images: np.ndarray, name: str, severity: int, seed: int) -> str:
    """Hash of the input pixels and every setting that shapes the output."""
    h = hashlib.sha256()
    h.update(f"{CACHE_FORMAT}|{library_version()}|{name}|{severity}|{seed}|{images.shape}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


@dataclass
class CorruptionCache:
    """Corrupted image sets on disk, generated once per (pixels, corruption, severity, seed).

    ``generated`` and ``reused`` count what the calls did (tests and logs read them).
    """

    root: Path
    generated: int = 0
    reused: int = 0
    seconds_generating: float = 0.0

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @classmethod
    def default(cls) -> "CorruptionCache":
        from ..data import cache_dir

        return cls(cache_dir() / "corruptions")

    def path(self, key: str, name: str, severity: int) -> Path:
        return self.root / f"{name}-s{severity}-{key[:24]}.npy"

    def corrupted_uint8(self, images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
        check_corruption(name, severity)
        key = content_key(images, name, severity, seed)
        path = self.path(key, name, severity)
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
                if cached.shape == images.shape and cached.dtype == np.uint8:
                    self.reused += 1
                    return cached
                logger.warning("corruption cache %s has the wrong shape; regenerating", path)
            except (OSError, ValueError) as e:
                logger.warning("unreadable corruption cache %s (%s); regenerating", path, e)
        start = time.perf_counter()
        result = corrupt_array(images, name, severity, seed)
        self.seconds_generating += time.perf_counter() - start
        self.generated += 1
        try:
            save_npy_atomic(path, result)
        except OSError as e:
            logger.warning("could not write corruption cache %s: %s", path, e)
        return result

    def corrupted(self, images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
        """``images`` (NCHW in [0, 1]) under ``name`` at ``severity``, same shape, on their device."""
        out = self.corrupted_uint8(to_uint8(images), name, severity, seed)
        return from_uint8(out).to(images.device)


@dataclass(frozen=True)
class CorruptionResult:
    """Accuracy of one model per (corruption, severity), and its means."""

    clean: Accuracy
    cells: dict[tuple[str, int], Accuracy]

    def mean(self, corruptions: Sequence[str]) -> Accuracy | None:
        """Pooled accuracy over every severity of ``corruptions`` (None if none was measured).

        Every cell has the same n, so this is the plain mean of the cell accuracies; its
        Wilson interval treats the predictions as independent, which they are not (the same
        images recur in every cell), so it is narrower than an honest one.
        """
        chosen = [a for (c, _), a in self.cells.items() if c in corruptions]
        if not chosen:
            return None
        return Accuracy(sum(a.correct for a in chosen), sum(a.n for a in chosen))

    def per_corruption(self) -> dict[str, Accuracy]:
        names = dict.fromkeys(c for c, _ in self.cells)
        return {c: self.mean([c]) for c in names}

    def to_dict(self) -> dict:
        common = self.mean(COMMON_CORRUPTIONS)
        extra = self.mean(EXTRA_CORRUPTIONS)
        measured_common = sorted({c for c, _ in self.cells if c in COMMON_CORRUPTIONS})
        return {
            "clean": self.clean.to_dict(),
            "cells": [{"corruption": c, "severity": s, **a.to_dict()}
                      for (c, s), a in self.cells.items()],
            "mean_common": common.to_dict() if common else None,
            "mean_common_cells": sum(1 for c, _ in self.cells if c in COMMON_CORRUPTIONS),
            "mean_common_is_full_75": len(measured_common) == len(COMMON_CORRUPTIONS)
            and all((c, s) in self.cells for c in COMMON_CORRUPTIONS for s in SEVERITIES),
            "mean_extra": extra.to_dict() if extra else None,
            "mean_extra_cells": sum(1 for c, _ in self.cells if c in EXTRA_CORRUPTIONS),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CorruptionResult":
        cells = {(c["corruption"], int(c["severity"])): Accuracy(c["correct"], c["n"])
                 for c in d["cells"]}
        return cls(Accuracy(d["clean"]["correct"], d["clean"]["n"]), cells)


def corruption_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                        corruptions: Sequence[str] = ALL_CORRUPTIONS,
                        severities: Sequence[int] = SEVERITIES, seed: int = 0,
                        cache: CorruptionCache | None = None,
                        batch_size: int = 500) -> CorruptionResult:
    """Accuracy of ``model`` on ``images`` under each corruption and severity.

    A pipeline's reject counts as an error, as in :func:`aeshield.train.classifier.accuracy`.
    """
    cache = cache or CorruptionCache.default()
    model.eval()
    labels = labels.to(images.device)
    clean = Accuracy.from_flags(predict(model, images, batch_size) == labels)
    cells: dict[tuple[str, int], Accuracy] = {}
    for name in corruptions:
        for severity in severities:
            x = cache.corrupted(images, name, severity, seed)
            cells[(name, int(severity))] = Accuracy.from_flags(predict(model, x, batch_size) == labels)
    return CorruptionResult(clean, cells)
