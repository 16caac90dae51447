"""``train_shield``: a shield for your own classifier(s) and your own images, in one call.

>>> import aeshield
>>> shield = aeshield.train_shield([my_classifier], (x, y), aeshield.ThreatModel("Linf", 8 / 255),
...                                out="shield.safetensors")                       # doctest: +SKIP
>>> model = shield.pipeline(my_classifier)                                            # doctest: +SKIP
>>> labels = model.predict(x_test)                                                    # doctest: +SKIP

Every shield defense of the registry trains through it (``aaa``, ``magnet``, ``puvae``,
``s2snet``, ``dbp``), each by its own ``Defense.train``; the autoencoder is built for the data's
image shape (``models.registry.create_model``). A defense with detectors (MagNet, PuVAE) is
calibrated on clean held-out images at ``false_positive_rate``, and its thresholds are stored
in the card, so the saved shield deploys with no data (``registry.load_pipeline``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.tensors import as_labeled_images, split_labeled
from ..errors import ConfigError, nearest
from ..inputs import InputError, checked_logits, validate_labels
from ..models.modes import frozen_for_use
from ..models.query import QueryOnly
from ..threat import Norm, ThreatModel
from .aaa import frozen
from .cards import Card, make_card
from .registry import (Defense, build_for_shape, config_to_dict, get_defense, list_defenses, save_defense,
                       with_input_shape)

__all__ = ["TrainedShield", "default_config", "train_shield"]

VALUE_RANGE = (0.0, 1.0)
# Defenses whose training (stage 2 for S2SNet) runs against exactly one classifier.
_ONE_CLASSIFIER = ("puvae", "s2snet")


@dataclass
class TrainedShield:
    """A trained shield: its module, config and card, and where it is saved (``path``, or None).

    ``purifier`` is what goes in front of a classifier; ``pipeline(classifier)`` the whole
    deployed defense, detectors included with the thresholds stored in the card.
    """

    defense: Defense
    module: nn.Module
    config: Any
    card: Card
    classifiers: list[nn.Module]
    history: list[dict] = field(default_factory=list)
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def purifier(self) -> nn.Module:
        """The trained module as a purifier (images to images), ready for use."""
        return frozen_for_use(with_input_shape(self.defense.purifier(self.module, self.config), self.card.input_shape))

    def pipeline(self, classifier: nn.Module | None = None, *, calibration: torch.Tensor | None = None) -> nn.Module:
        """``Shielded(purifier, classifier[, detector])`` for ``classifier`` (default: the first
        one trained against). Detectors get the stored thresholds, which were calibrated with
        the first classifier (MagNet's JSD detectors depend on it): give ``calibration`` (clean
        images) to calibrate them again for another classifier."""
        classifier = self.classifiers[0] if classifier is None else classifier
        deployment = self.card.deployment or {}
        seed = int(deployment.get("seed", 0))
        if calibration is None and deployment.get("calibration") == "stored":
            model = self.defense.pipeline(self.module, self.config, classifier, seed=seed,
                                          thresholds=deployment["thresholds"])
        else:
            model = self.defense.pipeline(self.module, self.config, classifier, calibration, seed)
        with_input_shape(model.purifier, self.card.input_shape)
        return model.eval()

    def save(self, path: str | Path) -> Path:
        """Write the weights and the card to ``path`` (.safetensors and its .json sidecar)."""
        card = self.card
        self.path = save_defense(self.module, path, defense=self.defense.name, config=self.config,
                                 dataset=card.dataset, trained_against=card.trained_against,
                                 deployment=card.deployment, input_shape=card.input_shape,
                                 num_classes=card.num_classes, value_range=card.value_range,
                                 history=self.history, **self.metadata)
        return self.path


def default_config(defense: str, input_shape: Sequence[int] | None = None, *, seed: int | None = None,
                   epochs: int | None = None, batch_size: int | None = None,
                   architecture: str | None = None) -> Any:
    """``defense``'s default config for images of ``input_shape`` (C, H, W), with the given
    settings replaced in every training stage (``epochs``, ``batch_size``, ``seed``).

    The autoencoders of AAA, MagNet, S2SNet and DBP's VAE adapt to any shape; PuVAE's
    conditional VAEs exist for 1x28x28 and 3x32x32 images only, and the one that fits is picked.
    """
    info = _shield(defense)
    config = info.config()
    if architecture is None and input_shape is not None and info.name == "puvae":
        architecture = _puvae_architecture(config.architecture, tuple(input_shape))
    if architecture is not None:
        if not hasattr(config, "architecture"):
            raise ConfigError(f"{defense} has no architecture setting")
        config = dataclasses.replace(config, architecture=architecture)
    stage_values = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("seed", seed))
                    if v is not None}
    return _replace_in_stages(config, stage_values)


def train_shield(classifiers: nn.Module | Sequence[nn.Module], data: Any, threat: ThreatModel | None = None,
                 defense: str = "aaa", config: Any = None, *, val: Any = None, val_fraction: float = 0.1,
                 false_positive_rate: float = 0.01, out: str | Path | None = None, progress: bool = True,
                 device: str | torch.device = "cpu", seed: int = 0,
                 trained_against: Sequence[str] | None = None, forced: Sequence[str] = ()) -> TrainedShield:
    """Train a ``defense`` shield in front of the frozen ``classifiers`` on ``data``.

    Args:
        classifiers: the model(s) to protect, ``nn.Module``s from images in [0, 1] to logits
            (one, or a list: AAA trains against an ensemble; PuVAE and S2SNet take one). They
            are moved to ``device`` and never changed (eval mode, no gradients, for the run).
        data: labelled training images: ``(x, y)`` tensors, a torch ``Dataset`` or
            ``DataLoader`` of ``(image, label)``, or ``LabeledImages``; float images in [0, 1].
        threat: the threat model to train against. AAA trains against its L-inf eps (it
            replaces the config's ``eps``); MagNet, PuVAE, S2SNet and DBP train on clean
            images only and ignore it.
        defense: a registered shield defense: ``aaa``, ``magnet``, ``puvae``, ``s2snet``, ``dbp``.
        config: the defense's config dataclass (e.g. ``AAAShieldConfig``), or a dict of settings
            that replace its defaults (a top-level field such as ``architecture``, or a training
            setting such as ``epochs`` or ``attack_steps``, set in every training stage); default:
            its defaults for the data's image shape (``default_config``) with ``seed``.
        val: clean held-out images (same forms as ``data``); default: a seeded ``val_fraction``
            of ``data``. They validate training and calibrate the detectors.
        false_positive_rate: the rate of clean images each detector (MagNet, PuVAE) rejects; it
            replaces the config's ``fpr``. The thresholds are stored in the card.
        out: save the shield here (.safetensors and its .json card). While training, a
            checkpoint ``<out>.ckpt`` is written; calling again with the same arguments resumes
            from it.
        progress: show a progress bar per epoch.
        seed: of the validation split and the detectors' calibration, and of training when
            ``config`` is not given.
        trained_against: names of the classifiers for the card (default: their class names).
        forced: mismatches between classifiers and data that the caller chose to override
            (``defenses.compat.check_compatible(..., force=True)``); kept in the sidecar.

    Returns:
        A ``TrainedShield``. Bad arguments raise ``ConfigError`` or ``InputError`` with one line
        saying what to do, before any training.
    """
    info = _shield(defense)
    classifiers = _classifiers(classifiers, info.name)
    data = as_labeled_images(data)
    if val is not None:
        val = as_labeled_images(val, split="val")
        if val.images.shape[1:] != data.images.shape[1:]:
            raise InputError(f"val: images of shape {tuple(val.images.shape[1:])} do not match the training "
                             f"images' {tuple(data.images.shape[1:])}")
    else:
        data, val = split_labeled(data, val_fraction, seed)
    input_shape = tuple(int(d) for d in data.images.shape[1:])
    device = torch.device(device)
    classifiers = [c.to(device) for c in classifiers]
    if info.name != "aaa" and any(isinstance(c, QueryOnly) for c in classifiers):
        raise ConfigError(f"{info.name} needs the classifier's gradients; of the shields only aaa trains "
                          "against a QueryOnly classifier (config query_method 'surrogate', 'nes' or 'spsa')")
    num_classes = _num_classes(classifiers, val.images[:2].to(device), data.labels)
    validate_labels(data.labels, len(data), num_classes)
    validate_labels(val.labels, len(val), num_classes)
    if not 0 <= false_positive_rate < 1:
        raise ConfigError(f"false_positive_rate must be in [0, 1), got {false_positive_rate}")
    config = _config(info, config, input_shape, seed, threat, false_positive_rate)
    _check_module(info, config, input_shape, num_classes)
    names = list(trained_against) if trained_against is not None else [type(c).__name__ for c in classifiers]
    if len(names) != len(classifiers):
        raise ConfigError(f"trained_against names {len(names)} classifier(s), but {len(classifiers)} were given")

    out_path = checkpoint = None
    if out is not None:
        out_path, checkpoint = _prepare_out(out, info, config, data, val)
    with frozen(*classifiers):
        trained = info.train(config, classifiers, data.to(device), val=val.to(device), checkpoint=checkpoint,
                             progress=progress, device=str(device))
        module = trained.module.eval()
        deployment = _calibrated(info, module, config, classifiers[0], val.images.to(device), seed,
                                 false_positive_rate)
    card = make_card(info, config, data.name, trained_against=names, deployment=deployment,
                     input_shape=input_shape, num_classes=num_classes, value_range=VALUE_RANGE)
    metadata = {"data_hash": data.sha256, "val_hash": val.sha256, "train_n": len(data), "val_n": len(val),
                **{k: v for k, v in trained.details.items() if k not in ("history",)},
                **({"forced_mismatches": list(forced)} if forced else {})}
    shield = TrainedShield(info, module, config, card, classifiers, trained.history, metadata=metadata)
    if out_path is not None:
        shield.save(out_path)
        for leftover in _checkpoint_files(checkpoint):
            leftover.unlink(missing_ok=True)
    return shield


# ---- checks and defaults -------------------------------------------------------------------
def _shield(name: str) -> Defense:
    if not isinstance(name, str):
        raise ConfigError(f"defense must be a defense name (str), got {type(name).__name__}")
    try:
        info = get_defense(name)
    except ValueError:
        from ..errors import nearest

        shields = [d for d in list_defenses() if get_defense(d).is_shield]
        raise ConfigError(f"unknown defense {name!r}{nearest(name, shields)}; shields: {', '.join(shields)}") from None
    if not info.is_shield:
        raise ConfigError(f"{name} is not a shield (it trains the classifier itself); train_shield trains "
                          "a shield in front of frozen classifiers: aaa, magnet, puvae, s2snet or dbp")
    return info


def _classifiers(classifiers: Any, defense: str) -> list[nn.Module]:
    listed = [classifiers] if isinstance(classifiers, nn.Module) else list(classifiers) \
        if isinstance(classifiers, (list, tuple)) else None
    if listed is None or not all(isinstance(c, nn.Module) for c in listed):
        raise ConfigError("classifiers: expected an nn.Module or a list of nn.Modules (images in [0, 1] to logits)")
    if not listed:
        raise ConfigError("classifiers: give at least one classifier to protect")
    if defense in _ONE_CLASSIFIER and len(listed) != 1:
        raise ConfigError(f"{defense} trains against exactly one classifier, got {len(listed)}; "
                          "train one shield per classifier, or use aaa for an ensemble")
    return listed


def _num_classes(classifiers: list[nn.Module], probe: torch.Tensor, labels: torch.Tensor) -> int:
    counts = []
    for k, classifier in enumerate(classifiers):
        if isinstance(classifier, QueryOnly) and classifier.output == "label":
            continue  # answers carry no class count: the data's labels give it (one query saved)
        with torch.no_grad():
            was_training = classifier.training
            classifier.eval()
            try:
                logits = checked_logits(classifier, probe)
            finally:
                classifier.train(was_training)
        if logits.dim() != 2:
            raise InputError(f"classifier {k}: expected logits of shape (N, classes), got {tuple(logits.shape)}")
        counts.append(int(logits.shape[1]))
    if len(set(counts)) > 1:
        raise ConfigError(f"the classifiers give different numbers of classes {counts}; an ensemble must share them")
    return counts[0] if counts else int(labels.max()) + 1


def _config(info: Defense, config: Any, input_shape: tuple[int, ...], seed: int, threat: ThreatModel | None,
            false_positive_rate: float) -> Any:
    if config is None or isinstance(config, dict):
        settings = dict(config or {})
        top = {k: settings.pop(k) for k in list(settings) if k in _field_names(info.config)}
        config = default_config(info.name, input_shape, seed=seed)
        unknown = set(settings) - _stage_field_names(config)
        if unknown:
            known = sorted(_field_names(info.config) | _stage_field_names(config))
            raise ConfigError(f"config: {info.name} has no setting {', '.join(map(repr, sorted(unknown)))}"
                              f"{nearest(min(unknown), known)}; its settings: {', '.join(known)}")
        config = _replace_in_stages(dataclasses.replace(config, **top), settings)
    elif not isinstance(config, info.config):
        raise ConfigError(f"config: {info.name} takes a {info.config.__name__} or a dict of its settings, "
                          f"got {type(config).__name__}")
    if threat is not None:
        if not isinstance(threat, ThreatModel):
            raise ConfigError(f"threat: expected an aeshield.ThreatModel, got {type(threat).__name__}")
        if info.name == "aaa":
            if threat.norm is not Norm.LINF:
                raise ConfigError(f"aaa trains against L-inf PGD; got a {threat.norm.value} threat model "
                                  "(give ThreatModel('Linf', eps))")
            config = dataclasses.replace(config, training=dataclasses.replace(config.training, eps=threat.eps))
    if info.deploy is not None and hasattr(config, "fpr"):
        config = dataclasses.replace(config, fpr=false_positive_rate)
    return config


def _check_module(info: Defense, config: Any, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Build the untrained module once, so a shape or class count it cannot take is refused
    before any training (the global RNG is left as it was)."""
    state = torch.get_rng_state()
    try:
        module = build_for_shape(info.build, config, input_shape)
    except ConfigError as err:
        raise ConfigError(f"{info.name}: {err}") from None
    finally:
        torch.set_rng_state(state)
    classes = getattr(module, "num_classes", None)
    if isinstance(classes, int) and classes != num_classes:
        raise ConfigError(f"{info.name}: architecture {getattr(config, 'architecture', '?')!r} models {classes} "
                          f"classes, the classifier gives {num_classes}")


def _puvae_architecture(default: str, shape: tuple[int, ...]) -> str:
    from ..models import MODELS

    fitting = [n for n, s in sorted(MODELS.items()) if n.startswith("cvae-") and s.input_shape == shape]
    if not fitting:
        sizes = sorted({"x".join(map(str, s.input_shape)) for n, s in MODELS.items() if n.startswith("cvae-")})
        raise ConfigError(f"puvae's conditional VAEs take {' or '.join(sizes)} images, not "
                          f"{'x'.join(map(str, shape))}; for other shapes use defense aaa, magnet, s2snet or dbp")
    return default if default in fitting else next((n for n in fitting if "quick" not in n), fitting[0])


def _field_names(cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _stage_field_names(config: Any) -> set[str]:
    """The settings of ``config``'s nested training dataclasses (what ``_replace_in_stages`` sets)."""
    return {name for f in dataclasses.fields(config) if dataclasses.is_dataclass(value := getattr(config, f.name))
            for name in _field_names(value)}


def _replace_in_stages(config: Any, values: dict[str, Any]) -> Any:
    """``config`` with ``values`` set in every nested training dataclass that has those fields."""
    if not values:
        return config
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            names = {g.name for g in dataclasses.fields(value)}
            known = {k: v for k, v in values.items() if k in names}
            if known:
                changes[f.name] = dataclasses.replace(value, **known)
    return dataclasses.replace(config, **changes)


# ---- calibration, checkpoint ---------------------------------------------------------------
def _calibrated(info: Defense, module: nn.Module, config: Any, classifier: nn.Module, clean: torch.Tensor,
                seed: int, false_positive_rate: float) -> dict | None:
    """The stored-threshold deployment of a defense with detectors: calibrated once here on the
    clean validation images, so a saved shield needs no data to deploy."""
    if info.deploy is None or info.thresholds is None:
        return None
    pipeline = info.pipeline(module, config, classifier, clean, seed)
    return {"calibration": "stored", "false_positive_rate": float(false_positive_rate),
            "thresholds": info.thresholds(pipeline, config), "seed": int(seed), "calibration_n": int(len(clean))}


def _prepare_out(out: str | Path, info: Defense, config: Any, data, val) -> tuple[Path, Path]:
    """``(weights path, checkpoint path)``; a checkpoint left by a run with other arguments is
    refused rather than resumed into this one."""
    from ..models.io import remove_stale_temporaries

    path = Path(out).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    checkpoint = path.with_suffix(".ckpt")
    identity = {"defense": info.name, "config": config_to_dict(config), "data": data.sha256, "val": val.sha256}
    marker = path.with_suffix(".ckpt.json")
    if checkpoint.exists() and marker.exists():
        if json.loads(marker.read_text()) != identity:
            raise ConfigError(f"{checkpoint} is the checkpoint of a run with other data or settings; delete it "
                              "to start over, or call again with that run's arguments to resume it")
    elif not checkpoint.exists():
        marker.write_text(json.dumps(identity, indent=1, sort_keys=True))
    return path, checkpoint


def _checkpoint_files(checkpoint: Path | None) -> list[Path]:
    if checkpoint is None:
        return []
    return [checkpoint, checkpoint.with_suffix(".stage1.ckpt"), checkpoint.with_suffix(".ckpt.json")]
