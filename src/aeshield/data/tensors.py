"""Labelled images handed over from Python: tensors, a torch ``Dataset`` or a ``DataLoader``,
as one :class:`LabeledImages`, checked as the models will need them.

Training a shield passes over the images many times in a seeded order, so the data is
gathered into memory once (what the trainers take) rather than read through the loader on
every epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from ..inputs import InputError, validate_images, validate_labels
from .datasets import LabeledImages

__all__ = ["as_labeled_images", "split_labeled"]


def as_labeled_images(data: Any, *, name: str = "user", split: str = "train",
                      num_classes: int | None = None) -> LabeledImages:
    """``data`` as float NCHW images in [0, 1] with int64 labels.

    ``data``: a ``LabeledImages``; a pair ``(x, y)`` of tensors; a map-style torch ``Dataset``
    whose items are ``(image, label)``; or a ``DataLoader`` (or any iterable) of
    ``(images, labels)`` batches. Images must already be float in [0, 1] (a model's
    normalization belongs in the model); labels are class indices below ``num_classes`` when
    given. Anything else raises ``InputError`` with one line saying what was expected.
    """
    if isinstance(data, LabeledImages):
        x, y, source = data.images, data.labels, data.source
        name, split = data.name, data.split
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        source = "tensors"
    elif isinstance(data, torch.utils.data.DataLoader):
        x, y = _from_batches(data)
        source = f"DataLoader of {type(data.dataset).__name__}"
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        x, y = _from_items(data)
        source = type(data).__name__
    elif isinstance(data, torch.Tensor):
        raise InputError("data: got images without labels; pass (x, y), a Dataset or a DataLoader of (image, label)")
    elif hasattr(data, "__iter__") and not isinstance(data, (str, bytes, dict)):
        x, y = _from_batches(data)
        source = type(data).__name__
    else:
        raise InputError(f"data: expected (x, y) tensors, a torch Dataset or DataLoader of (image, label), "
                         f"or LabeledImages; got {type(data).__name__}")
    validate_images(x)
    if x.shape[0] == 0:
        raise InputError("data: no images; give at least one labelled image")
    y = validate_labels(y, x.shape[0], num_classes)
    x = x.float().contiguous()
    if isinstance(data, LabeledImages):
        digest = data.sha256
    else:
        digest = hashlib.sha256(x.detach().cpu().numpy().tobytes() + y.cpu().numpy().tobytes()).hexdigest()
    return LabeledImages(images=x, labels=y, name=name, split=split, source=source, sha256=digest)


def split_labeled(data: LabeledImages, fraction: float, seed: int = 0) -> tuple[LabeledImages, LabeledImages]:
    """``(train, val)``: a seeded ``fraction`` of ``data`` held out (at least one image each), the
    same partition that ``load_data(file, "train"/"val")`` takes of a file."""
    from .user import partition

    if not 0 < fraction < 1:
        raise InputError(f"val_fraction must be in (0, 1), got {fraction}")
    n = len(data)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise InputError(f"data: {n} image(s) cannot be split into training and validation images at "
                         f"val_fraction {fraction}; give more images or a separate val set")
    return tuple(partition(data, split, val_fraction=fraction, seed=seed) for split in ("train", "val"))


def _pair(item: Any, where: str) -> tuple[Any, Any]:
    if isinstance(item, dict) or not isinstance(item, Sequence) or len(item) < 2:
        raise InputError(f"data: {where} must be an (image, label) pair, got {type(item).__name__}")
    return item[0], item[1]


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"data: {what} must be a tensor (or a number for a label), got {type(value).__name__}"
                         ) from None


def _from_items(dataset: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise InputError("data: the Dataset is empty; give at least one labelled image")
    images, labels = [], []
    for i in range(n):
        image, label = _pair(dataset[i], f"item {i} of the Dataset")
        image = _tensor(image, f"the image of item {i}")
        if image.dim() != 3:
            raise InputError(f"data: item {i} of the Dataset holds an image of shape {tuple(image.shape)}; "
                             "expected (C, H, W) (add a channel dimension for grey images)")
        images.append(image)
        labels.append(_tensor(label, f"the label of item {i}").reshape(()))
    return _stack(images, "Dataset items"), torch.stack(labels)


def _from_batches(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for i, batch in enumerate(loader):
        x, y = _pair(batch, f"batch {i}")
        x, y = _tensor(x, f"the images of batch {i}"), _tensor(y, f"the labels of batch {i}")
        if x.dim() != 4:
            raise InputError(f"data: batch {i} holds images of shape {tuple(x.shape)}; expected (N, C, H, W)")
        images.append(x)
        labels.append(y.reshape(-1))
    if not images:
        raise InputError("data: the DataLoader gave no batches; give at least one labelled image")
    return _stack(images, "batches", cat=True), torch.cat(labels)


def _stack(parts: list[torch.Tensor], what: str, cat: bool = False) -> torch.Tensor:
    shapes = {tuple(p.shape[1:] if cat else p.shape) for p in parts}
    if len(shapes) > 1:
        raise InputError(f"data: the {what} hold images of different shapes {sorted(shapes)[:3]}; "
                         "resize them to one (C, H, W) shape first")
    return torch.cat(parts) if cat else torch.stack(parts)
