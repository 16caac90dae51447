"""AutoAttack fidelity: the reference implementation (pyautoattack) against torchattacks' port.

Run with ``.venv/bin/python benchmarks/autoattack_fidelity.py [--n 200 --iters 25 ...]``.

Same model (mnist-a, see ``pgd_throughput.get_model``), same ``--n`` MNIST test images, L-inf
eps 0.3, and a reduced budget that fits a few CPU minutes, set to the SAME values on both
sides: APGD-CE and APGD-T with ``--iters`` iterations and 1 restart (APGD-T: 9 target
classes, as in standard AutoAttack), and, with ``--parts`` including them, FAB-T
(``--fab-iters``, 9 targets) and Square (``--square-queries``, p_init 0.8, no schedule
rescaling, as the reference's AutoAttack sets it).

Three sections:
  1. each part run on its own on all images, by both libraries: robust accuracy, time, and the
     per-example agreement of the robust flags (robust for one library and fooled by the other);
  2. the cascade (parts in order, each on what is still robust): through aeshield's
     ``autoattack`` wrapper (which calls pyautoattack) and torchattacks' sub-attacks chained
     with ``MultiAttack`` at the same budget;
  3. ``torchattacks.AutoAttack(version='standard')`` as shipped, with its own defaults.

A failure in either library is caught and printed as such, never hidden.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pgd_throughput import correct, environment_line, get_model, linf, test_batch  # noqa: E402

from aeshield.attacks import autoattack  # noqa: E402

TOL = 1e-5


def set_apgd_iters(apgd, n_iter: int) -> None:
    """Set an APGD attack's iterations AND its step-size checkpoints.

    pyautoattack computes the checkpoints (``n_iter_2``, ``n_iter_min``, ``size_decr``) from
    ``n_iter`` in ``__init__`` only, so assigning ``n_iter`` afterwards keeps the schedule of
    100 iterations (first step-size check at iteration 22); these are the same formulas.
    """
    apgd.n_iter = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


def reference_adversary(model: nn.Module, parts: list[str], args, fix_schedule: bool = True) -> object:
    from pyautoattack import AutoAttack
    aa = AutoAttack(model, attacks=parts, eps=args.eps, norm="Linf", seed=args.seed,
                    version="custom", device="cpu")
    aa.logger.setLevel(logging.WARNING)
    for apgd in (aa.apgd, aa.apgd_targeted):
        if fix_schedule:
            set_apgd_iters(apgd, args.iters)
        else:  # what aeshield's autoattack wrapper does with apgd_iters
            apgd.n_iter = args.iters
    aa.apgd.n_restarts = 1
    aa.apgd_targeted.n_restarts = 1
    aa.apgd_targeted.n_target_classes = 9
    aa.fab.n_iter = args.fab_iters
    aa.fab.n_target_classes = 9
    aa.square.n_queries = args.square_queries
    return aa


def reference_part(model, part, args, fix_schedule: bool = True
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def run(x, y):
        aa = reference_adversary(model, [part], args, fix_schedule)
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=args.batch_size)
        return x_adv
    return run


def torchattacks_parts(model, args) -> dict[str, object]:
    import torchattacks as ta
    return {
        "apgd-ce": ta.APGD(model, norm="Linf", eps=args.eps, steps=args.iters, n_restarts=1,
                           seed=args.seed, loss="ce"),
        "apgd-t": ta.APGDT(model, norm="Linf", eps=args.eps, steps=args.iters, n_restarts=1,
                           seed=args.seed, n_classes=10),
        "fab-t": ta.FAB(model, norm="Linf", eps=args.eps, steps=args.fab_iters, n_restarts=1,
                        seed=args.seed, multi_targeted=True, n_classes=10),
        "square": ta.Square(model, norm="Linf", eps=args.eps, n_queries=args.square_queries,
                            n_restarts=1, p_init=0.8, seed=args.seed, resc_schedule=False),
    }


def timed(fn, x, y) -> tuple[torch.Tensor | None, float, str | None]:
    t0 = time.perf_counter()
    try:
        out = fn(x, y)
        return out.detach(), time.perf_counter() - t0, None
    except Exception as err:  # report, do not hide, a failure of either library
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        return None, time.perf_counter() - t0, f"{type(err).__name__}: {err} [{tb}]"


def flags_of(model, x_adv, x, y, eps) -> tuple[torch.Tensor, bool]:
    """Robust flags (still correct) and whether every point is a valid L-inf eps perturbation."""
    valid = (linf(x_adv, x) <= eps + TOL) and x_adv.min().item() >= -TOL and x_adv.max().item() <= 1 + TOL
    return correct(model, x_adv, y), valid


def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    both = (a & b).sum().item()
    only_a = (a & ~b).sum().item()
    only_b = (~a & b).sum().item()
    return f"{both:4d} | {only_a:8d} | {only_b:8d}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="MNIST test images (the first n)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.3, 0.15],
                   help="L-inf radii, each run in turn (0.3: the MNIST standard; 0.15: a radius "
                        "where a naturally trained model keeps some robust points, so that the "
                        "per-example agreement is informative)")
    p.add_argument("--iters", type=int, default=25, help="APGD-CE / APGD-T iterations")
    p.add_argument("--fab-iters", type=int, default=25)
    p.add_argument("--square-queries", type=int, default=1000)
    p.add_argument("--parts", default="apgd-ce,apgd-t",
                   help="comma-separated subset of apgd-ce,apgd-t,fab-t,square (in cascade order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="mnist-a")
    p.add_argument("--weights", default=None)
    p.add_argument("--shipped-aa", action="store_true",
                   help="also run torchattacks.AutoAttack(version='standard') as shipped "
                        "(Square 5000 queries: minutes on a CPU)")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]

    torch.set_num_threads(args.threads)
    import pyautoattack
    import torchattacks

    print(f"# AutoAttack fidelity, {environment_line(args.threads)}")
    print(f"# pyautoattack {pyautoattack.__version__} (reference) vs torchattacks {torchattacks.__version__}")
    model = get_model(args.model, args.weights)
    x, y = test_batch(args.model, args.n)
    clean = correct(model, x, y)
    print(f"# {args.n} test images, clean accuracy {clean.float().mean():.2%}; Linf eps {args.eps}; "
          f"budget: APGD-CE/APGD-T {args.iters} iters, 1 restart, APGD-T/FAB-T 9 targets, "
          f"FAB-T {args.fab_iters} iters, Square {args.square_queries} queries; seed {args.seed}")

    for eps in args.eps:
        print(f"\n# ================ Linf eps {eps} ================")
        run_eps(model, x, y, argparse.Namespace(**{**vars(args), "eps": eps}), parts)


def run_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args, parts: list[str]) -> None:
    import torchattacks

    # ---- 1. each part alone -------------------------------------------------------------------
    ta_parts = torchattacks_parts(model, args)
    print("\n## 1. each part alone, on all images")
    print("| part    | library            | robust acc | time s | valid | both robust | ref only | ta only |")
    print("|---------|--------------------|------------|--------|-------|-------------|----------|---------|")
    per_part: dict[str, dict[str, torch.Tensor]] = {}
    for part in parts:
        rows = {}
        libs = [("pyautoattack (ref)", reference_part(model, part, args)),
                ("torchattacks", ta_parts[part])]
        if part == "apgd-ce" and args.iters != 100:
            libs.append(("ref, n_iter only *", reference_part(model, part, args, fix_schedule=False)))
        for lib, fn in libs:
            torch.manual_seed(args.seed)
            x_adv, dt, err = timed(fn, x, y)
            rows[lib] = (x_adv, dt, err)
        for lib, (x_adv, dt, err) in rows.items():
            if err is not None:
                print(f"| {part:7s} | {lib:18s} | FAILED after {dt:.1f} s: {err}")
                continue
            flags, valid = flags_of(model, x_adv, x, y, args.eps)
            per_part.setdefault(part, {})[lib] = flags
            ref = per_part[part].get("pyautoattack (ref)")
            a = agreement(ref, flags).split("|") if lib != "pyautoattack (ref)" and ref is not None else ["", "", ""]
            print(f"| {part:7s} | {lib:18s} | {flags.float().mean():10.2%} | {dt:6.1f} | "
                  f"{'yes' if valid else 'NO':5s} | {a[0].strip():>11s} | {a[1].strip():>8s} | "
                  f"{a[2].strip():>7s} |")
    if per_part and all({"pyautoattack (ref)", "torchattacks"} <= set(v) for v in per_part.values()):
        ref_all = torch.stack([v["pyautoattack (ref)"] for v in per_part.values()]).all(0)
        ta_all = torch.stack([v["torchattacks"] for v in per_part.values()]).all(0)
        a = agreement(ref_all, ta_all).split("|")
        print(f"robust to every part: ref {ref_all.float().mean():.2%}, torchattacks "
              f"{ta_all.float().mean():.2%}; both robust {a[0].strip()}, ref only {a[1].strip()}, "
              f"ta only {a[2].strip()}")
    if "apgd-ce" in parts and args.iters != 100:
        print("* ref, n_iter only: pyautoattack with apgd.n_iter assigned after construction, as "
              "aeshield.autoattack(apgd_iters=...) does; the step-size checkpoints stay those of 100 "
              "iterations. 'ref only'/'ta only' columns compare each row with the pyautoattack (ref) row.")

    # ---- 2. cascade ---------------------------------------------------------------------------
    print(f"\n## 2. cascade {' -> '.join(parts)} at the same budget")
    print("| implementation                              | robust acc | time s | valid | both robust "
          "| ref only | ta only |")
    print("|---------------------------------------------|------------|--------|-------|-------------|----------|---------|")

    def via_wrapper(a, b):
        return autoattack(model, a, b, eps=args.eps, norm="Linf", attacks=tuple(parts), seed=args.seed,
                          apgd_iters=args.iters, apgd_restarts=1, square_queries=args.square_queries,
                          batch_size=args.batch_size)

    def ref_direct(a, b):
        return reference_adversary(model, parts, args).run_standard_evaluation(
            a, b, batch_size=args.batch_size)[0]

    def ta_cascade(a, b):
        fresh = torchattacks_parts(model, args)
        atks = [fresh[q] for q in parts]
        if len(atks) == 1:
            return atks[0](a, b)
        return torchattacks.MultiAttack(atks)(a, b)

    cascade = {}
    for name, fn in (("pyautoattack direct (ref)", ref_direct),
                     ("aeshield.autoattack wrapper (pyautoattack)", via_wrapper),
                     ("torchattacks MultiAttack of the same parts", ta_cascade)):
        torch.manual_seed(args.seed)
        x_adv, dt, err = timed(fn, x, y)
        if err is not None:
            print(f"| {name:40s} | FAILED after {dt:.1f} s: {err}")
            continue
        flags, valid = flags_of(model, x_adv, x, y, args.eps)
        cascade[name] = flags
        ref = cascade.get("pyautoattack direct (ref)")
        compared = ref is not None and name != "pyautoattack direct (ref)"
        agree = agreement(ref, flags).split("|") if compared else ["", "", ""]
        print(f"| {name:43s} | {flags.float().mean():10.2%} | {dt:6.1f} | {'yes' if valid else 'NO':5s} | "
              f"{agree[0].strip():>11s} | {agree[1].strip():>8s} | {agree[2].strip():>7s} |")
    print("wrapper: aeshield.autoattack(apgd_iters, apgd_restarts=1, square_queries) as written; it "
          "sets apgd n_iter after construction (step-size schedule of 100 iterations) and has no "
          "FAB knob (FAB-T at 100 iterations).")

    # ---- 3. torchattacks.AutoAttack as shipped ------------------------------------------------
    print("\n## 3. torchattacks.AutoAttack(version='standard', seed=0) as shipped")
    aa = torchattacks.AutoAttack(model, norm="Linf", eps=args.eps, version="standard",
                                 n_classes=10, seed=args.seed)
    subs = aa._autoattack.attacks
    print("its budget: " + ", ".join(
        f"{type(s).__name__}(" + (f"steps={s.steps}" if hasattr(s, "steps") else
                                  f"n_queries={s.n_queries}, resc_schedule={s.rescale_schedule}")
        + f", n_restarts={s.n_restarts})" for s in subs)
        + "; the reference standard version: APGD-CE/APGD-T/FAB-T 100 iterations, Square 5000 "
          "queries without schedule rescaling")
    if args.shipped_aa:
        torch.manual_seed(args.seed)
        x_adv, dt, err = timed(aa, x, y)
        if err is not None:
            print(f"FAILED after {dt:.1f} s: {err}")
        else:
            flags, valid = flags_of(model, x_adv, x, y, args.eps)
            line = f"robust acc {flags.float().mean():.2%}, time {dt:.1f} s, valid {'yes' if valid else 'NO'}"
            ref = cascade.get("pyautoattack direct (ref)")
            if ref is not None:
                a = agreement(ref, flags).split("|")
                line += (f"; vs reference cascade above: both robust {a[0].strip()}, ref only "
                         f"{a[1].strip()}, ta only {a[2].strip()}")
            print(line)


if __name__ == "__main__":
    main()
