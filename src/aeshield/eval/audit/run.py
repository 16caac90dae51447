"""``audit``: the battery as one checkpointed cascade, the sanity checks, the report."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path

import torch
from torch import nn

from ... import distributed
from ...threat import ThreatModel
from .. import sanity
from ..harness import evaluate
from ...records import config_hash, manifest
from .battery import build_battery, describe_model
from .budget import AuditBudget, get_budget
from .checks import CheckCache, run_checks
from .plots import plot_eps, plot_steps
from .report import PROTOCOL, AuditReport

logger = logging.getLogger(__name__)


def _tensor_hash(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_autoattack():
    """The reference AutoAttack warns about random or dynamic defenses on every call; the
    audit's own checks report those, once."""
    log = logging.getLogger("auto-attack")
    previous = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(previous)


def audit(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, threat: ThreatModel, *,
          budget: str | AuditBudget = "quick", surrogate: nn.Module | None = None, seed: int = 0,
          out: str | Path | None = None, progress: bool = True, batch_size: int = 500,
          checks: bool = True, plots: bool = True, checkpoint: str | Path | None = None,
          defense: str = "", classifier: str = "", dataset: str = "", data_source: str = "",
          data_hash: str = "", config: dict | None = None) -> AuditReport:
    """Attack ``model`` with the audit battery, run the sanity checks and write the report.

    Args:
        model: any ``nn.Module`` from images in ``threat.bounds`` to logits; a ``Shielded``
            pipeline also gets BPDA, adaptive and transfer attacks, and its detector (if any)
            counts rejections as robust and gets a detector-aware attack.
        images: ``(N, C, H, W)`` floats.
        labels: ``(N,)`` int64 labels.
        threat: the threat model (norm, eps, bounds).
        budget: ``"quick"``, ``"standard"``, ``"paper"`` or an ``AuditBudget``.
        surrogate: an independently trained classifier for a transfer attack.
        out: directory for ``audit.md``, ``audit.json`` and the plots; while the audit runs it
            also holds checkpoints (``.audit-cascade.json``, ``.audit-checks.json``) so that a
            crashed audit resumes; they are removed once the report is written.
        checkpoint: the cascade checkpoint path, if not the one in ``out``.
        checks: ``False`` turns the sanity checks off.
        plots: ``False`` turns the plots off.
        defense: provenance for the record, as are ``classifier``, ``dataset``,
            ``data_source`` and ``data_hash``.
        config: extra settings to store in the manifest (e.g. the command line).

    Returns:
        an ``AuditReport``; ``report.robust`` is the worst case over all attacks and
        ``report.flags`` the sanity checks that flagged.
    """
    was_training = model.training
    try:
        return _audit(model, images, labels, threat, budget=budget, surrogate=surrogate, seed=seed,
                      out=out, progress=progress, batch_size=batch_size, checks=checks, plots=plots,
                      checkpoint=checkpoint, defense=defense, classifier=classifier,
                      dataset=dataset, data_source=data_source, data_hash=data_hash, config=config)
    finally:
        model.train(was_training)


def _audit(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, threat: ThreatModel, *,
           budget: str | AuditBudget = "quick", surrogate: nn.Module | None = None, seed: int = 0,
           out: str | Path | None = None, progress: bool = True, batch_size: int = 500,
           checks: bool = True, plots: bool = True, checkpoint: str | Path | None = None,
           defense: str = "", classifier: str = "", dataset: str = "", data_source: str = "",
           data_hash: str = "", config: dict | None = None) -> AuditReport:
    b = get_budget(budget)
    start = time.perf_counter()
    model.eval()
    device = images.device
    labels = labels.to(device)
    n = images.shape[0]
    out_dir = Path(out) if out is not None else None
    cascade_ckpt = Path(checkpoint) if checkpoint else (out_dir / ".audit-cascade.json" if out_dir else None)
    checks_ckpt = (cascade_ckpt.parent / ".audit-checks.json") if cascade_ckpt else None

    # Randomness decides whether the gradient attacks go through EOT.
    probe = images[: min(n, 64)]
    measured_random, change = sanity.detect_randomness(model, probe)
    declared = bool(getattr(model, "stochastic", False))
    random = measured_random or declared
    if random:
        logger.info("the pipeline is random (max relative logit change %.2g, declared %s): "
                    "gradient attacks run through EOT(%d)", change, declared, b.eot_samples)

    battery = build_battery(model, threat, b, random=random, surrogate=surrogate)
    tensor_hash = _tensor_hash(images, labels)
    with _quiet_autoattack():
        record = evaluate(model, images, labels, battery, threat, batch_size=batch_size, seed=seed,
                          defense=defense or "none", classifier=classifier, dataset=dataset,
                          data_source=data_source, data_hash=data_hash or tensor_hash,
                          surrogate=surrogate, checkpoint=cascade_ckpt, progress=progress)
    for a in record.attacks:
        logger.debug("%-24s newly fooled %4d  robust %s  %.1fs  peak RSS %.0f MB", a.name,
                    a.newly_fooled, a.accuracy_after.format(), a.seconds, a.peak_memory_mb or 0)

    report = AuditReport(record=record, checks=[], battery=battery, budget=b, threat=threat,
                         random=random, model=describe_model(model), subset_n=None)
    if checks:
        run_checks(report, model, images, labels, threat, b, seed=seed, batch_size=batch_size,
                    random=random, measured=(measured_random, change, declared),
                    cache=CheckCache(checks_ckpt, config_hash({"key": record.robust_flags,
                                                                "protocol": PROTOCOL,
                                                                "threat": threat.to_dict(),
                                                                "budget": b.to_dict(), "seed": seed,
                                                                "data": tensor_hash})))
    report.seconds = time.perf_counter() - start
    report.manifest = manifest({"audit": {"budget": b.to_dict(), "threat": threat.to_dict(),
                                          "seed": seed, "n": n, "batch_size": batch_size,
                                          "surrogate": surrogate is not None,
                                          "defense": defense, "classifier": classifier,
                                          "dataset": dataset, "data_source": data_source},
                                **(config or {})},
                               {"evaluation_tensors": tensor_hash, **({dataset or "dataset": data_hash}
                                                                      if data_hash else {})})
    if out_dir is not None and distributed.is_main():  # under torchrun, rank 0 writes the report
        if plots:
            plot_eps(out_dir / "acc_vs_eps.png", report)
            plot_steps(out_dir / "acc_vs_steps.png", report)
            report.plots = {"accuracy vs eps": "acc_vs_eps.png", "accuracy vs steps": "acc_vs_steps.png"}
        report.save(out_dir)
        for path in (cascade_ckpt, checks_ckpt):
            if path is not None and path.parent == out_dir:
                path.unlink(missing_ok=True)
    logger.info("robust accuracy %s (worst case over %d attacks); %d flag(s); %.0fs",
                record.robust.format(), len(record.attacks), len(report.flags), report.seconds)
    return report
