"""``load_dataset``: verified datasets as float tensors in [0, 1], with a seeded validation split.

Splits: ``"test"`` is the official test set. ``"val"`` is a seeded random subset of the
official training set (``val_size`` images) and ``"train"`` is the rest of it, so the two are
disjoint and the same ``val_seed`` always gives the same split (the permutation is
:func:`~aeshield.data.cifar.stable_permutation`, independent of numpy/torch RNG versions).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from .cifar import CIFAR10_CLASSES, load_cifar10_arrays, stable_permutation
from .fetch import DataError, FetchResult, canonical_name, fetch_info
from .idx import read_idx

logger = logging.getLogger(__name__)

__all__ = ["DATASETS", "SPLITS", "DatasetInfo", "LabeledImages", "load_dataset"]

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    Attributes:
        name: canonical name.
        classes: class names, index = label.
        shape: image shape ``(C, H, W)``.
        mean, std: per-channel statistics of the training images in [0, 1], for a
            normalization layer inside the model.
        train_size, test_size: sizes of the official splits.
    """

    name: str
    classes: tuple[str, ...]
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    test_size: int

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "mnist": DatasetInfo(
            name="mnist",
            classes=tuple(str(i) for i in range(10)),
            shape=(1, 28, 28),
            mean=(0.1307,),
            std=(0.3081,),
            train_size=60000,
            test_size=10000,
        ),
        "fashion-mnist": DatasetInfo(
            name="fashion-mnist",
            classes=(
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),
            shape=(1, 28, 28),
            mean=(0.2860,),
            std=(0.3530,),
            train_size=60000,
            test_size=10000,
        ),
        "cifar10": DatasetInfo(
            name="cifar10",
            classes=CIFAR10_CLASSES,
            shape=(3, 32, 32),
            # canonical CIFAR-10 training-set statistics (population std, not the
            # often-copied 0.2023/0.1994/0.2010)
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            train_size=50000,
            test_size=10000,
        ),
    }
)
"""Dataset name -> :class:`DatasetInfo`."""


@dataclass(frozen=True, eq=False)
class LabeledImages:
    """A labelled image set: float32 NCHW images in [0, 1] and int64 labels.

    Attributes:
        images: ``(N, C, H, W)`` float32 in [0, 1].
        labels: ``(N,)`` int64.
        name: dataset name.
        split: ``"train"``, ``"val"`` or ``"test"``.
        source: human label to stamp on results, e.g. ``"canonical"`` or
            ``"CIFAR-10 (JPEG q75 stand-in)"``.
        sha256: data hash (hex sha256 over the verified source files).
        indices: ``(N,)`` int64 positions in the official split (train or test) in dataset
            order, or None when unknown.
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    split: str
    source: str
    sha256: str
    indices: torch.Tensor | None = field(default=None)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be NCHW, got shape {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"labels shape {tuple(self.labels.shape)} does not match "
                f"{self.images.shape[0]} images"
            )
        if self.indices is not None and self.indices.shape != self.labels.shape:
            raise ValueError("indices must have one entry per image")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (
            f"LabeledImages(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={tuple(self.images.shape[1:])}, source={self.source!r}, "
            f"sha256={self.sha256[:12]}...)"
        )

    @property
    def info(self) -> DatasetInfo:
        """The :class:`DatasetInfo` of this dataset."""
        return DATASETS[canonical_name(self.name)]

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, index = label."""
        return self.info.classes

    def _take(self, idx: torch.Tensor) -> LabeledImages:
        return LabeledImages(
            images=self.images[idx],
            labels=self.labels[idx],
            name=self.name,
            split=self.split,
            source=self.source,
            sha256=self.sha256,
            indices=None if self.indices is None else self.indices[idx],
        )

    def subset(self, n: int, seed: int = 0) -> LabeledImages:
        """The first ``n`` examples of a seeded permutation (deterministic; all if ``n >= len``)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        perm = stable_permutation(len(self), seed)[: min(n, len(self))]
        return self._take(torch.from_numpy(perm).to(self.labels.device))

    def to(self, device: torch.device | str) -> LabeledImages:
        """A copy with the tensors on ``device``."""
        return LabeledImages(
            images=self.images.to(device),
            labels=self.labels.to(device),
            name=self.name,
            split=self.split,
            source=self.source,
            sha256=self.sha256,
            indices=self.indices,
        )

    def describe(self) -> dict[str, Any]:
        """Provenance for a results record: name, split, source, sha256, n."""
        return {
            "name": self.name,
            "split": self.split,
            "source": self.source,
            "sha256": self.sha256,
            "n": len(self),
        }


def _idx_arrays(res: FetchResult, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(res.path / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(res.path / f"{prefix}-labels-idx1-ubyte")
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{res.path}: {prefix} images {images.shape} and labels {labels.shape} disagree"
        )
    return images[:, None, :, :], labels.astype(np.int64)


def split_indices(n_train: int, split: str, val_size: int, val_seed: int) -> np.ndarray:
    """Sorted positions in the official training set of the ``"train"`` or ``"val"`` split."""
    if not 0 <= val_size < n_train:
        raise ValueError(f"val_size must be in [0, {n_train}), got {val_size}")
    perm = stable_permutation(n_train, val_seed)
    chosen = perm[:val_size] if split == "val" else perm[val_size:]
    return np.sort(chosen)


def load_dataset(
    name: str,
    split: str = "train",
    root: str | Path | None = None,
    val_size: int = 5000,
    val_seed: int = 0,
    limit: int | None = None,
) -> LabeledImages:
    """Load a verified dataset split as float32 NCHW images in [0, 1].

    Fetches the data first if needed (see :func:`aeshield.data.fetch`).

    Args:
        name: ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"`` (aliases accepted).
        split: ``"train"`` (official train minus the validation images), ``"val"`` (a seeded
            subset of official train, ``val_size`` images) or ``"test"`` (official test).
        root: cache root override (see :func:`aeshield.data.cache_dir`).
        val_size: number of training images held out for ``"val"``; 0 keeps train whole.
        val_seed: seed of the validation split; the same seed gives the same split.
        limit: keep only the first ``limit`` examples in dataset order. For image-folder
            CIFAR-10 sources the dataset order is a fixed shuffle, so this mixes classes;
            use :meth:`LabeledImages.subset` for a seeded random subset.

    Returns:
        :class:`LabeledImages` with ``source`` and ``sha256`` to stamp on results.

    Example:
        >>> test = load_dataset("mnist", "test", limit=1000)  # doctest: +SKIP
        >>> test.images.shape, test.source
        (torch.Size([1000, 1, 28, 28]), 'canonical')
    """
    t0 = time.perf_counter()
    key = canonical_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    res = fetch_info(key, root)
    base = "test" if split == "test" else "train"
    if key == "cifar10":
        images_u8, labels = load_cifar10_arrays(res, base, root)
    else:
        images_u8, labels = _idx_arrays(res, base)

    info = DATASETS[key]
    if tuple(images_u8.shape[1:]) != info.shape:
        raise DataError(f"{res.path}: images have shape {images_u8.shape[1:]}, expected {info.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(f"{res.path}: labels outside 0..{info.num_classes - 1}")

    if split == "test":
        idx = np.arange(len(labels), dtype=np.int64)
    else:
        idx = split_indices(len(labels), split, val_size, val_seed)
    if limit is not None:
        idx = idx[:limit]

    if len(idx) == len(labels):
        sel_images, sel_labels = images_u8, labels
    else:
        sel_images, sel_labels = images_u8[idx], labels[idx]
    images = torch.from_numpy(np.ascontiguousarray(sel_images)).to(torch.float32).div_(255.0)
    out = LabeledImages(
        images=images,
        labels=torch.from_numpy(np.ascontiguousarray(sel_labels, dtype=np.int64)),
        name=key,
        split=split,
        source=res.source,
        sha256=res.sha256,
        indices=torch.from_numpy(idx),
    )
    logger.debug("loaded %r in %.2f s", out, time.perf_counter() - t0)
    return out
