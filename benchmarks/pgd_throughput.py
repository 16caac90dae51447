"""PGD throughput: aeshield's ``pgd`` against ``torchattacks.PGD`` on the same model and batch.

Run with ``make bench`` or ``.venv/bin/python benchmarks/pgd_throughput.py [--batch 256 ...]``.

Both attacks see the same model, the same test images, the same budget (L-inf eps 0.3, step
0.01, 40 steps, one random start, fp32) and the same number of torch threads; ``--threads 1,2``
(the default) measures each count in turn in one invocation (``torch.set_num_threads``). The
runs are interleaved (the order rotates every repeat) so that every attack sees the same
machine state, each attack is warmed up with a short run, and the median of ``--repeats`` timed
runs is reported as images x steps per second, with the ratio at each thread count.
``--profile STEPS`` adds torch.profiler's table of the top operators of both sides.

Three rows:
  * ``aeshield pgd (early_stop=False)``: every example does every step, like torchattacks; the
    fair speed comparison.
  * ``torchattacks.PGD``: the reference point.
  * ``aeshield pgd default (early_stop=True)``: what aeshield runs by default; examples stop
    once fooled, so its "images x steps / s" is the nominal budget (batch x steps) divided by
    the time, not the gradients actually computed (the ``grad images`` column says those).

Robust accuracy is printed for every row, so that speed is not bought with weakness.

The model: ``--weights PATH``, else shipped weights for ``--model`` if aeshield ships any
(``aeshield.models.io``; ``--model`` defaults to mnist-b), else a quick natural training (1
epoch over 10k MNIST training images, Adam, fixed seed; a few tens of seconds), which
``autoattack_fidelity.py`` reuses.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aeshield.attacks import pgd
from aeshield.data import load_dataset
from aeshield.models import MODELS, create_model
from aeshield.models import io as model_io


# --------------------------------------------------------------------------------------------
# Shared helpers (autoattack_fidelity.py imports these)
# --------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_line(threads: int) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"date {_dt.datetime.now().isoformat(timespec='seconds')} | torch {torch.__version__} | "
            f"threads {threads} (torch.set_num_threads) | CPU {cpu_name()} x{os.cpu_count()} | "
            f"load avg (1 min) {load:.2f}")


def quick_train(name: str, *, n_train: int = 10_000, epochs: int = 1, batch: int = 128,
                lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """Natural training of ``name`` on the first ``n_train`` of a seeded permutation of MNIST train."""
    spec = MODELS[name]
    train = load_dataset(spec.dataset, "train")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    idx = torch.randperm(len(train.labels), generator=gen)[:n_train]
    model.train()
    for _ in range(epochs):
        order = idx[torch.randperm(len(idx), generator=gen)]
        for start in range(0, len(order), batch):
            b = order[start:start + batch]
            opt.zero_grad()
            F.cross_entropy(model(train.images[b]), train.labels[b]).backward()
            opt.step()
    return model.eval()


def get_model(name: str, weights: str | None = None, log: Callable[[str], None] = print) -> nn.Module:
    """The model to attack, in eval mode with its parameters frozen (attacks need input
    gradients only): ``weights``, else shipped weights for ``name``, else a quick training run."""
    return _find_model(name, weights, log).eval().requires_grad_(False)


def _find_model(name: str, weights: str | None, log: Callable[[str], None]) -> nn.Module:
    if weights:
        model, side = model_io.load_weights(weights, architecture=name)
        log(f"model: {name} with weights {weights} ({side.get('dataset')})")
        return model.eval()
    shipped = sorted(model_io.shipped_dir().glob("*.safetensors")) if model_io.shipped_dir().exists() else []
    for path in shipped:
        try:
            side = model_io.read_sidecar(path)
        except Exception:  # a shipped file without a readable sidecar is not ours to judge here
            continue
        if side.get("architecture") == name:
            model, _ = model_io.load_weights(path, architecture=name)
            log(f"model: {name} with shipped weights {path.name}")
            return model.eval()
    t0 = time.perf_counter()
    model = quick_train(name)
    log(f"model: {name}, no shipped weights; trained here: 1 epoch, 10k MNIST train images, "
        f"Adam lr 1e-3, batch 128, seed 0 ({time.perf_counter() - t0:.1f} s)")
    return model


def test_batch(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_dataset(MODELS[name].dataset, "test")
    return test.images[:n].contiguous(), test.labels[:n].contiguous()


@torch.no_grad()
def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def linf(x_adv: torch.Tensor, x: torch.Tensor) -> float:
    return (x_adv - x).abs().flatten(1).amax(1).max().item()


class CountingModel(nn.Module):
    """Counts the images that go through forward passes that build a graph (gradient steps)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.grad_images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_images += x.shape[0]
        return self.model(x)


# --------------------------------------------------------------------------------------------

FAIR = "aeshield pgd (early_stop=False)"
PEER = "torchattacks.PGD"
DEFAULT = "aeshield pgd default (early_stop=True)"


def thread_counts(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``: the ``torch.set_num_threads`` values to measure, in order."""
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads takes integers separated by commas, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--threads takes integers >= 1, got {text!r}")
    return counts


def make_attacks(model: nn.Module, args: argparse.Namespace, steps: int
                 ) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    import torchattacks  # the bench extra; imported late so --help works without it

    ta_pgd = torchattacks.PGD(model, eps=args.eps, alpha=args.step_size, steps=steps, random_start=True)
    kw = dict(eps=args.eps, step_size=args.step_size, steps=steps, restarts=1, random_start=True)
    return {
        FAIR: lambda a, b: pgd(model, a, b, early_stop=False, **kw),
        PEER: lambda a, b: ta_pgd(a, b),
        DEFAULT: lambda a, b: pgd(model, a, b, early_stop=True, **kw),
    }


def measure(model: CountingModel, base: nn.Module, x: torch.Tensor, y: torch.Tensor,
            args: argparse.Namespace, threads: int) -> float:
    """One table at ``threads``; returns the fair ratio (torchattacks time / aeshield time)."""
    torch.set_num_threads(threads)
    print(f"\n## threads {threads}: {environment_line(threads)}")
    # Warm-up: a short run of each (first-call allocations, oneDNN primitives for these shapes).
    for attack in make_attacks(model, args, min(args.steps, 3)).values():
        torch.manual_seed(0)
        attack(x, y)
    attacks = make_attacks(model, args, args.steps)
    names = list(attacks)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    grads: dict[str, int] = {}
    results: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: same machine state
        for name in order:
            torch.manual_seed(0)  # torchattacks draws its random start from the global RNG
            model.grad_images = 0
            t0, c0 = time.perf_counter(), time.process_time()
            x_adv = attacks[name](x, y)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            grads[name] = model.grad_images
            results[name] = x_adv

    nominal = args.batch * args.steps
    header = f"| {'attack':40s} | {'median s':>8s} | {'runs (s)':>26s} | {'img*steps/s':>11s} | " \
             f"{'grad images':>11s} | {'robust acc':>10s} | {'max Linf':>8s} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    med = {n: statistics.median(times[n]) for n in names}
    for name in names:
        robust = correct(base, results[name], y).float().mean().item()
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name:40s} | {med[name]:8.2f} | {runs:>26s} | {nominal / med[name]:11.0f} | "
              f"{grads[name]:11d} | {robust:10.2%} | {linf(results[name], x):8.4f} |")
    fair = med[PEER] / med[FAIR]
    paired = sorted(p / a for p, a in zip(times[PEER], times[FAIR]))
    default = med[PEER] / med[DEFAULT]
    by_cpu = statistics.median(cpu[PEER]) / statistics.median(cpu[FAIR])
    print(f"threads {threads}: throughput ratio aeshield/torchattacks (early_stop=False, same work): {fair:.2f}x "
          f"(per repeat {paired[0]:.2f}-{paired[-1]:.2f}x; by process CPU time {by_cpu:.2f}x)")
    print(f"threads {threads}: throughput ratio aeshield default (early_stop=True)/torchattacks: {default:.2f}x")
    return fair


def profile(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
            threads: int, steps: int, rows: int = 12) -> None:
    """torch.profiler's table of the top operators (self CPU time) of one run of each side."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(threads)
    attacks = make_attacks(model, args, steps)
    print(f"\n## profile, threads {threads}, {steps} steps (one run each, after a warm-up run)")
    for name in (FAIR, PEER):
        torch.manual_seed(0)
        attacks[name](x, y)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            torch.manual_seed(0)
            attacks[name](x, y)
        print(f"\n### {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                        max_name_column_width=40))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256, help="test images attacked at once")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--step-size", type=float, default=0.01)
    p.add_argument("--threads", type=thread_counts, default=[1, 2],
                   help="torch.set_num_threads values, comma-separated, measured in turn (default 1,2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per attack (median)")
    p.add_argument("--model", default="mnist-b")
    p.add_argument("--weights", default=None, help=".safetensors file (else shipped or trained)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also print torch.profiler's top operators of both sides, for a run of STEPS steps")
    args = p.parse_args(argv)

    import torchattacks

    print(f"# PGD throughput, {environment_line(args.threads[0])}")
    print(f"# torchattacks {torchattacks.__version__}")
    base = get_model(args.model, args.weights)
    model = CountingModel(base).eval()
    x, y = test_batch(args.model, args.batch)
    clean = correct(model, x, y).float().mean().item()
    print(f"# batch {args.batch} test images, clean accuracy {clean:.2%}; Linf eps {args.eps}, "
          f"step {args.step_size}, {args.steps} steps, 1 random start; fp32; median of {args.repeats} "
          f"interleaved runs, warm-up excluded")
    ratios = {t: measure(model, base, x, y, args, t) for t in args.threads}
    if args.profile:
        for t in args.threads:
            profile(model, x, y, args, t, args.profile)
    print()
    print(f"summary {args.model}: aeshield/torchattacks at the same work: "
          + ", ".join(f"{r:.2f}x at {t} thread{'s' if t > 1 else ''}" for t, r in ratios.items()))
    print("(img*steps/s = batch x steps / median time; for early_stop=True that is the nominal "
          "budget, 'grad images' counts the gradient evaluations actually done)")


if __name__ == "__main__":
    main()
