"""Several processes, one job: aeshield on ``torch.distributed`` (started with ``torchrun``).

A command started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address) joins the process group with :func:`init`: gloo on the CPU, NCCL on GPUs.
Then

- training (``train.loop.fit``) gives each rank its share of every global batch (a
  ``DistributedSampler`` over the same seeded permutation as one process), averages the
  gradients over the ranks before each update (:func:`data_parallel`), checkpoints from rank 0
  and resumes on any number of ranks;
- evaluation (``eval.harness.evaluate``, hence the audit) deals each attack's batches to the
  ranks and gathers the per-example flags, so its record is the one a single process writes;
- ``reproduce`` runs each training job and each cell on one rank (:func:`alone` turns the
  collectives off inside it).

Why the results do not depend on the number of ranks: an evaluation keeps its batches (the
same images, the same seeded generator per batch: :func:`batch_seed`), and only which process
runs a batch changes; a training step's global batch is the same set of images, the gradients
are averaged over it, and the per-example random draws of a step (a random start, a flip) are
drawn for the whole global batch and sliced (:func:`rows_rand`), as one process draws them.

Nothing here is needed by a single-process run: without ``torchrun`` every function is the
identity, and ``world()`` is one rank.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# A collective waits this long for a peer before it fails (a rank that died is noticed at once:
# gloo sees the closed connection, and torchrun stops the others). Long, because a peer may be
# busy for hours: a slow batch of a long attack, or under ``reproduce`` a training job of its
# own while this rank waits at the barrier after its level.
TIMEOUT_SECONDS = float(os.environ.get("AESHIELD_DIST_TIMEOUT", 24 * 3600))


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes (``local_rank`` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_SINGLE = World()
_alone = 0  # depth of ``alone()`` blocks
# Set by ``init``: aeshield shares its work only over a process group it was told to use, so a
# program that made its own group and calls aeshield on one rank does not wait for the others.
_joined = False


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting
    ``WORLD_SIZE``) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | torch.device = "cpu") -> World:
    """Join the process group ``torchrun`` describes: NCCL when ``device`` is CUDA (each rank on
    GPU ``LOCAL_RANK``), gloo otherwise. A no-op when not launched by torchrun; a program that
    initialised its own default group calls it to let aeshield share its work over that group
    (until then aeshield works as one process on each rank). Returns the world."""
    import torch.distributed as dist

    global _joined
    if not launched():
        return world()
    if dist.is_initialized():  # the caller's own group: share aeshield's work over it from now on
        _joined = True
        return world()
    cuda = torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
    atexit.register(_leave)
    _joined = True
    w = world()
    if not w.main:  # one log, one progress bar: rank 0's
        logging.getLogger("aeshield").setLevel(logging.WARNING)
    logger.info("joined a process group of %d ranks (%s)", w.size, backend)
    return w


def _leave() -> None:
    """At exit, while the interpreter is still whole: destroy a gloo group, and let gloo's
    worker threads finish releasing their last collective. A worker thread drops a finished
    collective's tensors after the caller has moved on, and that needs the GIL; caught by the
    interpreter's teardown, it is killed mid-destructor and the rank aborts (``terminate called
    without an active exception``, SIGABRT, about one 2-rank run in 15 here) after its work is
    done, failing the whole torchrun job. A NCCL group is left alone: destroying it on a rank
    that stops on an error while its peers wait in a collective can hang the job."""
    import time

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        dist.destroy_process_group()
    time.sleep(0.05)  # releases the GIL to a worker thread waiting for it


def world() -> World:
    """This process's place in the job: one rank of one until :func:`init` has joined a process
    group, and inside :func:`alone`."""
    import torch.distributed as dist

    if _alone or not _joined or not (dist.is_available() and dist.is_initialized()):
        return _SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 dist.get_backend())


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs and writes."""
    return world().main


def device_of_rank(device: str | torch.device) -> torch.device:
    """``device`` with a CUDA index replaced by this rank's GPU (``LOCAL_RANK``)."""
    device = torch.device(device)
    if device.type == "cuda" and world().distributed:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside, this process works as if it were the only one (no collectives): ``reproduce``
    runs each job and cell on one rank this way."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def barrier() -> None:
    if world().distributed:
        import torch.distributed as dist

        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if world().backend == "nccl" else torch.device("cpu")


def all_and(flags: torch.Tensor) -> torch.Tensor:
    """Per element, true on every rank (a bool tensor of the same shape on each rank)."""
    if not world().distributed:
        return flags
    import torch.distributed as dist

    t = flags.to(_collective_device(), torch.uint8)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.to(flags.device).bool()


def all_max(value: float) -> float:
    """The largest of one number per rank (wall time of a step all ranks took part in)."""
    if not world().distributed:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a checkpoint's state, read once from rank 0's disk)."""
    if not world().distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device() if world().backend == "nccl" else None)
    return box[0]


def read_on_main(path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)`` on rank 0, handed to every rank (None when the file does not exist): a
    checkpoint that rank 0 alone writes, read without a disk the ranks share."""
    return broadcast_object(read(path) if is_main() and path.exists() else None)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (on one rank: ``[obj]``)."""
    w = world()
    if not w.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """The global batch of per-example rows from each rank's interleaved share (rank ``r`` holds
    rows ``r, r + W, ...``): the inverse of ``global[rank::W]``. Every rank holds as many rows."""
    w = world()
    if not w.distributed:
        return local
    import torch.distributed as dist

    parts = [torch.empty_like(local, device=_collective_device()) for _ in range(w.size)]
    dist.all_gather(parts, local.to(_collective_device()).contiguous())
    stacked = torch.stack([p.to(local.device) for p in parts], dim=1)  # (rows, W, ...)
    return stacked.reshape(-1, *local.shape[1:])


def my_rows(full: torch.Tensor) -> torch.Tensor:
    """This rank's interleaved share of a global batch's rows (``full[rank::W]``)."""
    w = world()
    return full[w.rank::w.size] if w.distributed else full


# ---- per-example draws of a training step ----------------------------------------------------
_step_rows: list[int] = []  # the global batch size of the step running now, if sharded


@contextlib.contextmanager
def global_batch(rows: int) -> Iterator[None]:
    """While a sharded training step runs: its global batch has ``rows`` examples, of which this
    rank holds ``rows // W`` (interleaved)."""
    _step_rows.append(rows)
    try:
        yield
    finally:
        _step_rows.pop()


def _draw_rows(draw: Callable[..., torch.Tensor], shape: torch.Size | tuple[int, ...],
               generator: torch.Generator | None, **kwargs) -> torch.Tensor:
    w = world()
    shape = tuple(shape)
    if _step_rows and w.distributed and shape and shape[0] * w.size == _step_rows[-1]:
        full = draw((_step_rows[-1], *shape[1:]), generator=generator, **kwargs)
        return full[w.rank::w.size]
    return draw(shape, generator=generator, **kwargs)


def rows_rand(shape, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """``torch.rand(shape, generator=...)`` whose rows are examples: in a sharded training step,
    drawn for the whole global batch and sliced to this rank's rows, so each example gets the
    numbers one process would give it and the generator moves as one process's does."""
    return _draw_rows(torch.rand, shape, generator, **kwargs)


def rows_randn(shape, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """``torch.randn`` as :func:`rows_rand` draws ``torch.rand``."""
    return _draw_rows(torch.randn, shape, generator, **kwargs)


def rows_randint(low: int, high: int, shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.randint(low, high, shape)`` as :func:`rows_rand` draws ``torch.rand``."""
    return _draw_rows(lambda size, generator: torch.randint(low, high, size, generator=generator),
                      shape, generator)


# ---- evaluation ------------------------------------------------------------------------------
def batch_seed(seed: int, index: int, batch: int) -> int:
    """The global random state's seed for batch ``batch`` of attack ``index`` of an evaluation
    (index -1: the clean predictions): a random pipeline draws the same numbers for a batch
    whichever rank runs it, and whatever ran before. Offset from the attack's own generator
    seed, so that the pipeline's draws and the attack's random start are different streams."""
    return (seed * 1_000_003 + (index + 1) * 10_007 + batch + 7_919) % (2**63)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """The global random state seeded with ``seed`` inside, and given back as it was after."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def my_batches(count: int) -> range:
    """The indices of ``count`` batches this rank runs (dealt round-robin)."""
    w = world()
    return range(w.rank, count, w.size)


# ---- training ----------------------------------------------------------------------------------
def _flat_groups(tensors: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average each tensor over the ranks, in place: one all-reduce per dtype (a flat buffer)."""
    import torch.distributed as dist

    size = world().size
    for group in _flat_groups(tensors).values():
        flat = torch.cat([t.reshape(-1) for t in group]).to(_collective_device())
        dist.all_reduce(flat)
        flat /= size
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def _broadcast_(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values into each tensor, in place: one broadcast per dtype."""
    import torch.distributed as dist

    for group in _flat_groups(tensors).values():
        flat = torch.cat([t.reshape(-1) for t in group]).to(_collective_device())
        dist.broadcast(flat, src=0)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


@contextlib.contextmanager
def data_parallel(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Data-parallel training of ``modules`` by ``optimizer`` on every rank while the block
    runs (a no-op on one rank): the parameters and buffers start as rank 0's, and before each
    ``optimizer.step()`` the gradients of the optimizer's parameters are averaged over the ranks
    (one all-reduce of one flat buffer) and the buffers (BatchNorm's running statistics) are
    set to rank 0's. Frozen modules (a classifier behind a shield) are neither averaged nor
    touched.

    This is the gradient exchange of ``DistributedDataParallel``, placed at the optimizer step
    rather than in a forward wrapper, because aeshield's trainers do not fit the wrapper's
    contract of one forward through it per backward: an adversarial trainer runs many forwards
    of the same module per update (the attack), the "free" schedule makes several updates inside
    one step, and DBP's loss differentiates an input gradient (``create_graph``), which DDP does
    not support. What the ranks exchange, and the resulting weights, are the same.

    On GPUs (NCCL) BatchNorm becomes ``SyncBatchNorm``, whose batch statistics cover the global
    batch. Gloo has no SyncBatchNorm: on CPUs each rank normalises over its own share of the
    batch (so a shield with BatchNorm does not train exactly as one process does; one without
    does, up to rounding).
    """
    w = world()
    if not w.distributed:
        yield
        return
    for name, module in modules.items():
        if w.backend == "nccl" and nn.SyncBatchNorm.convert_sync_batchnorm(module) is not module:
            raise ValueError(f"{name}: a bare BatchNorm module cannot be trained on several ranks")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    buffers = [b for m in modules.values() for b in m.buffers()]
    with torch.no_grad():
        _broadcast_([p.data for p in params] + buffers)

    def average(opt, args, kwargs) -> None:
        with torch.no_grad():
            _all_reduce_mean_([p.grad for p in params if p.grad is not None])
            if buffers:
                _broadcast_(buffers)

    handle = optimizer.register_step_pre_hook(average)
    try:
        yield
    finally:
        handle.remove()


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (every rank passes the same keys)."""
    if not world().distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    _all_reduce_mean_([t])
    return {k: float(v) for k, v in zip(keys, t.tolist())}


__all__ = ["World", "TIMEOUT_SECONDS", "all_and", "all_gather_object", "all_max", "alone", "barrier",
           "batch_seed", "broadcast_object", "data_parallel", "device_of_rank", "gather_rows",
           "global_batch", "init", "is_main", "launched", "mean_over_ranks", "my_batches", "my_rows",
           "read_on_main", "rows_rand", "rows_randint", "rows_randn", "seeded", "world"]
