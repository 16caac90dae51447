"""Your own images: a ``.npz`` file with an ``x`` array of images and a ``y`` array of labels,
or an image folder with one subfolder per class.

``x`` is (N, C, H, W) or (N, H, W, C) (C of 1 or 3; (N, H, W) counts as one channel), uint8 in
[0, 255] or float in [0, 1]; ``y`` holds N integer class labels. Whatever does not fit is
refused with one line naming the array and what was expected.

In an image folder the sorted subfolder names are the classes (labels 0..K-1). Images are
read with PIL: all grey images give one channel; if any image is in colour, every image is
read as RGB (grey ones repeated on three channels). All must have one size.

``load_data`` takes any of these, or a registered dataset's name, and splits a file or folder
into a seeded train/validation partition.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, nearest
from ..inputs import InputError, validate_images, validate_labels
from .cifar import stable_permutation
from .datasets import DATASETS, LabeledImages, load_dataset
from .fetch import DataError, canonical_name

USER_SPLITS = ("train", "val", "test", "all")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def registered_name(spec: str) -> str | None:
    """The canonical name of the registered dataset ``spec`` names (aliases too), or None for a
    file, a folder or anything else."""
    if Path(spec).exists():
        return None
    try:
        return canonical_name(spec)
    except DataError:
        return None


def load_data(spec: str, split: str = "test", *, val_fraction: float = 0.1, seed: int = 0,
              num_classes: int | None = None) -> LabeledImages:
    """Labelled images from ``spec``: a registered dataset name (its ``split``), a ``.npz`` file
    or an image folder with one subfolder per class.

    For a file or folder, ``"train"`` and ``"val"`` are a seeded partition (``val_fraction`` of
    the images, at least one, in ``"val"``; the same ``seed`` gives the same partition), and
    ``"test"`` or ``"all"`` are every image. ``num_classes``, when known, bounds the labels.
    """
    spec = str(spec)
    if split not in USER_SPLITS:
        raise ConfigError(f"split must be one of {', '.join(USER_SPLITS)}; got {split!r}")
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    name = registered_name(spec)
    if name is not None:
        if split == "all":
            raise ConfigError(f"{name}: a registered dataset has the splits train, val and test, not 'all'")
        return load_dataset(name, split)
    path = Path(spec)
    if path.is_dir():
        data = load_folder(path, num_classes=num_classes)
    elif path.suffix == ".npz" or path.is_file():
        if path.is_file() and path.suffix != ".npz":
            raise ConfigError(f"{path}: not a .npz file; give a dataset name, a .npz file (x, y) or an image "
                              "folder with one subfolder per class")
        data = load_npz(path, num_classes=num_classes)
    else:
        raise ConfigError(f"{spec!r} is neither a registered dataset{nearest(spec, DATASETS)} nor an existing "
                          ".npz file or image folder")
    return partition(data, split, val_fraction=val_fraction, seed=seed)


def partition(data: LabeledImages, split: str, *, val_fraction: float = 0.1, seed: int = 0) -> LabeledImages:
    """``data``'s seeded ``"train"`` or ``"val"`` part, or all of it for ``"test"``/``"all"``."""
    n = len(data)
    if split in ("train", "val"):
        n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
        perm = stable_permutation(n, seed)
        chosen = np.sort(perm[:n_val] if split == "val" else perm[n_val:])
        if len(chosen) == 0:
            raise InputError(f"{data.source}: {n} image(s) leave none for the {split!r} split; give more images "
                             "or another val_fraction")
        idx = torch.from_numpy(chosen.astype(np.int64))
        images, labels = data.images[idx], data.labels[idx]
    else:
        idx, images, labels = None, data.images, data.labels
    return LabeledImages(images=images, labels=labels, name=data.name, split=split, source=data.source,
                         sha256=data.sha256, indices=idx)


def load_folder(path: str | Path, num_classes: int | None = None) -> LabeledImages:
    """The images of ``path/<class>/*`` as float NCHW in [0, 1], labelled by sorted class name."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise InputError(f"{path}: expected one subfolder of images per class (e.g. {path}/cat/1.png), "
                         "found no subfolder")
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        found = sorted(f for f in (path / cls).iterdir() if f.is_file() and not f.name.startswith("."))
        if not found:
            raise InputError(f"{path / cls}: the class folder holds no images")
        files += [(f, label) for f in found]
    pictures, digest = [], hashlib.sha256()
    for f, _ in files:
        data = f.read_bytes()
        digest.update(f"{f.relative_to(path).as_posix()}\0{len(data)}\0".encode() + data)
        try:
            with Image.open(f) as image:
                image.load()
                pictures.append(image.copy())
        except (UnidentifiedImageError, OSError) as err:
            hint = "" if f.suffix.lower() in IMAGE_SUFFIXES else "; keep only images in the class folders"
            raise InputError(f"{f}: not a readable image ({type(err).__name__}){hint}") from err
    size = pictures[0].size
    for (f, _), picture in zip(files, pictures):
        if picture.size != size:
            raise InputError(f"{f}: image is {picture.size[0]}x{picture.size[1]} pixels, the first one "
                             f"({files[0][0].name}) {size[0]}x{size[1]}; resize all images to one size")
    grey = all(p.mode in ("1", "L", "LA", "I", "I;16", "F") for p in pictures)
    arrays = [_pixels(p, grey) for p in pictures]
    images = torch.from_numpy(np.stack(arrays)).float()
    labels = validate_labels(torch.tensor([label for _, label in files], dtype=torch.int64), len(files),
                             num_classes)
    if num_classes is not None and len(classes) > num_classes:
        raise InputError(f"{path}: {len(classes)} class folders, but the model has {num_classes} classes")
    return LabeledImages(images=images, labels=labels, name=path.name, split="all", source=str(path),
                         sha256=digest.hexdigest())


def _pixels(image, grey: bool) -> np.ndarray:
    """(C, H, W) float32 in [0, 1]."""
    if grey and image.mode in ("I", "I;16"):  # 16-bit grey: scaled by its own range, not clipped to 8 bits
        pixels = np.asarray(image, dtype=np.float64) / 65535
        return np.clip(pixels, 0, 1).astype(np.float32)[None]
    if grey and image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0, 1)[None]
    converted = image.convert("L" if grey else "RGB")
    pixels = np.asarray(converted, dtype=np.float32) / 255
    return pixels[None] if grey else pixels.transpose(2, 0, 1)


def load_npz(path: str | Path, num_classes: int | None = None) -> LabeledImages:
    """The images and labels of ``path`` as float NCHW images in [0, 1] and int64 labels."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such .npz file")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            names = set(arrays.files)
            if not {"x", "y"} <= names:
                raise InputError(f"{path}: expected arrays 'x' (images) and 'y' (labels), found {sorted(names)}")
            x, y = arrays["x"], arrays["y"]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{path}: not a readable .npz file ({err}); write it with numpy.savez(path, x=..., y=...)"
                         ) from err
    images = _images(torch.from_numpy(np.ascontiguousarray(x)), path)
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{path}: y must hold integer class labels, got dtype {y.dtype}")
    labels = validate_labels(torch.from_numpy(y.astype(np.int64)), images.shape[0], num_classes)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return LabeledImages(images=images, labels=labels, name=path.stem, split="user", source=str(path),
                         sha256=digest)


def _images(x: torch.Tensor, path: Path) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise InputError(f"{path}: x must be (N, C, H, W) or (N, H, W, C) images, got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.permute(0, 3, 1, 2).contiguous()  # NHWC
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif torch.is_floating_point(x):
        x = x.float()
    else:
        raise InputError(f"{path}: x must be uint8 in [0, 255] or float in [0, 1], got dtype {x.dtype}")
    try:
        validate_images(x)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    return x
