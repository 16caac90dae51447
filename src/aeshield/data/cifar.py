"""CIFAR-10 readers: the canonical python-pickle batches, or an image-folder tree.

* Python batches (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``; Krizhevsky 2009):
  read with a restricted unpickler that admits only the numpy array machinery, so a tampered
  file cannot run code. Dataset order is the canonical order.
* Image-folder tree (``train/<class>/*.png|jpg``, ``test/<class>/*``): class indices follow
  the canonical class order :data:`CIFAR10_CLASSES`, never folder discovery order; an unknown
  folder is an error. Folders group images by class, so the dataset order of a tree is a
  fixed seeded shuffle (seed :data:`IMAGE_FOLDER_ORDER_SEED`) of the sorted file list: taking
  the first ``n`` then gives a mix of classes. Decoding 60k JPEGs takes a while, so the decoded
  uint8 arrays are cached as ``.npy`` files keyed by the source hash.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io import write_atomic
from .fetch import (
    CIFAR10_PICKLE_DIR,
    DataError,
    FetchResult,
    dataset_dir,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGE_FOLDER_ORDER_SEED",
    "load_cifar10_arrays",
    "read_image_folder",
    "read_pickle_batches",
    "stable_permutation",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""Canonical CIFAR-10 class order (label index = position)."""

IMAGE_FOLDER_ORDER_SEED = 0
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCHES = ("test_batch",)

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def stable_permutation(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` that is identical on every platform and version.

    Sorts a splitmix64 hash of ``index + offset(seed)`` (a bijection, so no ties); it does not
    depend on numpy's or torch's random generators, whose streams may change between releases.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    offset = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))[0]
    keys = _splitmix64(np.arange(n, dtype=np.uint64) + offset)
    return np.argsort(keys, kind="stable").astype(np.int64)


# --- python batches -----------------------------------------------------------------------


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: only numpy array reconstruction is allowed."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = _RestrictedUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable CIFAR-10 python batch ({e})") from e
    if not isinstance(entry, dict):
        raise DataError(f"{path}: expected a dict, got {type(entry).__name__}")
    norm = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data = np.asarray(norm.get("data"))
    labels = norm.get("labels", norm.get("fine_labels"))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels is None:
        raise DataError(f"{path}: unexpected batch contents (data shape {data.shape})")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32), np.asarray(
        labels, dtype=np.int64
    )


def read_pickle_batches(batch_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the canonical python batches of ``split`` ("train" or "test").

    Returns ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``, canonical order.
    Verification against the published md5 values is done by :func:`aeshield.data.fetch`.
    """
    d = Path(batch_dir)
    if (d / CIFAR10_PICKLE_DIR).is_dir():
        d = d / CIFAR10_PICKLE_DIR
    names = _TRAIN_BATCHES if split == "train" else _TEST_BATCHES
    parts = [_load_batch(d / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    _check_labels(labels, d)
    return images, labels


# --- image folders ------------------------------------------------------------------------


def _check_labels(labels: np.ndarray, where: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise DataError(f"{where}: labels outside 0..{len(CIFAR10_CLASSES) - 1}")


def read_image_folder(
    root: str | Path,
    split: str,
    classes: Sequence[str] = CIFAR10_CLASSES,
    size: tuple[int, int] = (32, 32),
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``root/<split>/<class>/*.{png,jpg,jpeg}`` into uint8 NCHW RGB and int64 labels.

    Label = position of the folder name in ``classes`` (canonical order). Files are returned
    sorted by (class index, file name). Hidden files and non-image files are skipped.

    Raises:
        DataError: missing split folder, a folder not in ``classes``, an image that is not
            ``size`` (width, height), or an undecodable image.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(f"image folder {split_dir} does not exist")
    index = {c: i for i, c in enumerate(classes)}
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise DataError(
            f"{split_dir}: unknown class folder(s) {', '.join(unknown)}; "
            f"expected only: {' '.join(classes)}"
        )
    absent = [c for c in classes if not (split_dir / c).is_dir()]
    if absent:
        logger.warning("%s: no folder for class(es) %s", split_dir, ", ".join(absent))
    files: list[tuple[int, Path]] = []
    for folder in sorted(folders, key=lambda p: index[p.name]):
        for p in sorted(folder.iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((index[folder.name], p))
    if not files:
        raise DataError(f"{split_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    w, h = size
    images = np.empty((len(files), h, w, 3), dtype=np.uint8)
    labels = np.fromiter((lab for lab, _ in files), dtype=np.int64, count=len(files))
    if len(files) > 5000:
        logger.info("decoding %d images from %s (once; cached afterwards)", len(files), split_dir)
    for i, (_, p) in enumerate(files):
        try:
            with Image.open(p) as im:
                if im.size != (w, h):
                    raise DataError(f"{p}: image is {im.size[0]}x{im.size[1]}, expected {w}x{h}")
                images[i] = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise DataError(f"{p}: cannot decode image ({e})") from e
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels


def _tensor_cache_paths(res: FetchResult, split: str, root: str | Path | None) -> tuple[Path, Path]:
    d = dataset_dir("cifar10", root) / ".tensors"
    stem = f"cifar10-{res.sha256[:16]}-{split}"
    return d / f"{stem}-images.npy", d / f"{stem}-labels.npy"


def save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` as .npy via a unique temporary file, so a crash never leaves half a file."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: given a path, np.save would append ".npy"
            np.save(handle, arr, allow_pickle=False)

    write_atomic(path, write)


def _load_tensor_cache(img_path: Path, lab_path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if not (img_path.is_file() and lab_path.is_file()):
        return None
    try:
        images = np.load(img_path, allow_pickle=False)
        labels = np.load(lab_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable tensor cache %s (%s); rebuilding", img_path, e)
        return None
    ok = (
        images.dtype == np.uint8
        and images.ndim == 4
        and images.shape[1:] == (3, 32, 32)
        and labels.dtype == np.int64
        and labels.shape == (images.shape[0],)
    )
    if not ok:
        logger.warning("ignoring malformed tensor cache %s; rebuilding", img_path)
        return None
    return images, labels


def load_cifar10_arrays(
    res: FetchResult, split: str, root: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``(N, 3, 32, 32)`` images and int64 labels of ``split`` in dataset order.

    ``res`` comes from :func:`aeshield.data.fetch.fetch_info`. Image-folder sources go through
    the ``.npy`` tensor cache in ``<cache>/data/cifar10/.tensors/`` keyed by the source hash.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if res.layout == "cifar-pickle":
        return read_pickle_batches(res.path, split)
    if res.layout != "image-folder":
        raise DataError(f"unexpected CIFAR-10 layout {res.layout!r}")
    img_path, lab_path = _tensor_cache_paths(res, split, root)
    cached = _load_tensor_cache(img_path, lab_path)
    if cached is not None:
        logger.debug("cifar10 %s: tensor cache %s", split, img_path)
        return cached
    images, labels = read_image_folder(res.path, split)
    order = stable_permutation(len(labels), IMAGE_FOLDER_ORDER_SEED)
    images, labels = np.ascontiguousarray(images[order]), labels[order]
    try:
        save_npy_atomic(lab_path, labels)
        save_npy_atomic(img_path, images)
        logger.info("cifar10 %s: wrote tensor cache %s", split, img_path)
    except OSError as e:
        logger.warning("could not write tensor cache %s: %s", img_path, e)
    return images, labels
