"""aeshield: autoencoder shields for frozen image classifiers, and the evaluation that tests them.

>>> import aeshield
>>> shield = aeshield.load_shield("aaa-mnist")              # doctest: +SKIP
>>> model = aeshield.Shielded(shield, my_classifier)        # doctest: +SKIP
>>> labels = model.predict(images)                          # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

from .defenses.base import REJECT, AutoencoderPurifier, Detector, Purifier, Shielded
from .threat import Norm, ThreatModel

__all__ = ["REJECT", "AutoencoderPurifier", "Detector", "Norm", "Purifier", "QueryOnly", "Shielded",
           "ThreatModel", "TrainedShield", "__version__", "load_classifier", "load_classifier_spec", "load_data",
           "load_shield", "train_shield"]

# Imported on first use: training pulls in the trainers and the attacks, which ``import aeshield``
# should not pay for.
_LAZY = {"train_shield": "aeshield.defenses.train_shield", "TrainedShield": "aeshield.defenses.train_shield",
         "load_data": "aeshield.data.user", "QueryOnly": "aeshield.models.query"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aeshield' has no attribute {name!r}")


def load_classifier(name_or_path: str, device: str = "cpu"):
    """A trained classifier: a shipped name (e.g. ``"mnist-a"``), a ``.safetensors`` path, or any
    other spec that ``load_classifier_spec`` reads (``package.module:factory[=WEIGHTS]``,
    ``path/file.py:factory[=WEIGHTS]``, ``file.pt2``), in eval mode."""
    from .models.io import load_weights
    from .models.specs import is_spec

    if is_spec(name_or_path):
        return load_classifier_spec(str(name_or_path), device=device)[0]

    model, side = load_weights(name_or_path, device=device)
    if side.get("kind") not in (None, "classifier"):
        from .errors import WeightsError

        raise WeightsError(f"{name_or_path} is a {side.get('kind')}, not a classifier; give it as the shield "
                           "(or pick a classifier: `aeshield models`)")
    return model.eval()


def load_classifier_spec(spec: str, *, normalize=None, device: str = "cpu"):
    """``(classifier, ModelInfo)`` for any classifier spec (``aeshield.models.specs``): frozen,
    in eval mode; ``normalize`` (``(mean, std)`` or ``"MEAN,STD"``) for one that expects
    normalised input."""
    from .models.specs import load_classifier_spec as _load

    return _load(spec, normalize=normalize, device=device)


def load_shield(name_or_path: str, device: str = "cpu") -> Purifier:
    """A trained shield as a purifier: a shipped name (e.g. ``"aaa-mnist"``) or a path, rebuilt
    from the card in its sidecar (``aeshield.defenses.cards``) by its registered defense. A
    PuVAE comes back as its class-conditional purifier; detectors need calibration data, so
    they are not part of it (the audit and the runner calibrate them)."""
    from .defenses.registry import load_shield as _load_shield

    return _load_shield(name_or_path, device=device)
