"""One process with two threads against two processes with one thread each (torchrun, gloo).

Run with ``.venv/bin/python benchmarks/distributed_throughput.py`` (about 5 minutes on two
cores with the defaults). Two workloads, each in both layouts, in one invocation:

  * ``PGD evaluation``: ``aeshield.evaluate`` with PGD-``--steps`` (L-inf 0.3, step 0.01, one
    start, ``early_stop=False`` so that every example does every step in both layouts) on
    ``--images`` MNIST test images in batches of ``--batch``; under torchrun the batches are dealt to
    the ranks and the flags gathered. Throughput: images x steps per second.
  * ``AAA training``: ``train_aaa`` of a ``conv-ae`` in front of ``--model`` (frozen) for one
    epoch over ``--train-images`` training images, global batch ``--train-batch``, PGD-
    ``--attack-steps`` per update, no warm-up and no validation; under torchrun each rank takes
    half of every global batch and the gradients are averaged before each update. Throughput:
    training images per second.

Each run is a fresh process (or a fresh torchrun job); the time is measured inside it, from a
barrier after loading the data and warming up (a short run of the same workload) to a barrier
after the work, so process start-up and data loading are left out. The layouts alternate (the
order rotates every repeat) and the median of ``--repeats`` runs is reported, with the ratio.
The robust accuracy of the evaluation (identical in both layouts, by construction) and the
weights' checksum of the training (identical up to rounding: gradients summed in another order)
are printed, so that speed is not bought with different work.

Also printed: what the ranks exchange per training update (the autoencoder's gradients, one
all-reduce) and per evaluation attack (the per-example flags), from which the note in
docs/dev/distributed.md sets out the expected scaling to 8 GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
LAYOUTS = {"1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}


def _worker(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(HERE.parent))
    from pgd_throughput import get_model, test_batch

    from aeshield import distributed
    from aeshield.data import load_dataset
    from aeshield.threat import ThreatModel

    torch.set_num_threads(args.threads)
    distributed.init()
    model = get_model(args.model, log=lambda _: None)
    result: dict = {"world": distributed.world().size, "threads": torch.get_num_threads()}
    if args.worker == "eval":
        from aeshield.eval.harness import AttackSpec, evaluate

        x, y = test_batch(args.model, args.images)
        cascade = [AttackSpec("pgd", {"steps": args.steps, "step_size": 0.01, "early_stop": False})]
        threat = ThreatModel("Linf", 0.3)
        evaluate(model, x[:args.batch * distributed.world().size], y[:args.batch * distributed.world().size],
                 [AttackSpec("pgd", {"steps": 2, "step_size": 0.01, "early_stop": False})], threat,
                 batch_size=args.batch, progress=False)  # warm-up
        distributed.barrier()
        start = time.perf_counter()
        record = evaluate(model, x, y, cascade, threat, batch_size=args.batch, progress=False)
        distributed.barrier()
        seconds = time.perf_counter() - start
        result.update(seconds=seconds, work=args.images * args.steps, robust=record.robust.format())
    else:
        from aeshield.defenses.aaa import AAAConfig, train_aaa
        from aeshield.models import create_model

        train = load_dataset("mnist", "train")
        x, y = train.images[:args.train_images], train.labels[:args.train_images]
        config = AAAConfig(eps=0.3, step_size=0.01, attack_steps=args.attack_steps, epochs=1,
                           batch_size=args.train_batch, warmup_steps=0, checkpoint_every=10**9)

        def shield():
            torch.manual_seed(0)
            return create_model("conv-ae")

        warm = shield()
        train_aaa(warm, [model], x[:2 * args.train_batch], y[:2 * args.train_batch], config, progress=False)
        autoencoder = shield()
        distributed.barrier()
        start = time.perf_counter()
        train_aaa(autoencoder, [model], x, y, config, progress=False)
        distributed.barrier()
        seconds = time.perf_counter() - start
        params = sum(p.numel() for p in autoencoder.parameters())
        checksum = float(sum(p.double().abs().sum() for p in autoencoder.parameters()))
        result.update(seconds=seconds, work=args.train_images, checksum=checksum,
                      gradient_bytes=4 * params, params=params,
                      exchange_ms=_exchange_ms(params) if distributed.world().distributed else None)
    if distributed.is_main():
        print("RESULT " + json.dumps(result), flush=True)


def _exchange_ms(numel: int, repeats: int = 50) -> float:
    """Median milliseconds of one all-reduce of ``numel`` float32 (a training update's exchange)."""
    import torch
    import torch.distributed as dist

    buffer = torch.ones(numel)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _run(workload: str, layout: tuple[int, int], args: argparse.Namespace) -> dict:
    processes, threads = layout
    command = [sys.executable, str(HERE), "--worker", workload, "--threads", str(threads),
               *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("worker", "threads", "repeats"))]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={processes}", *command[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{workload} on {layout} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=("eval", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mnist-b")
    parser.add_argument("--images", type=int, default=1000, help="test images (evaluation)")
    parser.add_argument("--batch", type=int, default=125, help="evaluation batch")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps (evaluation)")
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--train-batch", type=int, default=64, help="global batch (training)")
    parser.add_argument("--attack-steps", type=int, default=5, help="PGD steps per update (training)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)

    sys.path.insert(0, str(HERE.parent))
    from pgd_throughput import environment_line

    print(environment_line(2))
    print(f"model {args.model}; evaluation: {args.images} test images, batch {args.batch}, PGD-{args.steps} "
          f"(early_stop=False); training: AAA conv-ae, {args.train_images} images, global batch "
          f"{args.train_batch}, PGD-{args.attack_steps} per update; median of {args.repeats}")
    names = list(LAYOUTS)
    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeats):
        order = names[repeat % 2:] + names[:repeat % 2]
        for workload in ("eval", "train"):
            for name in order:
                runs.setdefault((workload, name), []).append(_run(workload, LAYOUTS[name], args))
    units = {"eval": "images x steps / s", "train": "training images / s"}
    titles = {"eval": "PGD evaluation", "train": "AAA training"}
    print("\n| workload | layout | throughput | runs (s) | check |\n|---|---|---:|---|---|")
    medians = {}
    for workload in ("eval", "train"):
        for name in names:
            rs = runs[(workload, name)]
            seconds = statistics.median(r["seconds"] for r in rs)
            medians[(workload, name)] = rs[0]["work"] / seconds
            check = rs[0].get("robust") or f"weights checksum {rs[0]['checksum']:.6f}"
            print(f"| {titles[workload]} | {name} | {medians[(workload, name)]:,.0f} {units[workload]} | "
                  f"{', '.join(format(r['seconds'], '.1f') for r in rs)} | {check} |")
    print()
    for workload in ("eval", "train"):
        ratio = medians[(workload, names[1])] / medians[(workload, names[0])]
        print(f"{titles[workload]}: 2 processes x 1 thread give {ratio:.2f}x the throughput of "
              f"1 process x 2 threads")
    train = runs[("train", names[1])][0]
    steps = -(-args.train_images // args.train_batch)
    exchange = statistics.median(r["exchange_ms"] for r in runs[("train", names[1])])
    seconds = statistics.median(r["seconds"] for r in runs[("train", names[1])])
    print(f"\nexchanged per training update: the conv-ae's gradients, {train['params']:,} float32 = "
          f"{train['gradient_bytes'] / 1e6:.2f} MB in one all-reduce, {exchange:.2f} ms here (gloo, "
          f"localhost, median of 50), against {1000 * seconds / steps:.0f} ms per update on 2 processes "
          f"({steps} updates in the run); per evaluation attack: {args.images} per-example flags "
          f"(1 byte each) in one all-reduce")


if __name__ == "__main__":
    main()
