"""A short measurement of the training attack schedules (issue 26), not the benchmark: AAA in
front of the shipped mnist-b on MNIST, one shield per schedule at about the same training wall
time, then clean and PGD-40 (step 0.01, one random start) accuracy on 500 test images.

    OMP_NUM_THREADS=2 python scripts/measure_schedules.py --threads 2

Each schedule gets a share of the first 10,000 training images sized to the same budget from
the per-minibatch costs measured beforehand (``--images``); prints one JSON line per schedule.

Measured 2026-12-05 at 451f73f, 2 threads on a 2-core machine shared with other jobs (load
average 4-6, so wall times are inflated and not comparable between runs to better than ~2x),
conv-ae, batch 32, lr 0.01, eps 0.3, PGD-10 step 0.03 for "pgd", fast factor 1.25, free m=4;
passes = forward-backward passes of a 32-image batch through G and mnist-b:

    schedule  images x epochs  updates  passes  train wall  clean  PGD-40 (n=500)
    pgd       2,800 x 1           88     968      271 s     96.0%   35.6%
    fast      10,000 x 1         313     626      143 s     97.4%   24.4%
    fast      10,000 x 2         626    1252      475 s     97.8%   37.0%
    free      6,000 x 1 (m=4)    752     752      291 s     97.4%    0.4%

(the guard's checks, PGD-10 on 256 training images, never fired; the last fast run shared
the cores with a test run for part of its time.)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import aeshield
from aeshield.attacks.gradient import pgd
from aeshield.data import load_dataset
from aeshield.defenses.aaa import AAAConfig, train_aaa
from aeshield.defenses.base import Shielded
from aeshield.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", default="pgd=2800,fast=10000,free=6000",
                        help="training images per schedule, NxE for E epochs (default 1)")
    parser.add_argument("--replays", type=int, default=4)
    parser.add_argument("--test-n", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    x_test, y_test = test.images[:args.test_n], test.labels[:args.test_n]
    classifier = aeshield.load_classifier("mnist-b")
    for item in args.images.split(","):
        schedule, size = item.split("=")
        n, _, epochs = size.partition("x")
        config = AAAConfig(epochs=int(epochs or 1), batch_size=32, lr=0.01, attack_steps=10, step_size=0.03, seed=0,
                           schedule=schedule, replays=args.replays)
        torch.manual_seed(0)
        g = create_model("conv-ae")
        start = time.perf_counter()
        result = train_aaa(g, [classifier], train.images[:int(n)], train.labels[:int(n)], config, progress=False)
        wall = time.perf_counter() - start
        model = Shielded(g.eval(), classifier).eval()
        start = time.perf_counter()
        with torch.no_grad():
            clean = float((model(x_test).argmax(1) == y_test).float().mean())
        x_adv = pgd(model, x_test, y_test, eps=0.3, step_size=0.01, steps=40, restarts=1,
                    generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            robust = float((model(x_adv).argmax(1) == y_test).float().mean())
        guard = [{k: round(v, 3) for k, v in h.items() if k.startswith("guard")} for h in result.history]
        updates = (int(n) + 31) // 32 * config.epochs * (args.replays if schedule == "free" else 1)
        print(json.dumps({"schedule": schedule, "train_images": int(n), "epochs": config.epochs, "updates": updates,
                          "train_wall_s": round(wall, 1), "clean": clean, "pgd40": robust,
                          "eval_wall_s": round(time.perf_counter() - start, 1), "guard": guard,
                          "threads": args.threads}), flush=True)


if __name__ == "__main__":
    main()
