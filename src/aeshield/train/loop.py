"""One training loop for classifiers, adversarial training and autoencoder shields.

It shuffles with a seeded generator, checkpoints every few steps (modules, optimizer,
scheduler, random states, history, the running sums of the current epoch's metrics and the
early-stopping count) and resumes from the last checkpoint so that a killed run ends exactly
where an uninterrupted one would, with the same weights and the same history. Learning rate
drops on a validation plateau; training stops early after ``patience`` epochs without
improvement and keeps the best weights. A checkpoint write killed half-way (SIGKILL) leaves a
temporary file beside the checkpoint; the next run over that checkpoint removes it.

Started by ``torchrun`` (``aeshield.distributed``), the loop is data-parallel: ``batch_size`` is
the global batch, each rank takes its interleaved share of it (``DistributedSampler`` over the
permutation one process uses), the gradients are averaged before each update, rank 0 alone
writes checkpoints and logs, and a checkpoint resumes on any number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..errors import ConfigError
from ..io import remove_temporaries, write_atomic
from ..models.fast_conv import fast_input_gradients

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str, owner: str) -> None:
    """``precision`` is one of :data:`PRECISIONS` (``owner``: the config named in the error)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{owner}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict]]
ValFn = Callable[[], dict]


class Stateful(Protocol):
    """Anything checkpointed beside the modules (e.g. a counter kept by a step function)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


@dataclass(frozen=True)
class LoopConfig:
    epochs: int = 3
    batch_size: int = 128
    seed: int = 0
    checkpoint_every: int = 100  # optimizer steps
    plateau_patience: int = 5  # epochs without val improvement before the lr drops
    plateau_factor: float = 0.5
    early_stop_patience: int | None = None
    val_metric: str = "val_loss"  # lower is better
    max_steps: int | None = None  # stop after this many steps in total (a crash stand-in for tests)
    # "bfloat16": each step's forward passes (the attack's and the loss's) run under autocast;
    # the weights, their gradients and the optimizer stay float32 (see ``precision_context``).
    precision: str = "float32"

    def __post_init__(self) -> None:
        check_precision(self.precision, type(self).__name__)


@dataclass
class LoopResult:
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    best_epoch: int = -1
    best_metric: float = math.inf
    finished: bool = False


def _save_checkpoint(path: Path, modules: Mapping[str, nn.Module], optimizer, scheduler,
                     gen: torch.Generator, state: dict, extra: Mapping[str, Stateful] | None = None) -> None:
    # Every rank builds the payload (an extra state may gather from the ranks); rank 0 writes it.
    payload = {
        "modules": {k: m.state_dict() for k, m in modules.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "state": state,
        "extra": {k: v.state_dict() for k, v in (extra or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # sampling on the GPU (e.g. a VAE's z)
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    if distributed.is_main():
        write_atomic(path, lambda tmp: torch.save(payload, tmp))


def fit(modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer, step_fn: StepFn,
        x: torch.Tensor, y: torch.Tensor, config: LoopConfig, *, val_fn: ValFn | None = None,
        checkpoint: str | Path | None = None, progress: bool = True,
        trainable: Mapping[str, nn.Module] | None = None,
        extra: Mapping[str, Stateful] | None = None) -> LoopResult:
    """Run ``step_fn`` over shuffled mini-batches of ``(x, y)`` for ``config.epochs`` epochs.

    ``modules`` are checkpointed; ``trainable`` (default: all of ``modules``) are put in train
    mode for each step and restored to their best validation weights at the end. ``extra``
    state (anything with ``state_dict``/``load_state_dict``) is checkpointed and restored too
    (a checkpoint written without it leaves it as it is).
    """
    trainable = dict(trainable if trainable is not None else modules)
    world = distributed.world()
    if world.distributed and config.batch_size % world.size:
        raise ConfigError(f"batch size {config.batch_size} is the global batch, which {world.size} ranks "
                          f"cannot share evenly: use a multiple of {world.size}")
    progress = progress and world.main
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience)
    gen = torch.Generator().manual_seed(config.seed)
    # Only for dropout and a VAE's samples (attacks use their own generators); each rank its own.
    torch.manual_seed(config.seed + world.rank)
    result = LoopResult()
    start_epoch, start_step = 0, 0
    best_state: dict | None = None
    ckpt = Path(checkpoint) if checkpoint else None
    # Metrics summed over the current epoch's steps so far (and how many): checkpointed, so that
    # a resumed epoch's averages cover all its steps, not only those after the resume.
    sums: dict[str, float] = {}
    counted = 0
    stale = 0  # epochs without improvement, for early stopping
    if ckpt and world.main:
        for tmp in remove_temporaries(ckpt):  # a checkpoint write killed half-way
            logger.info("removed %s, left by a run killed while writing its checkpoint", tmp)
    # Rank 0 reads the checkpoint and hands it to the others (no shared disk needed).
    payload = distributed.read_on_main(
        ckpt, lambda p: torch.load(p, map_location="cpu", weights_only=True)) if ckpt else None
    if payload is not None:
        for k, m in modules.items():
            m.load_state_dict(payload["modules"][k])
        optimizer.load_state_dict(payload["optimizer"])
        if payload["scheduler"]:
            scheduler.load_state_dict(payload["scheduler"])
        gen.set_state(payload["generator"])
        torch.set_rng_state(payload["torch_rng"])
        if world.rank:  # rank 0's global state was saved; the others draw their own
            torch.manual_seed(config.seed + world.rank + 104_729 * payload["state"]["steps"])
        if "cuda_rng" in payload and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["cuda_rng"])
        for k, v in (extra or {}).items():
            if k in payload.get("extra", {}):
                v.load_state_dict(payload["extra"][k])
        st = payload["state"]
        start_epoch, start_step = st["epoch"], st["step_in_epoch"]
        sums, counted, stale = dict(st.get("sums", {})), st.get("counted", 0), st.get("stale", 0)
        result.history, result.steps = st["history"], st["steps"]
        result.best_epoch, result.best_metric = st["best_epoch"], st["best_metric"]
        best_state = payload["modules"].get("__best__") if "__best__" in payload["modules"] else None
        if st.get("finished"):
            if best_state is not None:
                for k, m in trainable.items():
                    m.load_state_dict(best_state[k])
            result.finished = True
            return result
        logger.info("resumed from %s at epoch %d step %d", ckpt, start_epoch, start_step)

    with distributed.data_parallel(trainable, optimizer):
        n = x.shape[0]
        steps_per_epoch = math.ceil(n / config.batch_size)
        for epoch in range(start_epoch, config.epochs):
            # The permutation is a pure function of (seed, epoch): a resumed run sees the same order.
            batches = _epoch_batches(n, config, epoch)
            first = start_step if epoch == start_epoch else 0
            if first == 0:
                sums, counted = {}, 0
            bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}",
                       disable=not progress, leave=False)
            for step in bar:
                idx = batches[step].to(x.device)
                for m in trainable.values():
                    m.train()
                # the step's attack and its loss both differentiate the frozen classifier's input
                with distributed.global_batch(idx.numel() * world.size), fast_input_gradients():
                    with precision_context(config.precision, x.device):
                        loss, metrics = step_fn(x[idx], y[idx], gen)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                result.steps += 1
                counted += 1
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                done_now = config.max_steps is not None and result.steps >= config.max_steps
                if ckpt and (result.steps % config.checkpoint_every == 0 or done_now):
                    sums = distributed.mean_over_ranks(sums)
                    _save_checkpoint(ckpt, _with_best(modules, best_state), optimizer, scheduler, gen, {
                        "epoch": epoch, "step_in_epoch": step + 1, "history": result.history,
                        "steps": result.steps, "best_epoch": result.best_epoch,
                        "best_metric": result.best_metric, "sums": dict(sums), "counted": counted,
                        "stale": stale}, extra)
                if done_now:
                    return result
            for m in trainable.values():
                m.eval()
            sums = distributed.mean_over_ranks(sums)  # each rank summed its own share's metrics
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                      **{f"train_{k}": v / max(1, counted) for k, v in sums.items()}}
            if val_fn is not None:
                record.update(val_fn())
            result.history.append(record)
            logger.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                                                             if isinstance(v, float)))
            metric = record.get(config.val_metric)
            if metric is not None:
                scheduler.step(metric)
                if metric < result.best_metric:
                    result.best_metric, result.best_epoch, stale = float(metric), epoch + 1, 0
                    best_state = {k: copy.deepcopy(m.state_dict()) for k, m in trainable.items()}
                else:
                    stale += 1
            stop = config.early_stop_patience is not None and stale >= config.early_stop_patience
            last = stop or epoch + 1 == config.epochs
            if ckpt:
                _save_checkpoint(ckpt, _with_best(modules, best_state), optimizer, scheduler, gen, {
                    "epoch": epoch + 1, "step_in_epoch": 0, "history": result.history,
                    "steps": result.steps, "best_epoch": result.best_epoch,
                    "best_metric": result.best_metric, "finished": last, "stale": stale}, extra)
            if stop:
                logger.info("early stop after epoch %d (best epoch %d)", epoch + 1, result.best_epoch)
                break
        if best_state is not None:
            for k, m in trainable.items():
                m.load_state_dict(best_state[k])
        for m in trainable.values():
            m.eval()
        result.finished = True
        return result


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for a training step: ``"bfloat16"`` runs matrix products and convolutions
    in bfloat16 (autocast; losses and reductions stay float32, and bfloat16's float32 exponent
    range needs no loss scaling); ``"float32"`` changes nothing. On a CPU with AVX512-BF16 an
    AAA update behind mnist-a ran 1.7x faster, behind mnist-b 1.25x (docs/dev/fast-training.md).
    Evaluation never runs under it: a bfloat16 PGD measured weaker (same document)."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _epoch_batches(n: int, config: LoopConfig, epoch: int) -> tuple[torch.Tensor, ...]:
    """This rank's batches of an epoch: the seeded permutation in ``batch_size`` slices, or under
    torchrun each rank's interleaved share of them (``DistributedSampler`` draws the same
    permutation from the same seed; it pads the epoch to a multiple of the ranks by repeating
    its first images, so with a number of images the ranks do not divide, a few are seen twice)."""
    world = distributed.world()
    seed = config.seed * 7919
    if not world.distributed:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).split(config.batch_size)
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long).split(config.batch_size // world.size)


def _with_best(modules: Mapping[str, nn.Module], best_state: dict | None) -> dict:
    if best_state is None:
        return dict(modules)
    holder = _StateHolder(best_state)
    return {**modules, "__best__": holder}


class _StateHolder:
    """Lets the best weights travel inside the checkpoint's ``modules`` dict."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state
