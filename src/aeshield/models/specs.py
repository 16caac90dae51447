"""Classifier specs: every form in which a user can name a classifier, on the command line and
from Python.

- a shipped (zoo) name such as ``mnist-b``, or a ``.safetensors`` path with its JSON sidecar;
- ``package.module:factory`` or ``path/to/file.py:factory``: a function (or class) returning an
  ``nn.Module``, optionally followed by ``=WEIGHTS.safetensors`` (a ``state_dict`` saved with
  ``safetensors.torch.save_file``; ``.pt``/``.pth`` files are read with
  ``torch.load(weights_only=True)``), loaded strictly: every key and shape must match;
- ``file.pt2``: a ``torch.export`` program, read without unpickling arbitrary objects.

A factory spec imports and runs the user's code, as naming it asks. ``--normalize MEAN,STD``
wraps a classifier that expects normalised input (``Normalized``), since shields and attacks
work on [0, 1] images.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, WeightsError, nearest
from .classifiers import Normalize
from .modes import frozen_for_use

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class ModelInfo:
    """What is known about a loaded classifier without running it.

    ``weights_sha256`` is the SHA-256 of the weight file (the ``.safetensors``, the
    ``=WEIGHTS`` file or the ``.pt2``); for a factory spec without a weight file, the SHA-256 of
    its ``state_dict`` (``state_dict_sha256``), so that a record still names the weights it
    measured.
    """

    spec: str
    kind: str | None
    dataset: str | None
    input_shape: tuple[int, ...] | None
    num_classes: int | None
    weights_sha256: str | None
    normalize: Stats | None = None


def parse_normalize(text: str) -> Stats:
    """``"MEAN,STD"`` (one channel, or the same for every channel) or ``"m1,..,mC,s1,..,sC"``."""
    try:
        numbers = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--normalize {text!r}: expected comma-separated numbers MEAN,STD (one channel) "
                          "or m1,..,mC,s1,..,sC (C channels), e.g. 0.1307,0.3081") from None
    if not numbers or len(numbers) % 2:
        raise ConfigError(f"--normalize {text!r}: expected an even count of numbers, the C means then the C "
                          f"standard deviations (got {len(numbers)})")
    half = len(numbers) // 2
    mean, std = tuple(numbers[:half]), tuple(numbers[half:])
    if any(not s > 0 or s == float("inf") for s in std) or any(m != m or abs(m) == float("inf") for m in mean):
        raise ConfigError(f"--normalize {text!r}: the standard deviations must be finite and > 0 and the "
                          "means finite")
    return mean, std


class Normalized(nn.Module):
    """``model((x - mean) / std)``: a classifier that expects normalised input, fed [0, 1] images."""

    def __init__(self, model: nn.Module, mean, std) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ConfigError(f"normalize: {len(mean)} means but {len(std)} standard deviations")
        self.model = model
        self.normalize = Normalize(mean, std)
        for attribute in ("in_shape", "num_classes"):
            if hasattr(model, attribute):
                setattr(self, attribute, getattr(model, attribute))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``model``'s state_dict, in key order."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# "target:attribute" optionally "=weights"; the target is a dotted module name or a .py path.
_FACTORY = re.compile(r"^(?P<target>.+?):(?P<attr>[A-Za-z_][\w.]*)(?:=(?P<weights>.+))?$")


def is_spec(name: object) -> bool:
    """Whether ``name`` is a factory spec or a ``.pt2`` path rather than a shipped name or a
    ``.safetensors`` path (which ``models.io.load_weights`` reads)."""
    if not isinstance(name, (str, Path)):
        return False
    text = str(name)
    return text.endswith(".pt2") or (bool(_FACTORY.match(text)) and not _is_windows_drive(text))


def load_classifier_spec(spec: str, *, normalize: Stats | str | None = None,
                         device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """The classifier ``spec`` names, in eval mode with frozen parameters, and what is known
    about it. ``normalize`` (``(mean, std)`` or the ``"MEAN,STD"`` text) wraps it in
    ``Normalized``."""
    if not isinstance(spec, (str, Path)):
        raise ConfigError(f"classifier spec: expected a string (a shipped name, a .safetensors or .pt2 path, or "
                          f"module:factory[=WEIGHTS]), got {type(spec).__name__}")
    spec = str(spec)
    stats = parse_normalize(normalize) if isinstance(normalize, str) else normalize
    if spec.endswith(".pt2"):
        model, info = _load_pt2(spec)
    elif (match := _FACTORY.match(spec)) and not _is_windows_drive(spec):
        model, info = _load_factory(spec, match["target"], match["attr"], match["weights"])
    elif "=" in spec:
        raise ConfigError(f"classifier {spec!r}: =WEIGHTS goes after a factory, as module:factory=WEIGHTS."
                          "safetensors; a shipped name or a .safetensors path already holds its weights")
    else:
        model, info = _load_zoo(spec)
    if stats is not None:
        mean, std = stats
        channels = info.input_shape[0] if info.input_shape else None
        if channels is not None and len(mean) not in (1, channels):
            raise ConfigError(f"--normalize gives {len(mean)} channel(s) but the classifier {spec} takes "
                              f"{channels}-channel images")
        model = Normalized(model, mean, std)
        info = ModelInfo(**{**info.__dict__, "normalize": (tuple(mean), tuple(std))})
    return frozen_for_use(model.to(device)), info


def _is_windows_drive(spec: str) -> bool:
    return bool(re.match(r"^[A-Za-z]:[\\/]", spec))


def _load_zoo(spec: str) -> tuple[nn.Module, ModelInfo]:
    from ..data import DATASETS
    from .io import file_sha256, load_weights, resolve_weights

    model, side = load_weights(spec)
    if side.get("kind") not in (None, "classifier"):
        raise WeightsError(f"{spec} is a {side.get('kind')}, not a classifier; give it as the shield "
                           "(or pick a classifier: `aeshield models`)")
    dataset = side.get("dataset")
    info = DATASETS.get(dataset)
    shape = getattr(model, "in_shape", None) or (info.shape if info else None)
    classes = getattr(model, "num_classes", None) or (info.num_classes if info else None)
    return model, ModelInfo(spec=spec, kind="classifier", dataset=dataset,
                            input_shape=tuple(shape) if shape else None, num_classes=classes,
                            weights_sha256=file_sha256(resolve_weights(spec)))


def _load_pt2(spec: str) -> tuple[nn.Module, ModelInfo]:
    from .exported import load_exported
    from .io import file_sha256

    model = load_exported(spec)
    # A sidecar beside the program (as aeshield's export writes one) tells its dataset.
    side_path = Path(spec).with_suffix(".json")
    side = {}
    if side_path.is_file():
        try:
            side = json.loads(side_path.read_text())
        except ValueError:
            side = {}
    shape = getattr(model, "in_shape", None) or side.get("input_shape")
    classes = side.get("num_classes") if isinstance(side.get("num_classes"), int) else None
    return model, ModelInfo(spec=spec, kind="classifier", dataset=side.get("dataset"),
                            input_shape=tuple(shape) if shape else None, num_classes=classes,
                            weights_sha256=file_sha256(spec))


@contextmanager
def _on_path(folder: str):
    """``folder`` first on ``sys.path`` while the block imports (a console script does not put
    the working directory there, and a user's file may import its neighbours)."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _import_target(spec: str, target: str):
    """The module ``target`` names: a ``.py`` file, or a dotted module importable from the
    working directory or ``sys.path``."""
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"classifier {spec!r}: no such file {target}")
        resolved = path.resolve()
        name = f"aeshield_user_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_" \
               f"{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, resolved)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"classifier {spec!r}: {target} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # before running it, as an import does (dataclasses look it up)
        try:
            with _on_path(str(resolved.parent)):
                loader_spec.loader.exec_module(module)
        except BaseException as err:
            del sys.modules[name]
            if isinstance(err, Exception):
                raise _import_failed(spec, target, err) from err
            raise
        return module
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", target):
        raise ConfigError(f"classifier {spec!r}: {target!r} is neither a module name (package.module) nor a "
                          ".py file")
    try:
        with _on_path(str(Path.cwd())):
            return importlib.import_module(target)
    except ModuleNotFoundError as err:
        parts = target.split(".")
        if err.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            raise ConfigError(f"classifier {spec!r}: no module named {err.name!r}; run from the folder that "
                              "holds it, add that folder to PYTHONPATH, or give path/to/file.py:factory"
                              ) from err
        raise _import_failed(spec, target, err) from err
    except Exception as err:
        raise _import_failed(spec, target, err) from err


def _import_failed(spec: str, target: str, err: Exception) -> ConfigError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ConfigError(f"classifier {spec!r}: importing {target} failed: {type(err).__name__}: {first}")


def _load_factory(spec: str, target: str, attr: str, weights: str | None) -> tuple[nn.Module, ModelInfo]:
    module = _import_target(spec, target)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(f"classifier {spec!r}: {target} has no attribute {attr!r}{nearest(part, public)}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        model = obj  # a module instance named directly
    elif callable(obj):
        try:
            model = obj()
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ConfigError(f"classifier {spec!r}: calling {attr}() failed: {type(err).__name__}: {first}; "
                              "the factory must take no arguments") from err
        if not isinstance(model, nn.Module):
            raise ConfigError(f"classifier {spec!r}: {attr}() returned a {type(model).__name__}, not a "
                              "torch.nn.Module")
    else:
        raise ConfigError(f"classifier {spec!r}: {target}.{attr} is a {type(obj).__name__}, not a callable "
                          "that returns an nn.Module")
    digest = None
    if weights is not None:
        digest = load_strict(model, weights, what=f"{target}:{attr}")
    shape = getattr(model, "in_shape", None)
    classes = getattr(model, "num_classes", None)
    return model, ModelInfo(spec=spec, kind="classifier", dataset=None,
                            input_shape=tuple(int(s) for s in shape) if shape else None,
                            num_classes=classes if isinstance(classes, int) and not isinstance(classes, bool)
                            else None,
                            weights_sha256=digest or state_dict_sha256(model))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pt", ".pth"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"{path}: expected a state_dict (names -> tensors), got {type(state).__name__}")
        return state
    raise WeightsError(f"{path}: weights must be a .safetensors file (safetensors.torch.save_file(model."
                       "state_dict(), path)) or a .pt/.pth state_dict")


def load_strict(model: nn.Module, weights: str | Path, *, what: str = "the model") -> str:
    """Load the state_dict in ``weights`` into ``model``, refusing any missing or unexpected
    key and any shape that differs; returns the file's SHA-256."""
    from .io import file_sha256

    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        state = _read_state(path)
    except WeightsError:
        raise
    except Exception as err:  # safetensors and the unpickler raise their own error types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{path} could not be read ({first}); the file is damaged or not a state_dict") from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in sorted(set(state) & set(expected))
              if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = ([f"missing keys {_few(missing)}"] if missing else []) + \
                ([f"unexpected keys {_few(unexpected)}"] if unexpected else []) + \
                ([f"other shapes (file vs model): {_few(shapes)}"] if shapes else [])
        raise WeightsError(f"{path} does not fit {what}: {'; '.join(parts)}; save the weights of this very "
                           "architecture (model.state_dict())")
    model.load_state_dict(state, strict=True)
    return file_sha256(path)


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > n else ''}]"


def probe_num_classes(model: nn.Module, input_shape, device: str | torch.device = "cpu") -> int:
    """The number of classes ``model`` predicts: the width of its logits for two zero images of
    ``input_shape`` (C, H, W). ``ConfigError`` if it cannot take them or returns no logits."""
    x = torch.zeros(2, *tuple(input_shape), device=device)
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None:
        x = x.to(weight.dtype)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"the classifier cannot take images of shape {tuple(input_shape)} (C, H, W): "
                          f"{first[:200]}") from err
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the classifier returned {got} for 2 images of shape {tuple(input_shape)}; a classifier "
                          "must return (N, classes) logits")
    return int(out.shape[1])
