"""Checks on what users pass in: images must be a float NCHW batch in the model's value range,
labels int64 class indices of the same length."""

from __future__ import annotations

import torch

from .errors import AeshieldError


class InputError(AeshieldError, ValueError):
    """The input does not fit the model: the message says what was expected."""


def validate_images(x: torch.Tensor, in_shape: tuple[int, ...] | None = None,
                    bounds: tuple[float, float] = (0.0, 1.0)) -> None:
    """Raise ``InputError`` for anything but a float NCHW batch in ``bounds`` without NaN."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x: expected a torch.Tensor of images, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise InputError(f"x: expected float images in [{bounds[0]}, {bounds[1]}], got dtype {x.dtype}; "
                         "convert uint8 images with x.float() / 255")
    if x.dim() != 4:
        raise InputError(f"x: expected a batch of shape (N, C, H, W), got shape {tuple(x.shape)}; "
                         "add a batch dimension with x.unsqueeze(0)")
    if in_shape is not None and tuple(x.shape[1:]) != tuple(in_shape):
        raise InputError(f"x: expected images of shape {tuple(in_shape)} (C, H, W), got "
                         f"{tuple(x.shape[1:])}; check the dataset and the channel count")
    if torch.isnan(x).any():
        raise InputError("x: the images contain NaN values; clean or drop them first")
    lo, hi = bounds
    if x.numel() and (x.min() < lo - 1e-6 or x.max() > hi + 1e-6):
        raise InputError(f"x: pixel values must lie in [{lo}, {hi}], got [{x.min().item():.3g}, "
                         f"{x.max().item():.3g}]; undo any normalization, the model does it")


def validate_labels(y: torch.Tensor, n: int, num_classes: int | None = None) -> torch.Tensor:
    """``y`` as int64 labels of ``n`` examples, each in ``[0, num_classes)``; ``InputError``
    (naming ``y``) otherwise. Integer tensors of another width are converted."""
    if not isinstance(y, torch.Tensor):
        raise InputError(f"y: expected a torch.Tensor of int64 labels, got {type(y).__name__}")
    if torch.is_floating_point(y) or y.dtype == torch.bool or torch.is_complex(y):
        raise InputError(f"y: expected integer class labels, got dtype {y.dtype}; use y.long()")
    if y.dim() != 1 or y.shape[0] != n:
        raise InputError(f"y: expected shape ({n},), one label per image, got {tuple(y.shape)}")
    y = y.long()
    if y.numel() and int(y.min()) < 0:
        raise InputError(f"y: labels must be class indices >= 0, got {int(y.min())}")
    if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
        raise InputError(f"y: label {int(y.max())} is out of range for a model with {num_classes} classes "
                         f"(labels 0..{num_classes - 1})")
    return y


def checked_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, with the errors of images the model cannot take (another dtype, channel
    count or size) and of a module that is not a classifier turned into one ``InputError``."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None and x.dtype != weight.dtype:
        raise InputError(f"x: dtype {x.dtype} does not match the model's {weight.dtype} weights; "
                         f"convert the images with x.to({weight.dtype})")
    try:
        logits = model(x)
    except RuntimeError as err:
        raise InputError(f"x: the model cannot take images of shape {tuple(x.shape[1:])} (C, H, W): "
                         f"{str(err).splitlines()[0]}") from err
    check_logits(logits, x)
    return logits


def check_logits(logits: torch.Tensor, x: torch.Tensor) -> None:
    """A model's output must be (N, classes) logits: anything else means the wrong module was
    passed as the classifier (an autoencoder gives images back)."""
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise InputError(f"the model returned shape {tuple(logits.shape)} for {x.shape[0]} images; a classifier "
                         "must return (N, classes) logits (was an autoencoder passed as the classifier?)")


def check_count(name: str, value: int, minimum: int = 1) -> None:
    """An iteration count such as ``steps`` or ``restarts``: an int of at least ``minimum``."""
    from .errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """A size such as ``step_size`` or ``lr``: a finite number > 0 (>= 0 with ``allow_zero``)."""
    from .errors import ConfigError

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and value != float("inf") and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{name} must be a number {'>=' if allow_zero else '>'} 0, got {value!r}")


_COUNTS = ("epochs", "batch_size", "attack_steps", "steps", "checkpoint_every")
_POSITIVE = ("lr",)
_NON_NEGATIVE = ("step_size", "eps", "noise", "kl_weight", "ce_weight", "lam", "weight_decay", "warmup_steps",
                 "eps_ramp_steps", "kl_warmup_steps")


def check_training_config(config) -> None:
    """The ranges every trainer's config shares, by field name: counts >= 1 (``epochs``,
    ``batch_size``, ``attack_steps``...), ``lr`` > 0, weights and sizes >= 0, a ``train_limit``
    of at least one image. Called from the configs' ``__post_init__``."""
    from .errors import ConfigError

    name = type(config).__name__
    for field in _COUNTS:
        if hasattr(config, field):
            _wrap(name, check_count, field, getattr(config, field))
    for field in _POSITIVE:
        if hasattr(config, field):
            _wrap(name, check_positive, field, getattr(config, field))
    for field in _NON_NEGATIVE:
        if hasattr(config, field):
            _wrap(name, check_positive, field, getattr(config, field), allow_zero=True)
    limit = getattr(config, "train_limit", None)
    if limit is not None:
        _wrap(name, check_count, "train_limit", limit)
    if getattr(config, "eps", 0) > 1:
        raise ConfigError(f"{name}: eps {config.eps} exceeds the pixel range [0, 1]; eps is in pixel units")


def _wrap(config_name: str, check, field: str, value, **kwargs) -> None:
    from .errors import ConfigError

    try:
        check(field, value, **kwargs)
    except ConfigError as err:
        raise ConfigError(f"{config_name}: {err}") from None
