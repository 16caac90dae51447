"""Exported programs (``.pt2``, ``torch.export``): written atomically, read without unpickling
arbitrary objects.

``torch.export.load`` unpickles some archive members with ``weights_only=False`` (pickled
weights and constants, and the sample inputs when the safe load fails) and plain ``pickle``
for opaque constants: a ``.pt2`` from someone else could run code on load. ``load_exported``
therefore first reads every torch-serialised member with ``torch.load(weights_only=True)`` and
refuses the file if one of them needs more than tensors and containers, or if it holds a
pickled Python object at all.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from ..errors import WeightsError
from ..io import write_bytes_atomic

# Payload entries whose files ``torch.export.load`` reads with ``pickle.loads`` or the
# TorchScript unpickler (pt2_archive constants.py: CUSTOM_OBJ_FILENAME_PREFIX,
# OPAQUE_OBJ_FILENAME_PREFIX): never safe to read, so refused by name.
_OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")


class ExportedClassifier(nn.Module):
    """An exported program's module, usable where an ``nn.Module`` classifier is expected.

    The graph module of ``ExportedProgram.module()`` raises on ``.eval()``/``.train()``; its
    mode was fixed when it was exported, so switching modes here only sets the flag (the
    attacks and trainers save and restore it)."""

    def __init__(self, program_module: nn.Module, input_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.program = program_module
        if input_shape is not None:
            self.in_shape = tuple(input_shape)

    def train(self, mode: bool = True) -> "ExportedClassifier":
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def _refuse(path: Path, member: str, why: str) -> WeightsError:
    return WeightsError(f"{path}: refusing to load this .pt2: its member {member} {why}; export the "
                        "model again with torch.export.save (tensors only) or aeshield's save_exported")


def check_archive(path: str | Path) -> None:
    """Raise ``WeightsError`` unless every member that ``torch.export.load`` would unpickle
    holds only tensors and containers (``torch.load(weights_only=True)`` reads it)."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise WeightsError(f"{path}: not a readable .pt2 archive ({err}); write it with "
                           "torch.export.save") from err
    with archive:
        names = set(archive.namelist())
        pickled = {n for n in names if n.endswith(".pt")}
        # Members are stored under a folder named after the archive ("<stem>/data/..."): the
        # payload configs name their files relative to their own folder.
        for config_name in (n for n in names if n.endswith("_config.json")
                            and PurePosixPath(n).parent.name in ("weights", "constants")):
            try:
                config = json.loads(archive.read(config_name)).get("config", {})
            except (ValueError, AttributeError) as err:
                raise _refuse(path, config_name, f"is not a readable payload config ({err})") from err
            folder = PurePosixPath(config_name).parent
            for fqn, meta in config.items():
                file = str(meta.get("path_name", ""))
                if file.startswith(_OBJECT_PREFIXES):
                    raise _refuse(path, str(folder / file), f"holds a pickled Python object ({fqn})")
                if meta.get("use_pickle"):
                    pickled.add(str(folder / file))
        for member in sorted(pickled):
            if member not in names:
                raise _refuse(path, member, "is named in the archive's config but missing")
            try:
                torch.load(io.BytesIO(archive.read(member)), weights_only=True, map_location="cpu")
            except Exception as err:  # the unpickler's refusal, or a damaged member
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise _refuse(path, member, f"does not load as tensors only ({first[:160]})") from err


def _input_shape(program) -> tuple[int, ...] | None:
    """The (C, H, W) of the program's single image input, when its sizes are concrete."""
    try:
        user_inputs = set(program.graph_signature.user_inputs)
        shapes = [node.meta["val"].shape for node in program.graph.nodes
                  if node.op == "placeholder" and node.name in user_inputs]
        if len(shapes) != 1 or len(shapes[0]) != 4:
            return None
        return tuple(int(s) for s in shapes[0][1:])
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


def load_exported(path: str | Path) -> nn.Module:
    """The module of the ``torch.export`` program in ``path``, checked first to unpickle
    nothing but tensors (``check_archive``); an ``ExportedClassifier``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such .pt2 file")
    check_archive(path)
    try:
        program = torch.export.load(str(path))
    except Exception as err:  # torch raises many kinds for a file it cannot read
        raise WeightsError(f"{path}: torch.export.load could not read it ({type(err).__name__}: "
                           f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                           "export it again with this torch version") from err
    return ExportedClassifier(program.module(), _input_shape(program))


def save_exported(module: nn.Module, path: str | Path, example: torch.Tensor,
                  dynamic_batch: bool = True) -> Path:
    """Export ``module`` (in its current mode) traced on ``example`` and write it to ``path``
    atomically; with ``dynamic_batch`` the program takes any batch size."""
    path = Path(path)
    dynamic_shapes = None
    if dynamic_batch:
        # torch specialises a dimension of size 1, so trace on at least two images.
        if example.shape[0] < 2:
            example = example.expand(2, *example.shape[1:]).clone()
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},)
    program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
    # Saved to memory first: saved to the temporary file, its random name would become the
    # folder inside the archive.
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return write_bytes_atomic(path, buffer.getvalue())
