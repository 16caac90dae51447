"""Deploy a shielded classifier as one file: ONNX (onnxruntime and other runtimes) or a
``torch.export`` program (``.pt2``), with the detectors inside.

``Deployable`` wraps a ``Shielded`` pipeline (purifier, classifier, optional detector) as one
module whose forward returns three tensors, which are the exported model's outputs:

* ``logits`` ``(N, classes)``: ``classifier(purifier(images))``, what ``Shielded.forward`` gives;
* ``labels`` ``(N,)`` int64: the arg-max, or ``REJECT`` (-1) where the detector fires;
* ``reject_margin`` ``(N,)``: ``detector.score(images) - detector.threshold``; the input is
  rejected exactly when it is > 0, the rule of ``Shielded.predict``. For MagNet's
  ``MultiDetector`` this is its own score, ``max_i (s_i - t_i) / |t_i|`` (threshold 0): the
  largest of the per-detector margins, each relative to its threshold. Without a detector the
  margin is ``-inf`` for every input (never rejected), so a deployment reads the three outputs
  the same way whatever shield it runs.

The input is named ``images``: float ``(N, C, H, W)`` in [0, 1], the batch size free.

A random shield (MagNet with several autoencoders drawn at random, PuVAE sampling ``z``) is
refused: a traced program would either freeze one draw per batch position or carry a random
generator whose stream differs from torch's, and neither is the defense that was evaluated.
Deploy a fixed variant instead (the message says which).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, require
from ..inputs import InputError
from ..io import write_atomic
from ..models.modes import preserved_modes
from ..models.predict import REJECT
from .base import Detector, Shielded

__all__ = ["INPUT_NAME", "NO_DETECTOR_MARGIN", "OUTPUT_NAMES", "Deployable", "ExportCheck", "check_deterministic",
           "check_export", "export_onnx", "export_pt2", "fixed_member", "onnx_runner", "pt2_runner", "runner"]

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "labels", "reject_margin")
NO_DETECTOR_MARGIN = float("-inf")
# Batch size of the example the program is traced with: 1 would let the tracer specialise
# the batch dimension to a constant.
_TRACE_BATCH = 2


class Deployable(nn.Module):
    """A ``Shielded`` pipeline (or a bare classifier) as ``images -> (logits, labels,
    reject_margin)``; see the module docstring. It shares the pipeline's modules."""

    def __init__(self, pipeline: nn.Module) -> None:
        super().__init__()
        if not isinstance(pipeline, Shielded):
            pipeline = Shielded(None, pipeline)
        check_deterministic(pipeline)
        detector = pipeline.detector
        if detector is not None and type(detector).rejects is not Detector.rejects:
            raise ConfigError(f"detector {type(detector).__name__} overrides rejects(); an exported model "
                              "rejects where score - threshold > 0, so express its rule through score()")
        self.purifier = pipeline.purifier
        self.classifier = pipeline.classifier
        self.detector = detector
        self.in_shape = pipeline.in_shape

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.classifier(self.purifier(images))
        if self.detector is None:
            margin = logits.new_full((images.shape[0],), NO_DETECTOR_MARGIN)
        else:
            margin = self.detector.score(images) - self.detector.threshold
        labels = logits.argmax(1).masked_fill(margin > 0, REJECT)
        return logits, labels, margin


def check_deterministic(pipeline: Shielded) -> None:
    """Nothing for a deterministic pipeline, else a ConfigError naming its random part
    (detectors included: MagNet without a reformer is random through its detectors alone)
    and the fixed variant to deploy."""
    from .magnet import DiverseAutoencoder
    from .puvae import PuVAE

    random = [(name, m) for name, m in pipeline.named_modules()
              if getattr(m, "stochastic", False) and not isinstance(m, Shielded)]
    if not random:
        return
    # The part that owns the randomness, not a wrapper whose flag only repeats it.
    name, module = next(((n, m) for n, m in random if isinstance(m, (DiverseAutoencoder, PuVAE))), random[-1])
    if isinstance(module, DiverseAutoencoder):
        raise ConfigError(
            f"{name}: MagNet with {len(module.members)} autoencoders drawn at random cannot be exported "
            "(a program cannot draw as the defense does); deploy one fixed member: "
            f"fixed_member(pipeline, k) (aeshield export --member K), k < {len(module.members)}")
    if isinstance(module, PuVAE):
        raise ConfigError(f"{name}: PuVAE sampling z (sample=True) cannot be exported; deploy its mean "
                          "reconstruction: set .sample = False (the shipped deployment) and recalibrate its "
                          "detector on clean images (pipeline.detector.calibrate)")
    raise ConfigError(f"{name}: {type(module).__name__} is random (stochastic=True) and cannot be exported; "
                      "deploy a deterministic variant of it")


def fixed_member(pipeline: Shielded, member: int) -> Shielded:
    """``pipeline`` with every MagNet ``DiverseAutoencoder`` in it (reformer and detectors share
    one) answering with autoencoder ``member`` only: deterministic, so it exports. Changes the
    pipeline in place and returns it. The detectors keep their thresholds, which were set on
    all members' clean scores pooled, so this member's false-positive rate can differ from the
    stated one; recalibrate (``pipeline.detector.calibrate``) to state it for this member."""
    from .magnet import DiverseAutoencoder

    diverse = [m for m in pipeline.modules() if isinstance(m, DiverseAutoencoder)]
    if not diverse:
        raise ConfigError("fixed_member: this pipeline has no MagNet autoencoders drawn at random (a MagNet "
                          "shield with diversity > 1); it needs no member fixed")
    size = min(len(m.members) for m in diverse)
    if not 0 <= member < size:
        raise ConfigError(f"fixed_member: member must be in [0, {size}), got {member}")
    for m in diverse:
        m.member = member
        m._cache = None
    return pipeline


def _example(module: Deployable, input_shape) -> torch.Tensor:
    input_shape = input_shape or module.in_shape
    if input_shape is None:
        raise ConfigError("export needs the input shape (C, H, W): the classifier has no in_shape; "
                          "pass input_shape=")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    dtype = weight.dtype if weight is not None else torch.float32
    device = weight.device if weight is not None else torch.device("cpu")
    return torch.rand((_TRACE_BATCH, *shape), generator=torch.Generator().manual_seed(0)).to(device, dtype)


def _dynamic_batch() -> tuple[dict, ...]:
    return ({0: torch.export.Dim("batch", min=1)},)


@contextmanager
def _tracing(module: nn.Module) -> Iterator[None]:
    """Eval mode (each part's mode given back), no gradients, no per-tensor caches before or
    after the trace, and no warning about them.

    PuVAE and ``DiverseAutoencoder`` cache their last result per input tensor so that the
    purifier and the detector of one call share it; inside a trace that makes the program
    compute the purification once. The trace leaves its own tensors in the cache, which must
    not outlive it.
    """
    def clear() -> None:
        for part in module.modules():
            if getattr(part, "_cache", None) is not None:
                part._cache = None

    clear()
    try:
        with preserved_modes(module), torch.no_grad(), warnings.catch_warnings():
            # Flags set one by one rather than module.eval(): a classifier loaded from a .pt2
            # is a program's module, whose train() raises.
            for part in module.modules():
                part.training = False
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_cache.* were assigned during export")
            yield
    finally:
        clear()


@contextmanager
def _quiet_onnx() -> Iterator[None]:
    """The ONNX exporter's optimiser logs every pass at INFO; a verbose aeshield would show
    hundreds of lines about constant folding."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_program(module: Deployable, example: torch.Tensor) -> torch.export.ExportedProgram:
    try:  # images the pipeline cannot take are the user's mistake, not an op that does not export
        module(example)
    except RuntimeError as err:
        raise InputError(f"the pipeline cannot take images of shape {tuple(example.shape[1:])} (C, H, W): "
                         f"{_describe(err)}; give the input_shape its classifier and shield take") from err
    try:
        with _partial_graph_dropped():
            return torch.export.export(module, (example,), dynamic_shapes=_dynamic_batch(), strict=False)
    except Exception as err:  # noqa: BLE001 - any tracing failure: find the part that caused it
        raise _unexportable(module, example, err) from err


@contextmanager
def _partial_graph_dropped() -> Iterator[None]:
    """torch.export prints the graph traced so far to stderr when it fails: dozens of lines
    before the one-line error that says which part and which line of code (``--debug`` shows
    the traceback). Anything else written meanwhile is passed on."""
    buffer = io.StringIO()
    failed = True
    try:
        with contextlib.redirect_stderr(buffer):
            yield
        failed = False
    finally:
        if not failed:
            sys.stderr.write(buffer.getvalue())


def _unexportable(module: Deployable, example: torch.Tensor, err: Exception) -> ConfigError:
    """A ConfigError naming the first part of the pipeline that does not export by itself."""
    parts = [("purifier", module.purifier, example), ("classifier", module.classifier, None),
             ("detector", module.detector, example)]
    for name, part, x in parts:
        if part is None or isinstance(part, nn.Identity):
            continue
        if x is None:
            with torch.no_grad():
                x = module.purifier(example)
        try:
            with _partial_graph_dropped():
                torch.export.export(part, (x,), dynamic_shapes=_dynamic_batch(), strict=False)
        except Exception as part_err:  # noqa: BLE001
            return ConfigError(f"the {name} ({type(part).__name__}) cannot be exported by torch.export: "
                               f"{_describe(part_err)}; rewrite that code in export-friendly ops "
                               "(no Python branch on tensor values, no .item() or .tolist())")
    return ConfigError(f"the pipeline cannot be exported by torch.export: {_describe(err)}")


# torch's export errors end with the user code that raised them.
_USER_CODE = re.compile(r'File "([^"]+)", line (\d+), in \w+\n[ \t]+(\S.*)')

_USER_CODE_NO_SOURCE = re.compile(r'File "([^"]+)", line (\d+), in \w+')


def _describe(err: Exception) -> str:
    """The first line of an export error, and the user code it points at when it says."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    calls = _USER_CODE.findall(text)
    if calls:
        file, line, code = calls[-1]
        first += f" (at {Path(file).name}:{line}: {code.strip()})"
    else:
        calls = _USER_CODE_NO_SOURCE.findall(text)
        if calls:
            first += f" (at {Path(calls[-1][0]).name}:{calls[-1][1]})"
    return first


def export_pt2(pipeline: nn.Module, path: str | Path, *, input_shape) -> Path:
    """Write ``Deployable(pipeline)`` as a ``torch.export`` program (``.pt2``) with a free batch
    dimension; ``input_shape`` is ``(C, H, W)``. Written atomically; returns ``path``."""
    module = pipeline if isinstance(pipeline, Deployable) else Deployable(pipeline)
    example = _example(module, input_shape)
    with _tracing(module):
        program = _export_program(module, example)
    return write_atomic(path, lambda tmp: torch.export.save(program, tmp), suffix=".pt2")


def export_onnx(pipeline: nn.Module, path: str | Path, *, input_shape, opset: int | None = None) -> Path:
    """Write ``Deployable(pipeline)`` as one ONNX file (weights inside; input ``images``,
    outputs ``logits``, ``labels``, ``reject_margin``, free batch dimension), through torch's
    dynamo exporter, checked by ``onnx.checker``. Written atomically; returns ``path``."""
    onnx = require("onnx", extra="export", feature="ONNX export")
    require("onnxscript", extra="export", feature="ONNX export")
    module = pipeline if isinstance(pipeline, Deployable) else Deployable(pipeline)
    example = _example(module, input_shape)
    with _tracing(module), _quiet_onnx():
        program = _export_program(module, example)  # names the part that fails, before the ONNX step
        try:
            onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=[INPUT_NAME],
                                             output_names=list(OUTPUT_NAMES), opset_version=opset,
                                             verbose=False, report=False)
        except Exception as err:  # noqa: BLE001 - an aten op without an ONNX translation
            raise ConfigError(f"the pipeline traced, but its program has no ONNX translation: {_describe(err)}; "
                              "export it as .pt2 instead") from err

    def write(tmp: Path) -> None:
        # One file, weights inside, so the atomic rename moves everything (no external data).
        onnx_program.save(tmp, external_data=False)
        onnx.checker.check_model(str(tmp), full_check=True)

    return write_atomic(path, write, suffix=".onnx")


# ---- running and checking an exported file -----------------------------------------------------
Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def onnx_runner(path: str | Path) -> Callable[[torch.Tensor], Outputs]:
    """``images -> (logits, labels, reject_margin)`` through an ONNX file in onnxruntime (CPU)."""
    ort = require("onnxruntime", extra="export", feature="running an ONNX export")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> Outputs:
        out = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.detach().cpu().float().numpy()})
        return tuple(torch.from_numpy(o) for o in out)  # type: ignore[return-value]

    return run


def pt2_runner(path: str | Path) -> Callable[[torch.Tensor], Outputs]:
    """``images -> (logits, labels, reject_margin)`` through a ``.pt2`` program in torch."""
    from ..models.exported import load_exported

    program = load_exported(path)  # refuses an archive that would unpickle anything but tensors

    def run(images: torch.Tensor) -> Outputs:
        with torch.no_grad():
            return tuple(t.cpu() for t in program(images))  # type: ignore[return-value]

    return run


def runner(path: str | Path) -> Callable[[torch.Tensor], Outputs]:
    """The runner of an exported file by its suffix: ``.onnx``, else ``.pt2``."""
    return onnx_runner(path) if str(path).endswith(".onnx") else pt2_runner(path)


@dataclass(frozen=True)
class ExportCheck:
    """An exported file against the pipeline it came from, on ``n`` images."""

    n: int
    max_abs_diff: float            # largest |logit difference|
    disagreements: int             # images whose reject decision differs
    near_threshold: int            # of those, how many have |margin| < margin_tol in the pipeline
    label_differences: int         # images whose label (REJECT included) differs
    max_margin_diff: float         # largest |reject_margin difference| where the pipeline's is finite
    tolerance: float
    margin_tol: float

    @property
    def ok(self) -> bool:
        """Logits within ``tolerance``, and every differing decision within ``margin_tol`` of
        the threshold (round-off cannot be told apart from a decision there)."""
        return self.max_abs_diff < self.tolerance and self.disagreements == self.near_threshold

    def summary(self) -> str:
        return (f"{self.n} images: max |logit diff| {self.max_abs_diff:.2e} (tolerance {self.tolerance:g}), "
                f"max |margin diff| {self.max_margin_diff:.2e}, "
                f"reject decisions differ on {self.disagreements} ({self.near_threshold} within "
                f"{self.margin_tol:g} of the threshold), labels on {self.label_differences}")


def check_export(pipeline: nn.Module, path: str | Path, images: torch.Tensor, *, tolerance: float = 1e-4,
                 margin_tol: float = 1e-4, batch_size: int = 500) -> ExportCheck:
    """Run the exported ``path`` (``.onnx`` in onnxruntime, else ``.pt2`` in torch) and the
    pipeline it came from on ``images`` and compare logits and reject decisions."""
    if len(images) == 0:
        raise ConfigError("check_export needs at least one image")
    module = pipeline if isinstance(pipeline, Deployable) else Deployable(pipeline)
    run = runner(path)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    ref, got = [], []
    with _tracing(module):  # eval mode, no grad; the caches are cleared again afterwards
        for batch in images.split(batch_size):
            batch = batch.to(device)
            ref.append([t.cpu() for t in module(batch)])
            got.append(run(batch))
    ref_logits, ref_labels, ref_margin = (torch.cat(parts) for parts in zip(*ref))
    got_logits, got_labels, got_margin = (torch.cat(parts) for parts in zip(*got))
    diff = float((ref_logits.float() - got_logits.float()).abs().max())
    differs = (ref_margin > 0) != (got_margin > 0)
    near = differs & (ref_margin.abs() < margin_tol)
    finite = torch.isfinite(ref_margin)
    margin_diff = float((ref_margin - got_margin)[finite].abs().max()) if finite.any() else 0.0
    return ExportCheck(n=len(images), max_abs_diff=diff, disagreements=int(differs.sum()),
                       near_threshold=int(near.sum()), label_differences=int((ref_labels != got_labels).sum()),
                       max_margin_diff=margin_diff, tolerance=tolerance, margin_tol=margin_tol)
