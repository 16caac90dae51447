"""The evaluation harness: attacks run as a cascade with per-example robust flags.

Each attack sees only the examples that are still robust (the AutoAttack design), so the
reported robust accuracy is the worst case over every restart and every attack, and it can
only go down as attacks are added. An example counts as robust if the model's prediction on
every attack's output is its true label or, when the pipeline has a detector, a reject.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..attacks import BPDA, EOT, registry
from ..defenses.base import Shielded
from ..inputs import check_count, checked_logits, validate_images, validate_labels
from ..io import write_json_atomic
from ..models.modes import eval_mode
from ..models.predict import REJECT, predict
from ..records import AttackResult, Accuracy, EvalRecord, config_hash, flags_from_string, flags_to_string
from ..threat import ThreatModel

logger = logging.getLogger(__name__)

AttackFn = Callable[..., torch.Tensor]


class _LegacyAttackTable(MutableMapping):
    """``ATTACKS``, the name -> ``fn(model, x, y, threat, generator, **params)`` table of earlier
    releases, as a view of the attack registry: reading gives a registered attack's adapter,
    assigning replaces it (or registers an untyped attack), deleting unregisters it."""

    def __getitem__(self, name: str) -> AttackFn:
        try:
            return registry.get_attack(name).run
        except KeyError:
            raise KeyError(name) from None

    def __setitem__(self, name: str, fn: AttackFn) -> None:
        if name in registry.attack_names():
            registry.replace_run(name, fn)
        else:
            registry.register(name, settings=registry.Untyped, reference="")(fn)

    def __delitem__(self, name: str) -> None:
        try:
            registry.unregister(name)
        except KeyError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(registry.attack_names())

    def __len__(self) -> int:
        return len(registry.attack_names())


_LEGACY_ATTACKS = _LegacyAttackTable()


def register_attack(name: str, fn: AttackFn) -> None:
    """Deprecated: register ``fn(model, x, y, threat, generator, **params)`` as an untyped attack;
    use ``aeshield.attacks.register`` (typed settings, norms, a reference)."""
    warnings.warn("aeshield.eval.register_attack is deprecated; use aeshield.attacks.register",
                  DeprecationWarning, stacklevel=2)
    _LEGACY_ATTACKS[name] = fn


def legacy_attribute(module: str, name: str) -> "_LegacyAttackTable":
    """The deprecated ``ATTACKS`` table of ``module`` (``aeshield.eval`` and its harness)."""
    if name == "ATTACKS":
        warnings.warn("aeshield.eval.ATTACKS is deprecated; use aeshield.attacks.run_attack, "
                      "get_attack and register", DeprecationWarning, stacklevel=3)
        return _LEGACY_ATTACKS
    raise AttributeError(f"module {module!r} has no attribute {name!r}")


def __getattr__(name: str):
    return legacy_attribute(__name__, name)


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a cascade.

    ``wrap`` adapts the model first: ``"bpda"`` swaps the purifier's backward pass for its
    ``bpda_forward`` (identity by default), ``"eot"`` averages ``eot_samples`` random draws,
    ``"classifier"`` crafts on the bare classifier (a transfer / bypass attack that is then
    evaluated on the whole pipeline). ``threat`` overrides the evaluation's threat model.
    """

    name: str
    params: dict = field(default_factory=dict)
    wrap: str | None = None
    eot_samples: int = 8
    threat: ThreatModel | None = None
    label: str | None = None

    @property
    def title(self) -> str:
        if self.label:
            return self.label
        bits = [self.name] + [f"{k}={v}" for k, v in sorted(self.params.items())]
        if self.wrap:
            bits.append(f"wrap={self.wrap}")
        return " ".join(bits)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["threat"] = self.threat.to_dict() if self.threat else None
        return d


def adapt_model(model: nn.Module, spec: AttackSpec, surrogate: nn.Module | None = None) -> nn.Module:
    if spec.wrap in (None, "none"):
        return model
    if spec.wrap == "eot":
        return EOT(model, spec.eot_samples)
    if spec.wrap == "classifier" and not isinstance(model, Shielded):
        return model  # an undefended classifier is its own bare classifier (oblivious = white-box)
    if spec.wrap in ("bpda", "classifier"):
        if not isinstance(model, Shielded):
            raise ValueError(f"wrap={spec.wrap!r} needs a Shielded pipeline, got {type(model).__name__}")
        if spec.wrap == "classifier":
            return model.classifier
        purifier = model.purifier
        return Shielded(BPDA(purifier, getattr(purifier, "bpda_forward", None)), model.classifier,
                        model.detector)
    if spec.wrap == "surrogate":
        if surrogate is None:
            raise ValueError("wrap='surrogate' needs a surrogate model")
        return surrogate
    raise ValueError(f"unknown wrap {spec.wrap!r}; use none, bpda, eot, classifier or surrogate")


def handled(labels: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: classified correctly, or rejected (which counts as robust)."""
    return (labels == y) | (labels == REJECT)


def attack_generator(seed: int, index: int, batch: int) -> torch.Generator:
    """The seeded generator of the ``index``-th attack of a cascade on its ``batch``-th batch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index * 10_007 + batch)


def craft(attack_model: nn.Module, spec: AttackSpec, x: torch.Tensor, y: torch.Tensor,
          threat: ThreatModel, gen: torch.Generator) -> torch.Tensor:
    """``spec``'s adversarial inputs for one batch, inside ``threat`` (the registry checks)."""
    return registry.run_attack(spec.name, attack_model, x, y, threat, gen, **spec.params)


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB; None where the OS does not report it."""
    try:
        import resource  # Unix only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             attacks: Sequence[AttackSpec], threat: ThreatModel, *, batch_size: int = 500,
             seed: int = 0, defense: str = "none", classifier: str = "", dataset: str = "",
             data_source: str = "", data_hash: str = "", surrogate: nn.Module | None = None,
             checkpoint: str | Path | None = None, progress: bool = True) -> EvalRecord:
    """Attack ``model`` on ``(images, labels)`` with the ``attacks`` cascade.

    Returns an ``EvalRecord`` with clean and robust accuracy (Wilson 95% intervals), what each
    attack added, and per-example robust flags. ``checkpoint`` (a JSON path) stores the flags
    after every attack so that an interrupted evaluation resumes where it stopped. An attack
    whose optional package is missing raises ``MissingExtraError`` before anything runs.

    Started by ``torchrun`` (``aeshield.distributed.init``), each rank runs every ``W``-th batch
    of each attack and the flags are gathered after it: the record is the one a single process
    writes, whatever the number of ranks (a random pipeline's draws are seeded per batch).
    """
    for spec in attacks:
        registry.get_attack(spec.name).check_available()
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"threat: expected an aeshield.ThreatModel, e.g. ThreatModel('Linf', 0.3), "
                        f"got {type(threat).__name__} {threat!r}")
    check_count("batch_size", batch_size)
    validate_images(images, bounds=threat.bounds)
    labels = validate_labels(labels, images.shape[0])
    with eval_mode(model):  # every submodule's mode is given back on exit
        if images.shape[0]:
            labels = validate_labels(labels, images.shape[0], _classes(model, images))
        return _evaluate(model, images, labels, attacks, threat, batch_size=batch_size, seed=seed,
                         defense=defense, classifier=classifier, dataset=dataset, data_source=data_source,
                         data_hash=data_hash, surrogate=surrogate, checkpoint=checkpoint, progress=progress)


def _classes(model: nn.Module, images: torch.Tensor) -> int:
    """How many classes ``model`` tells apart: its logits' width on one image, measured without
    touching the random state (a random purifier's draws stay those of the evaluation)."""
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        return int(checked_logits(model, images[:1]).shape[1])


def _evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              attacks: Sequence[AttackSpec], threat: ThreatModel, *, batch_size: int, seed: int, defense: str,
              classifier: str, dataset: str, data_source: str, data_hash: str, surrogate: nn.Module | None,
              checkpoint: str | Path | None, progress: bool) -> EvalRecord:
    device = images.device
    labels = labels.to(device)
    n = images.shape[0]
    main = distributed.is_main()
    # A random pipeline draws from the global random state: seeded per batch (and given back),
    # so that a batch's draws do not depend on what ran before it, nor on which rank runs it.
    with distributed.seeded(distributed.batch_seed(seed, -1, 0), device):
        clean_labels = predict(model, images, batch_size)
    clean_correct = clean_labels == labels
    clean_reject = clean_labels == REJECT
    robust = clean_correct.clone()

    key = config_hash({"attacks": [a.to_dict() for a in attacks], "threat": threat.to_dict(),
                       "n": n, "seed": seed, "labels": labels.tolist()[:50]})
    done: list[dict] = []
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt:  # read by rank 0, which alone writes it
        state = distributed.read_on_main(ckpt, lambda p: json.loads(p.read_text()))
        if state is not None and state.get("key") == key:
            robust = flags_from_string(state["flags"], device)
            done = state["results"]
            logger.info("resumed evaluation from %s after %d attack(s)", ckpt, len(done))

    results: list[AttackResult] = []
    for index, spec in enumerate(attacks):
        attack_threat = spec.threat or threat
        if index < len(done):
            r = done[index]
            results.append(AttackResult(r["name"], r["settings"], r["threat"], r["newly_fooled"],
                                        Accuracy(**{k: r["accuracy_after"][k] for k in ("correct", "n")}),
                                        r["seconds"], r.get("peak_memory_mb")))
            continue
        if not registry.get_attack(spec.name).applies_to(model):
            results.append(AttackResult(spec.title, {**spec.params, "wrap": spec.wrap,
                                                     "skipped": "not applicable to this pipeline"},
                                        attack_threat.to_dict(), 0, Accuracy.from_flags(robust), 0.0))
            logger.info("%-40s skipped: not applicable to %s", spec.title, type(model).__name__)
            continue
        attack_model = adapt_model(model, spec, surrogate)
        start, before = time.perf_counter(), int(robust.sum())
        todo = robust.nonzero().squeeze(1)
        batches = todo.split(batch_size) if todo.numel() else ()
        # Under torchrun the batches are dealt to the ranks; each batch keeps its images and seeds.
        for b in tqdm(distributed.my_batches(len(batches)), desc=spec.title[:40],
                      disable=not (progress and main), leave=False):
            idx = batches[b]
            x, y = images[idx], labels[idx]
            with distributed.seeded(distributed.batch_seed(seed, index, b), device):
                x_adv = craft(attack_model, spec, x, y, attack_threat, attack_generator(seed, index, b))
                robust[idx] = handled(predict(model, x_adv, batch_size), y)
        robust = distributed.all_and(robust)  # each rank lowered only the flags of its batches
        peak = _peak_rss_mb()
        result = AttackResult(spec.title, {**spec.params, "wrap": spec.wrap}, attack_threat.to_dict(),
                              before - int(robust.sum()), Accuracy.from_flags(robust),
                              distributed.all_max(time.perf_counter() - start),
                              None if peak is None else distributed.all_max(peak))
        results.append(result)
        logger.info("%-40s robust %s  (%.1fs)", spec.title, result.accuracy_after.format(), result.seconds)
        if ckpt and main:
            write_json_atomic(ckpt, {"key": key, "flags": flags_to_string(robust),
                                     "results": [r.to_dict() for r in results]})

    return EvalRecord(
        defense=defense, classifier=classifier, dataset=dataset, data_source=data_source,
        data_hash=data_hash, threat=threat.to_dict(), n=n, seed=seed,
        clean=Accuracy.from_flags(clean_correct), robust=Accuracy.from_flags(robust),
        attacks=results, robust_flags=flags_to_string(robust),
        clean_reject_rate=float(clean_reject.float().mean()) if getattr(model, "detector", None) is not None else None,
    )
