"""Checks on what users pass in: images must be a float NCHW batch in the model's value range."""

from __future__ import annotations

import torch

from .errors import AeshieldError


class InputError(AeshieldError, ValueError):
    """The input does not fit the model: the message says what was expected."""


def validate_images(x: torch.Tensor, in_shape: tuple[int, ...] | None = None,
                    bounds: tuple[float, float] = (0.0, 1.0)) -> None:
    """Raise ``InputError`` for anything but a float NCHW batch in ``bounds`` without NaN."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise InputError(f"expected float images in [{bounds[0]}, {bounds[1]}], got dtype {x.dtype}; "
                         "convert uint8 images with x.float() / 255")
    if x.dim() != 4:
        raise InputError(f"expected a batch of shape (N, C, H, W), got shape {tuple(x.shape)}; "
                         "add a batch dimension with x.unsqueeze(0)")
    if in_shape is not None and tuple(x.shape[1:]) != tuple(in_shape):
        raise InputError(f"expected images of shape {tuple(in_shape)} (C, H, W), got "
                         f"{tuple(x.shape[1:])}; check the dataset and the channel count")
    if torch.isnan(x).any():
        raise InputError("input contains NaN values")
    lo, hi = bounds
    if x.numel() and (x.min() < lo - 1e-6 or x.max() > hi + 1e-6):
        raise InputError(f"pixel values must lie in [{lo}, {hi}], got [{x.min().item():.3g}, "
                         f"{x.max().item():.3g}]; undo any normalization, the model does it")
