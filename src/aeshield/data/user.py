"""Your own images: a ``.npz`` file with an ``x`` array of images and a ``y`` array of labels.

``x`` is (N, C, H, W) or (N, H, W, C) (C of 1 or 3; (N, H, W) counts as one channel), uint8 in
[0, 255] or float in [0, 1]; ``y`` holds N integer class labels. Whatever does not fit is
refused with one line naming the array and what was expected.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..inputs import InputError, validate_images, validate_labels
from .datasets import LabeledImages


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
