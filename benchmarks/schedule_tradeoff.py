"""Robust accuracy against training wall time for each attack schedule, and the cost claim.

    .venv/bin/python benchmarks/schedule_tradeoff.py                       # the issue's protocol
    .venv/bin/python benchmarks/schedule_tradeoff.py --n 300 --snapshots 3 # a shorter run

Side by side in one invocation, on the same data, threads and seeds (aaa-mnist's quick
classifiers A, B, C, naturally trained or taken from the artifact cache; that pre-training is
not counted):

* **AAA** xent+mse (conv-ae, lambda 0.01, Adam lr 0.01 on a half cosine, batch 32) in front of
  the frozen A and B (a random one per step), one run per schedule in ``--schedules``;
* **Madry AT of A** (Adam lr 3e-3 on a half cosine, batch 32, eps grown from 0 over
  ``--at-ramp`` updates: PGD training at full eps from natural weights collapsed to the uniform
  prediction on short budgets), one run per schedule.

These are aaa-mnist's quick recipes (its shields: ``pgd-2``, its Madry AT: ``pgd-3``).

``pgd-K`` is a random start and K PGD steps of eps / K (``pgd-10``: step 0.03, the quick
profile's training attack until issue 26; ``pgd-2``: its shields' attack since), ``fast`` is
FGSM from a random start with step 1.25 eps and the overfitting guard, ``nfgsm`` is FGSM of step
eps from a uniform noise of 2 eps, not projected to the ball (de Jorge et al. 2022), with the
guard, ``free`` replays each minibatch ``--replays`` times, with the guard too. A ``:bf16``
suffix (e.g. ``pgd-2:bf16``) trains the same recipe in mixed precision (bfloat16 autocast,
float32 weights; evaluation stays float32). Every run sees the whole training split for
``--epochs`` epochs. During training the weights are copied at ``--snapshots`` evenly spaced
updates, with the training wall time at that point (the copies are not counted). Every snapshot
is then evaluated on the same ``--n`` test images (the first n of aaa-mnist's seeded test
permutation): clean accuracy and PGD-40 (step 0.01) x 5 restarts at eps 0.3, white-box on the
whole pipeline; AAA behind A and B pooled (the native row) and behind C (transfer).

``--cost-claim`` adds the claim: Madry AT of A, B and C on ``--claim-at`` (wall time of each),
and the worst case of PGD-40 x5 followed by the audit's quick battery (what ``aeshield audit
--budget quick`` runs, without its sanity checks) for each AT model at the end of its training
and for each snapshot of the ``--claim-shield`` shield behind A, B and C. The shield's time
is the first snapshot at which its worst case behind every one of A, B, C reaches that of the
classifier's own AT; the claim holds when it is at most 0.5x the summed AT wall time.
When ``--schedules`` does not list the claim's shield (``--schedules ""``: the claim alone), its
snapshots are evaluated only as far as the claim needs, after the AT runs: only those trained
within 0.5x the summed AT time (a later one cannot make the claim hold), in training order,
stopping at the first that reaches all three; behind A, then B, then C, leaving a snapshot at
the first classifier it falls short on; and the audit's battery runs only on PGD-40 x5's
survivors, and not at all when PGD-40 x5 alone leaves fewer robust examples than the AT
figure (the worst case can only be lower). Nothing skipped can change the verdict, and what
runs is the same cascade on the same examples (the battery's random starts are its own draws);
at n = 1,000 it costs a fraction of evaluating everything.

Prints the tables and writes ``results.json`` and ``tradeoff.png`` to ``--out``. Each interval
is Wilson's 95%. Wall times are only comparable within one invocation on an idle machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from aeshield.defenses.aaa import AAAConfig, train_aaa
from aeshield.defenses.adversarial_training import AdversarialTrainingConfig, adversarial_training, total_updates
from aeshield.defenses.base import Shielded
from aeshield.defenses.schedules import updates_per_batch
from aeshield.eval.audit.battery import build_battery
from aeshield.eval.harness import AttackSpec, evaluate
from aeshield.experiments.config import load_config
from aeshield.experiments.runner import Runner
from aeshield.models import create_model
from aeshield.records import Accuracy
from aeshield.threat import ThreatModel

from pgd_throughput import environment_line

THREAT = ThreatModel("Linf", 0.3)
PGD_40X5 = AttackSpec("pgd", {"steps": 40, "step_size": 0.01, "restarts": 5}, label="PGD-40 x5")


# ---- training with snapshots ----------------------------------------------------------------
class Snapshots:
    """Copies of ``module``'s weights at the given update counts, each with the training wall
    time at that point; a global optimizer hook sees every update (the free schedule's inner
    ones too) and the time spent copying is left out of the clock."""

    def __init__(self, module: nn.Module, at: list[int]) -> None:
        self.module, self.at = module, set(at)
        self.taken: list[dict] = []
        self.updates = 0
        self._start = 0.0
        self._excluded = 0.0

    def _hook(self, optimizer, args, kwargs) -> None:
        first = optimizer.param_groups[0]["params"][0]
        if not any(first is p for p in self.module.parameters()):
            return  # an optimizer of something else (none today, but say so)
        self.updates += 1
        if self.updates in self.at:
            self.take()

    def take(self) -> None:
        t = time.perf_counter()
        wall = t - self._start - self._excluded
        self.taken.append({"updates": self.updates, "wall_s": round(wall, 2),
                           "state": copy.deepcopy(self.module.state_dict())})
        self._excluded += time.perf_counter() - t

    @contextmanager
    def running(self):
        handle = register_optimizer_step_post_hook(self._hook)
        self._start = time.perf_counter()
        try:
            yield self
        finally:
            handle.remove()
        if not self.taken or self.taken[-1]["updates"] != self.updates:
            self.take()  # the weights the trainer returns (a guard may have restored them)
        else:
            self.taken[-1]["state"] = copy.deepcopy(self.module.state_dict())


def evenly(total: int, count: int) -> list[int]:
    """``count`` update counts spread evenly over ``total``, the last one ``total``."""
    return [round(total * (i + 1) / count) for i in range(count)]


def schedule_settings(schedule: str, args) -> dict:
    """A trainer's settings for ``schedule``: "fast", "nfgsm", "free" or "pgd-K" (PGD-K with step eps / K,
    so that the steps together cross the ball once; "pgd" alone is PGD-10), each optionally
    followed by ":bf16" (mixed-precision training, ``precision="bfloat16"``)."""
    schedule, _, suffix = schedule.partition(":")
    if suffix not in ("", "bf16"):
        raise SystemExit(f"--schedules: unknown suffix {suffix!r} (only ':bf16', mixed precision)")
    name, _, steps = schedule.partition("-")
    steps = int(steps or 10)
    return {"schedule": name, "epochs": args.epochs, "batch_size": 32, "attack_steps": steps,
            "step_size": round(0.3 / steps, 6), "replays": args.replays, "guard_every": args.guard_every,
            "precision": "bfloat16" if suffix else "float32"}


def train_aaa_run(schedule: str, classifiers: list[nn.Module], train, args) -> tuple[nn.Module, Snapshots]:
    config = AAAConfig(loss="xent+mse", lam=0.01, eps=0.3, lr=0.01, cosine_lr=True, seed=0,
                       **schedule_settings(schedule, args))
    torch.manual_seed(0)
    shield = create_model("conv-ae")
    # The clean warm-up updates use the same optimizer, so the hook counts them too.
    total = config.warmup_steps + total_updates(len(train.labels), 32, args.epochs) * updates_per_batch(config)
    snaps = Snapshots(shield, evenly(total, args.snapshots))
    with snaps.running():
        train_aaa(shield, classifiers, train.images, train.labels, config, progress=False)
    return shield.eval(), snaps


def train_at_run(schedule: str, base: nn.Module, architecture: str, train, args) -> tuple[nn.Module, Snapshots]:
    config = AdversarialTrainingConfig(eps=0.3, lr=3e-3, cosine_lr=True, seed=0, eps_ramp_steps=args.at_ramp,
                                       **schedule_settings(schedule, args))
    model = create_model(architecture)
    model.load_state_dict(base.state_dict())
    total = total_updates(len(train.labels), 32, args.epochs) * updates_per_batch(config)
    snaps = Snapshots(model, evenly(total, args.snapshots))
    with snaps.running():
        adversarial_training(model, train.images, train.labels, config, progress=False)
    return model.eval(), snaps


# ---- evaluation -----------------------------------------------------------------------------
def measure(model: nn.Module, test, *, audit: bool) -> dict:
    """Clean, PGD-40 x5 and (``audit``) the worst case of PGD-40 x5 then the quick battery."""
    attacks = [PGD_40X5] + (build_battery(model, THREAT, "quick") if audit else [])
    record = evaluate(model, test.images, test.labels, attacks, THREAT, progress=False)
    out = {"clean": record.clean, "pgd": record.attacks[0].accuracy_after}
    if audit:
        out["worst"] = record.robust
    return out


def pooled(*accuracies: Accuracy) -> Accuracy:
    return Accuracy(sum(a.correct for a in accuracies), sum(a.n for a in accuracies))


def measure_against(model: nn.Module, test, target: Accuracy) -> dict:
    """Clean, PGD-40 x5 and, unless PGD-40 x5 already leaves fewer robust examples than
    ``target`` (same images), the worst case of PGD-40 x5 then the audit's quick battery, the
    battery run on PGD's survivors only (a cascade: an example counts if it survives both)."""
    pgd = evaluate(model, test.images, test.labels, [PGD_40X5], THREAT, progress=False)
    out = {"clean": pgd.clean, "pgd": pgd.robust}
    if pgd.robust.correct < target.correct:
        return out  # the worst case is at most PGD's: short of the target whatever the battery does
    alive = pgd.flags().to(torch.bool)
    battery = build_battery(model, THREAT, "quick")
    rest = evaluate(model, test.images[alive], test.labels[alive], battery, THREAT, progress=False)
    out["worst"] = Accuracy(rest.robust.correct, pgd.robust.n)
    return out


def claim_search(shield: nn.Module, snaps: Snapshots, classifiers: dict[str, nn.Module], test,
                 at_final: dict[str, dict], budget_s: float, schedule: str) -> list[dict]:
    """The claim's shield snapshots, evaluated only as far as the verdict needs (see the module
    docstring): each point says what was measured and why the rest was not."""
    points = []
    for snap in snaps.taken:
        point = {"method": "AAA", "schedule": schedule, "updates": snap["updates"], "wall_s": snap["wall_s"]}
        points.append(point)
        if snap["wall_s"] > budget_s:
            point["skipped"] = f"trained past 0.5x the summed AT time ({budget_s:.0f} s)"
            continue
        shield.load_state_dict(snap["state"])
        shield.eval()
        reached = True
        for k in "ABC":  # A first: its AT is the figure the shield has fallen short of so far
            target = acc(at_final[k]["worst"])
            t = time.perf_counter()
            m = measure_against(Shielded(shield, classifiers[k]).eval(), test, target)
            point[k] = {name: v.to_dict() for name, v in m.items()}
            point[k]["eval_s"] = round(time.perf_counter() - t, 1)
            if "worst" not in m or m["worst"].correct < target.correct:
                reached = False
                point["skipped"] = f"short of AT's worst case behind {k}: not evaluated further"
                break
        print(json.dumps(point), flush=True)
        if reached:
            break
    return points


def evaluate_snapshots(kind: str, schedule: str, module: nn.Module, snaps: Snapshots,
                       pipelines: dict[str, Callable[[nn.Module], nn.Module]], test, *,
                       audit: str = "none") -> list[dict]:
    """Every snapshot's figures; ``audit``: "all" snapshots, the "last" one or "none" also get
    the audit's quick battery."""
    rows = []
    for i, snap in enumerate(snaps.taken):
        module.load_state_dict(snap["state"])
        module.eval()
        audited = audit == "all" or (audit == "last" and i == len(snaps.taken) - 1)
        point = {"method": kind, "schedule": schedule, "updates": snap["updates"], "wall_s": snap["wall_s"]}
        for name, build in pipelines.items():
            t = time.perf_counter()
            m = measure(build(module), test, audit=audited)
            point[name] = {k: v.to_dict() for k, v in m.items() if isinstance(v, Accuracy)}
            point[name]["eval_s"] = round(time.perf_counter() - t, 1)
        rows.append(point)
        print(json.dumps(point), flush=True)
    return rows


def acc(d: dict) -> Accuracy:
    return Accuracy(d["correct"], d["n"])


# ---- report ---------------------------------------------------------------------------------
def print_curves(points: list[dict]) -> None:
    print("\n## Robust accuracy against training wall time (PGD-40 x5, eps 0.3)\n")
    print("| method | schedule | updates | train wall (s) | clean | PGD-40 x5 | transfer C: PGD-40 x5 |")
    print("|---|---|---|---|---|---|---|")
    for p in points:
        if p["method"] == "AAA":
            clean = pooled(acc(p["A"]["clean"]), acc(p["B"]["clean"]))
            rob = pooled(acc(p["A"]["pgd"]), acc(p["B"]["pgd"]))
            c = acc(p["C"]["pgd"]).format()
            label = "AAA on {A, B} (A and B pooled)"
        else:
            clean, rob, c = acc(p["A"]["clean"]), acc(p["A"]["pgd"]), "-"
            label = f"Madry AT of {p['classifier']}"
        print(f"| {label} | {p['schedule']} | {p['updates']} | {p['wall_s']:.0f} | {clean.format()} | "
              f"{rob.format()} | {c} |")


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    schedules = list(dict.fromkeys(p["schedule"] for p in points))
    colors = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(schedules)}
    for method, style in (("AAA", "-"), ("AT-A", "--")):
        for schedule, color in colors.items():
            run = [p for p in points if p["method"] == method and p["schedule"] == schedule]
            if not run:
                continue
            keys = ["A", "B"] if method == "AAA" else ["A"]
            ys = [100 * pooled(*(acc(p[k]["pgd"]) for k in keys)).value for p in run]
            label = ("AAA on {A,B}, A+B pooled" if method == "AAA" else "Madry AT of A") + f", {schedule}"
            ax.plot([p["wall_s"] for p in run], ys, style, marker="o", color=color, label=label)
    ax.set_xlabel("training wall time (s), this machine")
    ax.set_ylabel("PGD-40 x5 robust accuracy (%), eps 0.3")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: no curve hidden
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cost_claim(shield_points: list[dict], at_runs: dict[str, dict]) -> dict:
    """The first shield snapshot whose worst case behind every classifier reaches that of the
    classifier's own AT at the end of its training, against the summed AT wall time."""
    at_total = sum(r["wall_s"] for r in at_runs.values())
    reached = None
    for p in shield_points:
        if all("worst" in p.get(k, {}) and acc(p[k]["worst"]).value >= acc(at_runs[k]["worst"]).value
               for k in at_runs):
            reached = p
            break
    ratio = reached["wall_s"] / at_total if reached else None
    # An AT run that ends with nothing robust makes any shield "reach" it: no claim then.
    vacuous = [k for k, r in at_runs.items() if acc(r["worst"]).correct == 0]
    return {"at_wall_s": {k: r["wall_s"] for k, r in at_runs.items()}, "at_total_s": round(at_total, 1),
            "at_worst": {k: r["worst"] for k, r in at_runs.items()},
            "shield_wall_s": reached["wall_s"] if reached else None, "ratio": ratio, "vacuous": vacuous,
            "holds": ratio is not None and ratio <= 0.5 and not vacuous}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", default="pgd-10,pgd-2,fast,free",
                        help="training schedules, each 'fast', 'nfgsm', 'free' or 'pgd-K', optionally "
                             "with ':bf16' (mixed precision) (default pgd-10,pgd-2,fast,free)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs over the whole training split (2)")
    parser.add_argument("--replays", type=int, default=4, help="free's m (4)")
    parser.add_argument("--at-ramp", type=int, default=500,
                        help="Madry AT grows eps linearly from 0 over this many updates (500)")
    parser.add_argument("--guard-every", type=int, default=None,
                        help="fast, nfgsm, free: the overfitting guard also checks every this many updates "
                             "(default: after each epoch only)")
    parser.add_argument("--snapshots", type=int, default=4, help="evaluated points per run (4)")
    parser.add_argument("--n", type=int, default=1000, help="test images (1000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cost-claim", action="store_true", help="also Madry AT of B and C, and the claim")
    parser.add_argument("--claim-shield", default="pgd-2", help="the shield's schedule in the claim (pgd-2)")
    parser.add_argument("--claim-at", default="pgd-3", help="Madry AT's schedule in the claim (pgd-3)")
    parser.add_argument("--train-limit", type=int, default=None, help="training images (all)")
    parser.add_argument("--out", default="benchmarks/results/schedule_tradeoff")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(environment_line(args.threads), flush=True)
    runner = Runner(load_config("aaa-mnist", "quick"), progress=False)
    classifiers = {k: runner.zoo.classifier(k).eval() for k in "ABC"}
    architectures = {k: runner.config.classifiers[k].model for k in "ABC"}
    train = runner.train if args.train_limit is None else runner.train.subset(args.train_limit, seed=0)
    test = runner.test_subset(args.n)
    schedules = [s for s in args.schedules.split(",") if s]
    claim_shield = args.claim_shield if args.cost_claim else None
    claim_at = args.claim_at if args.cost_claim else None
    points: list[dict] = []
    deferred = None  # the claim's shield when no curve asks for it: evaluated after the AT runs
    for schedule in schedules + ([claim_shield] if claim_shield and claim_shield not in schedules else []):
        shield, snaps = train_aaa_run(schedule, [classifiers["A"], classifiers["B"]], train, args)
        if schedule not in schedules:
            deferred = (shield, snaps)
            continue
        pipelines = {k: (lambda g, c=c: Shielded(g, c).eval()) for k, c in classifiers.items()}
        points += evaluate_snapshots("AAA", schedule, shield, snaps, pipelines, test,
                                     audit="all" if schedule == claim_shield else "none")
    at_final: dict[str, dict] = {}
    for schedule in schedules + ([claim_at] if claim_at and claim_at not in schedules else []):
        model, snaps = train_at_run(schedule, classifiers["A"], architectures["A"], train, args)
        run = evaluate_snapshots("AT-A", schedule, model, snaps, {"A": lambda m: m}, test,
                                 audit="last" if schedule == claim_at else "none")
        for p in run:
            p["classifier"] = "A"
        points += run
        if schedule == claim_at:
            at_final["A"] = {"wall_s": run[-1]["wall_s"], "worst": run[-1]["A"]["worst"]}
    claim = None
    if args.cost_claim:
        for k in "BC":
            model, snaps = train_at_run(claim_at, classifiers[k], architectures[k], train, args)
            m = measure(model, test, audit=True)
            at_final[k] = {"wall_s": snaps.taken[-1]["wall_s"], "worst": m["worst"].to_dict(),
                           "pgd": m["pgd"].to_dict(), "clean": m["clean"].to_dict()}
            print(json.dumps({"method": f"AT-{k}", "schedule": claim_at, **at_final[k]}), flush=True)
        if deferred:
            budget = 0.5 * sum(at_final[k]["wall_s"] for k in "ABC")
            claim_points = claim_search(*deferred, classifiers, test, at_final, budget, claim_shield)
        else:
            claim_points = [p for p in points if p["method"] == "AAA" and p["schedule"] == claim_shield]
        claim = cost_claim(claim_points, {k: at_final[k] for k in "ABC"})
        claim["points"] = claim_points
    print_curves(points)
    if claim is not None:
        print(f"\n## Cost claim (shield: {claim_shield}; Madry AT: {claim_at}, eps ramp {args.at_ramp} updates; "
              f"worst case of PGD-40 x5 and the audit's quick battery, n = {args.n})\n")
        for k in "ABC":
            print(f"- Madry AT of {k}: {claim['at_wall_s'][k]:.0f} s, worst case "
                  f"{acc(claim['at_worst'][k]).format()}")
        for p in claim["points"]:
            parts = [f"{k}: PGD {acc(p[k]['pgd']).format()}"
                     + (f", worst {acc(p[k]['worst']).format()}" if "worst" in p[k] else ", battery not run")
                     for k in "ABC" if k in p]
            why = f" ({p['skipped']})" if "skipped" in p else ""
            print(f"- shield after {p['updates']} updates, {p['wall_s']:.0f} s: {'; '.join(parts) or '-'}{why}")
        if claim["vacuous"]:
            print(f"- Madry AT of {', '.join(claim['vacuous'])} ended with nothing robust: a crippled baseline, "
                  "no claim")
        elif claim["shield_wall_s"] is None:
            print(f"- the shield reached all three at no snapshot (summed AT: {claim['at_total_s']:.0f} s): "
                  "the claim is not shown")
        else:
            print(f"- one shield reached all three after {claim['shield_wall_s']:.0f} s = {claim['ratio']:.2f}x "
                  f"the summed AT wall time ({claim['at_total_s']:.0f} s): claim (<= 0.5x) "
                  f"{'holds' if claim['holds'] else 'does not hold'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "environment": environment_line(args.threads),
                                                  "points": points, "cost_claim": claim}, indent=1))
    plot(points, out / "tradeoff.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'tradeoff.png'}")


if __name__ == "__main__":
    main()
