"""The sanity checks of an audit, run on a seeded subset and cached so that a restarted audit
skips the finished ones; their attacks inside the threat model join the headline."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ... import distributed
from ...defenses.base import Shielded
from ...threat import ThreatModel
from .. import sanity
from ...io import write_json_atomic
from ..sanity import CheckResult
from .battery import BLACKBOX_LABELS, reference_attack
from .budget import AuditBudget
from .report import AuditReport, accuracy_of

logger = logging.getLogger(__name__)


class CheckCache:
    """Finished checks stored in a JSON file, so that a restarted audit skips them."""

    def __init__(self, path: Path | None, key: str) -> None:
        self.path, self.key, self.data = path, key, {}
        if path:  # read by rank 0, which alone writes it
            state = distributed.read_on_main(path, lambda p: json.loads(p.read_text()))
            if state is not None and state.get("key") == key:
                self.data = state.get("entries", {})

    def get(self, name: str):
        return self.data.get(name)

    def put(self, name: str, value) -> None:
        self.data[name] = value
        if self.path and distributed.is_main():
            write_json_atomic(self.path, {"key": self.key, "entries": self.data})


def run_checks(report: AuditReport, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                threat: ThreatModel, b: AuditBudget, *, seed: int, batch_size: int, random: bool,
                measured: tuple[bool, float, bool], cache: CheckCache) -> None:
    n = images.shape[0]
    k = n if b.sanity_n is None else min(n, b.sanity_n)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    idx = idx.to(images.device)
    xs, ys = images[idx], labels[idx]
    report.subset_n = k
    report.check_index = idx.tolist()
    make = reference_attack(model, b, random=random)
    shielded = isinstance(model, Shielded)
    eot = b.eot_samples if random else None

    # A check's measurement returns (verdict, sweep curves, {label: robust flags} of its runs
    # inside the threat model); the flags join the headline.
    def run(name: str, fn: Callable[[], tuple]) -> None:
        cached = cache.get(name)
        if cached is not None:
            result, sweeps, secs = CheckResult.from_dict(cached["result"]), cached["sweeps"], cached["seconds"]
            inside = cached["inside"]
        else:
            t0 = time.perf_counter()
            result, sweeps, *rest = fn()
            inside = rest[0] if rest else {}
            secs = time.perf_counter() - t0
            cache.put(name, {"result": result.to_dict(), "sweeps": sweeps, "seconds": secs,
                             "inside": inside})
        report.checks.append(result)
        report.sweeps.update(sweeps)
        report.check_seconds[name] = secs
        report.check_attacks.update({f"{name}: {label}": f for label, f in inside.items()})
        logger.info("%s  (%.1fs)", result.line(), secs)

    _, change, declared = measured

    def randomness():
        result = sanity.judge_randomness(random, max_logit_change=change, declared=declared,
                                         eot_samples=eot, n=min(n, 64))
        if not random or threat.eps == 0:
            return result, {}
        # Every run of the audit judges its adversarial inputs by one draw, so on a random
        # pipeline the headline is also a worst case over draws; say what one query would see.
        q = sanity.one_query_vs_retries(model, xs, ys, threat, make, b.pgd_steps,
                                        draws=b.judge_draws, seed=seed, batch_size=batch_size)
        result.details["one_query"] = q
        lo, hi = q["expected_interval"]
        result.explanation += (
            f". One run of the reference attack ({b.pgd_steps} steps, {k} examples), each "
            f"adversarial input scored over {q['draws']} draws: expected accuracy (one query) "
            f"{100 * q['expected']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}], majority vote "
            f"{accuracy_of(q['majority']).format()}, one draw {accuracy_of(q['one_draw']).format()}, every draw "
            f"(an attacker who retries) {accuracy_of(q['every_draw']).format()}; {q['coin_flips']} examples "
            "are coin flips (handled in 10-90% of draws). The headline judges each run by one draw, "
            "so it is the retrying attacker's figure")
        return result, {"one_query": q}

    def gradients():
        stats = sanity.gradient_statistics(model, xs, ys, threat, seed=seed, eot_samples=eot,
                                           batch_size=min(batch_size, 250))
        result = sanity.judge_gradients(stats["zero_fraction"], stats["uninformative_fraction"],
                                        n=stats["n"], shielded=shielded)
        result.details.update(stats)
        return result, {}

    def unbounded():
        result, sweep = sanity.run_unbounded(model, xs, ys, threat, make, b.pgd_steps,
                                             max_factor=b.longer_factor, seed=seed, batch_size=batch_size)
        return result, {"unbounded": sweep}

    def eps_sweep():
        if threat.eps == 0:
            return CheckResult(sanity.EPS_MONOTONE, sanity.SKIP, "eps is 0", {}, k), {}
        # The audited eps itself stays exact: its run must lie inside the threat model.
        values = sorted({0.0} | {threat.eps if f == 1 else round(f * threat.eps, 6)
                                 for f in b.eps_fractions})
        records = sanity.sweep_records(model, xs, ys, threat, make, [(e, b.pgd_steps) for e in values],
                                       seed=seed, batch_size=batch_size)
        accs = [r.robust for r in records]
        curve = [{"eps": e, "accuracy": a.to_dict()} for e, a in zip(values, accs)]
        inside = {f"eps={e:g} steps={b.pgd_steps}": r.robust_flags
                  for e, r in zip(values, records) if 0 < e <= threat.eps}
        return (sanity.judge_monotone(sanity.EPS_MONOTONE, "eps", values, accs, random=random),
                {"eps": curve}, inside)

    def steps_sweep():
        if threat.eps == 0:
            return CheckResult(sanity.STEPS_MONOTONE, sanity.SKIP, "eps is 0", {}, k), {}
        values = sorted(set(b.steps_sweep))
        records = sanity.sweep_records(model, xs, ys, threat, make, [(threat.eps, s) for s in values],
                                       seed=seed, batch_size=batch_size)
        accs = [r.robust for r in records]
        curve = [{"steps": s, "accuracy": a.to_dict()} for s, a in zip(values, accs)]
        inside = {f"eps={threat.eps:g} steps={s}": r.robust_flags for s, r in zip(values, records)}
        return (sanity.judge_monotone(sanity.STEPS_MONOTONE, "steps", values, accs, random=random),
                {"steps": curve}, inside)

    def blackbox():
        return sanity.judge_blackbox(report.record, BLACKBOX_LABELS), {}

    def longer():
        if threat.eps == 0:
            return CheckResult(sanity.LONGER, sanity.SKIP, "eps is 0", {}, k), {}
        records = sanity.longer_records(model, xs, ys, threat, make, b.pgd_steps,
                                        factor=b.longer_factor, seed=seed, batch_size=batch_size)
        short, long, only_long, only_short = sanity.compare_longer(*records)
        result = sanity.judge_longer(short, long, only_long=only_long, only_short=only_short,
                                     factor=b.longer_factor)
        steps = (b.pgd_steps, b.longer_factor * b.pgd_steps)
        inside = {f"eps={threat.eps:g} steps={s}": r.robust_flags for s, r in zip(steps, records)}
        return result, {"longer": {"short": {"steps": steps[0], "accuracy": short.to_dict()},
                                   "long": {"steps": steps[1], "accuracy": long.to_dict()}}}, inside

    for name, fn in ((sanity.RANDOMNESS, randomness), (sanity.GRADIENTS, gradients),
                     (sanity.UNBOUNDED, unbounded), (sanity.EPS_MONOTONE, eps_sweep),
                     (sanity.STEPS_MONOTONE, steps_sweep), (sanity.BLACKBOX, blackbox),
                     (sanity.LONGER, longer)):
        run(name, fn)
