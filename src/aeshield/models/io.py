"""Saving and loading weights: safetensors plus a JSON sidecar, never pickle.

The sidecar names the architecture, dataset and what the weights were trained for, so that
loading into the wrong model or for the wrong dataset fails with a clear message instead of
a cryptic shape error (or, worse, silently).

The two files are replaced by two renames, so a crash can fall between them. The sidecar
therefore records the SHA-256 of the weight bytes it belongs to (``weights_sha256``) and is
renamed first: a crash between the renames leaves the new sidecar beside the old weights,
whose hash does not match, and ``load_weights`` refuses the pair instead of describing one
save's weights with another's sidecar. (Sidecars written before the field existed, such as
some shipped ones, load as before.)
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import remove_temporaries, write_atomic, write_json_atomic
from ..records import package_versions
from .registry import MODELS, create_model

from ..errors import WeightsError, nearest

logger = logging.getLogger(__name__)
FORMAT = "aeshield-weights-v1"


class WeightsNotFound(WeightsError, FileNotFoundError):
    """No weight file at that path, and no shipped weights of that name."""


class CheckpointError(WeightsError):
    """Weights that do not fit the requested model, dataset or file format, or whose sidecar
    was written for other weight bytes (a torn pair)."""


SHA_KEY = "weights_sha256"


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def weights_path(path: str | Path) -> Path:
    """``path`` ending in .safetensors: the suffix is added, not substituted, so that a name
    such as ``aaa-fmnist-lam0.15`` keeps its ``.15`` (substituting once wrote two shipped
    shields to one file)."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def _canonicalize_header(path: str | Path) -> None:
    """Rewrite a safetensors header with sorted keys, in place and at the same length.

    safetensors writes its metadata map in hash order, which changes from process to
    process, so the same weights saved twice gave files with different SHA-256, and every
    evaluation record keyed by that hash looked stale after a re-ship."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(canonical) > size:  # never expected (same tokens); keep the file as written
            return
        f.seek(8)
        f.write(canonical + b" " * (size - len(canonical)))


def _same_contents(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same header metadata and the same tensors."""
    try:
        with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
            if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
                return False
            for k in fa.keys():
                ta, tb = fa.get_tensor(k), fb.get_tensor(k)
                if ta.dtype != tb.dtype or not torch.equal(ta, tb):
                    return False
            return True
    except Exception:  # a damaged old file is simply replaced
        return False


def save_weights(model: nn.Module, path: str | Path, *, architecture: str, dataset: str,
                 half: bool = False, **metadata: Any) -> Path:
    """Write ``path`` (.safetensors) and its JSON sidecar, both atomically, the sidecar first
    and recording the weights' SHA-256 (so that a crash between the two is detected on load).

    ``half`` stores floating-point tensors as float16 (half the size, for shipped weights);
    they load back into float32 models unchanged otherwise, so record any accuracy on the
    model as re-loaded, not as trained. An ``nn.ModuleList`` of models of one ``architecture``
    (e.g. MagNet's diverse autoencoders) is recorded with ``members``, so it loads back as one.
    """
    if isinstance(model, nn.ModuleList):
        metadata.setdefault("members", len(model))
    path = weights_path(path)
    tensors = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(tensors, tmp, metadata={"format": FORMAT, "architecture": architecture,
                                          "dataset": dataset})
        _canonicalize_header(tmp)

    side = {"format": FORMAT, "architecture": architecture, "dataset": dataset,
            "storage_dtype": "float16" if half else "float32", "versions": package_versions(),
            **metadata}

    def sidecar_first(final: Path) -> None:
        write_sidecar(sidecar_path(path), {**side, SHA_KEY: file_sha256(final)})

    # Same tensors as the file already there: keep its bytes, so records keyed by its hash stay valid.
    write_atomic(path, write, keep_if=_same_contents, before_replace=sidecar_first)
    return path


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files that a save killed mid-write left beside the weights ``path``
    and its sidecar. Only for an owner of ``path`` (a trainer writing its ``--out``) that no
    other live process is saving to."""
    path = weights_path(path)
    return remove_temporaries(path, sidecar_path(path))


def write_sidecar(path: str | Path, side: dict) -> Path:
    """Write a sidecar (atomically); the weights beside it are not touched."""
    return write_json_atomic(sidecar_path(path), side)


def read_sidecar(path: str | Path) -> dict:
    side = sidecar_path(path)
    if not side.exists():
        raise CheckpointError(f"{path} has no sidecar {side.name}; aeshield needs it to know the "
                              "architecture and dataset of the weights")
    return json.loads(side.read_text())


def check_pair(path: str | Path, side: dict) -> None:
    """Refuse weights whose sidecar records the SHA-256 of other bytes (a save interrupted
    between its two renames, or one of the two files copied from another save)."""
    recorded = side.get(SHA_KEY)
    if recorded is None:  # written before the field existed
        return
    actual = file_sha256(path)
    if actual != recorded:
        raise CheckpointError(
            f"{path} does not match its sidecar {sidecar_path(path).name}: the sidecar was written for "
            f"weights with SHA-256 {recorded[:12]}..., the file has {actual[:12]}... (a save interrupted "
            "between the two files, one of them copied from another save, or a damaged file); re-run the "
            "command that wrote them")


def shipped_dir() -> Path:
    return Path(str(resources.files("aeshield") / "weights"))


def resolve_weights(name_or_path: str | Path) -> Path:
    """A path to a .safetensors file, or the name of a weight file shipped with aeshield."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path: expected a shipped name or a .safetensors path (str or Path), "
                        f"got {type(name_or_path).__name__} {name_or_path!r}")
    candidate = Path(name_or_path)
    if candidate.suffix != ".safetensors":
        if candidate.suffix == "" and candidate.parent != Path("."):
            candidate = candidate.with_suffix(".safetensors")
    if candidate.exists() and candidate.is_file():
        return candidate
    for c in (Path(str(name_or_path) + ".safetensors"), shipped_dir() / f"{name_or_path}.safetensors"):
        if c.exists():
            return c
    shipped = sorted(p.stem for p in shipped_dir().glob("*.safetensors")) if shipped_dir().exists() else []
    raise WeightsNotFound(f"no weights found at {name_or_path!r}{nearest(str(name_or_path), shipped)}; give a "
                          ".safetensors path or a shipped name (`aeshield models` lists them)")


def load_weights(name_or_path: str | Path, *, architecture: str | None = None,
                 dataset: str | None = None, model: nn.Module | None = None,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load weights into a freshly built model (or ``model``); returns ``(model, sidecar)``.

    Refuses, with a message saying what was found, weights whose sidecar names another
    architecture or dataset than the ones asked for.
    """
    path = resolve_weights(name_or_path)
    side = read_sidecar(path)
    if side.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an aeshield weight file (format {side.get('format')!r})")
    if architecture is not None and side["architecture"] != architecture:
        raise CheckpointError(f"{path} holds a {side['architecture']!r} model, not the requested "
                              f"{architecture!r}; pass the matching --model or another file")
    if dataset is not None and side["dataset"] != dataset:
        raise CheckpointError(f"{path} was trained on {side['dataset']!r}, not {dataset!r}")
    if model is None:
        if side["architecture"] not in MODELS:
            raise CheckpointError(f"{path} names unknown architecture {side['architecture']!r}")
        members = side.get("members")
        model = nn.ModuleList(create_model(side["architecture"]) for _ in range(members)) \
            if members is not None else create_model(side["architecture"])
    try:
        state = load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} could not be read ({err}); the file is damaged, re-create it") from err
    check_pair(path, side)  # after the read, so that a file that does not even parse is called damaged
    # Shipped float16 tensors are cast to the model's dtype by load_state_dict's copy.
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensors of other shapes: weights of another model
        mismatched = [line.strip() for line in str(err).splitlines() if "size mismatch" in line][:1]
        raise CheckpointError(f"{path} does not fit architecture {side['architecture']!r}: its tensors have "
                              f"other shapes ({'; '.join(mismatched) or 'shape mismatch'}); were the weights "
                              "saved from another model?") from err
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit architecture {side['architecture']!r}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device).eval()
    return model, side
