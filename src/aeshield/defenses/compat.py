"""Does a shield fit a classifier and the data? Checked before any work starts.

Each side is summed up as a ``Signature``: the registered dataset it names (if any), its input
shape (C, H, W), its value range and its number of classes. Two sides that both name a
registered dataset must name the same one (an F-MNIST shield in front of an MNIST classifier
has the right shape and is still wrong); otherwise their shapes, value ranges and class counts
are compared where both are known. The data's class count is that of its dataset, its class
folders, or its largest label + 1 (a lower bound: a test set may lack a class), so data with
fewer classes than a model fit it, and more do not; two models must predict the same classes.

A mismatch is refused with one line naming both sides (``IncompatibleError``); ``force=True``
returns the mismatches instead, for the caller to record beside its result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..data import DATASETS, LabeledImages
from ..errors import ConfigError, WeightsError
from ..models.specs import ModelInfo, probe_num_classes

logger = logging.getLogger(__name__)

PIXEL_RANGE = (0.0, 1.0)


class IncompatibleError(ConfigError):
    """The shield, the classifier and the data do not fit each other; ``--force`` overrides."""


@dataclass(frozen=True)
class Signature:
    """One side of the check. ``name`` is how the user named it (for the message)."""

    name: str
    dataset: str | None
    input_shape: tuple[int, ...] | None
    num_classes: int | None
    value_range: tuple[float, float] | None = PIXEL_RANGE


def shield_signature(name_or_path: str | Path) -> Signature:
    """The shield's signature, from the card in its sidecar: its dataset, input shape, value
    range (``[0, 1]`` unless the card says otherwise) and class count (the card's, else that of
    its registered dataset)."""
    from ..models.io import read_sidecar, resolve_weights
    from .cards import read_card

    side = read_sidecar(resolve_weights(name_or_path))
    if side.get("kind") != "shield":  # as load_shield refuses it
        raise WeightsError(f"{name_or_path} is a {side.get('kind')}, not a shield; give a shield "
                           "(`aeshield models` lists them)")
    if isinstance(side.get("card"), dict):
        card = dict(side["card"])
    else:
        try:  # an old sidecar, migrated on read
            card = read_card(side).to_dict()
        except (ValueError, KeyError):  # of a method aeshield lacks: load_shield reads its autoencoder
            card = {}
    dataset = card.get("dataset") or side.get("dataset")
    info = DATASETS.get(dataset)
    shape = tuple(int(s) for s in card.get("input_shape") or ()) or (tuple(info.shape) if info else None)
    classes = card.get("num_classes")
    if not isinstance(classes, int):
        classes = info.num_classes if info else None
    value_range = card.get("value_range")
    return Signature(name=str(name_or_path), dataset=dataset, input_shape=shape, num_classes=classes,
                     value_range=tuple(float(v) for v in value_range) if value_range else PIXEL_RANGE)


def classifier_signature(info: ModelInfo, model, data_shape: tuple[int, ...] | None) -> Signature:
    """The classifier's signature. A class count the weights do not tell is probed with one
    forward pass on images of the classifier's input shape, else of ``data_shape``; a model
    that cannot take those raises ``ConfigError``."""
    shape = tuple(info.input_shape) if info.input_shape else None
    classes = info.num_classes
    if classes is None and (shape or data_shape):
        device = next((p.device for p in model.parameters()), "cpu")
        try:
            classes = probe_num_classes(model, shape or tuple(data_shape), device=device)
        except ConfigError as err:
            raise ConfigError(f"{info.spec}: {err}") from err
    return Signature(name=info.spec, dataset=info.dataset if info.dataset in DATASETS else None,
                     input_shape=shape, num_classes=classes)


def data_signature(data: LabeledImages) -> Signature:
    """The data's signature: a registered dataset (loaded by name) names it; a file or folder of
    the user's does not, whatever its name."""
    user = Path(str(data.source)).exists()
    dataset = data.name if data.name in DATASETS and not user else None
    if dataset is not None:
        classes = DATASETS[dataset].num_classes
    elif len(data):
        classes = int(data.labels.max()) + 1
    else:
        classes = None
    lo, hi = (float(data.images.min()), float(data.images.max())) if data.images.numel() else PIXEL_RANGE
    # Images in [0, 1] are the only kind aeshield loads (the loaders check it); a range outside
    # it is reported as it is.
    value_range = PIXEL_RANGE if PIXEL_RANGE[0] <= lo and hi <= PIXEL_RANGE[1] else (lo, hi)
    name = dataset or str(data.source)
    return Signature(name=name, dataset=dataset, input_shape=tuple(data.images.shape[1:]), num_classes=classes,
                     value_range=value_range)


def _describe(role: str, sig: Signature) -> str:
    if role == "data":
        return f"the data {sig.name}"
    return f"the {role} {sig.name}"


def _mismatches(a_role: str, a: Signature, b_role: str, b: Signature) -> list[str]:
    """How ``b`` fails to fit ``a`` (``a`` is the data when one side is)."""
    first, second = _describe(a_role, a), _describe(b_role, b)
    if a.dataset in DATASETS and b.dataset in DATASETS:
        if a.dataset != b.dataset:
            tail = "the data are" if a_role == "data" else f"{first} was trained on"
            return [f"{second} was trained on {b.dataset} but {tail} {a.dataset}"]
        return []
    out = []
    if a.input_shape and b.input_shape and tuple(a.input_shape) != tuple(b.input_shape):
        out.append(f"{second} takes images of shape {tuple(b.input_shape)} (C, H, W) but {first} "
                   f"{'are' if a_role == 'data' else 'takes'} {tuple(a.input_shape)}")
    if a.value_range and b.value_range and tuple(a.value_range) != tuple(b.value_range):
        out.append(f"{second} takes pixel values in {list(b.value_range)} but {first} "
                   f"{'lie' if a_role == 'data' else 'takes'} in {list(a.value_range)}")
    if a.num_classes is not None and b.num_classes is not None:
        if a_role == "data" and a.num_classes > b.num_classes:
            out.append(f"{second} predicts {b.num_classes} classes (labels 0..{b.num_classes - 1}) but {first} "
                       f"hold label {a.num_classes - 1}")
        elif a_role != "data" and a.num_classes != b.num_classes:
            out.append(f"{second} predicts {b.num_classes} classes but {first} predicts {a.num_classes}")
    return out


def check_compatible(*, data: Signature, classifier: Signature, shield: Signature | None = None,
                     force: bool = False) -> list[str]:
    """Refuse a shield, classifier and data that do not fit (``IncompatibleError``, one line);
    with ``force`` return the mismatches (empty when everything fits) and log them."""
    found = _mismatches("data", data, "classifier", classifier)
    if shield is not None:
        found += _mismatches("data", data, "shield", shield)
        found += _mismatches("classifier", classifier, "shield", shield)
    if found and not force:
        raise IncompatibleError("; ".join(found) + " (--force overrides, force=True from Python)")
    for line in found:
        logger.warning("forced past a mismatch: %s", line)
    return found


def check_members(classifiers: list[Signature], *, force: bool = False) -> list[str]:
    """Classifiers used together (an ensemble a shield is trained against) must fit each other:
    the same dataset, or else the same shape and classes. Refused or returned as
    ``check_compatible`` does."""
    found = [line for other in classifiers[1:]
             for line in _mismatches("classifier", classifiers[0], "classifier", other)]
    if found and not force:
        raise IncompatibleError("; ".join(found) + " (--force overrides, force=True from Python)")
    for line in found:
        logger.warning("forced past a mismatch: %s", line)
    return found
