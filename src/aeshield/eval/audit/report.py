"""The audit's findings (``AuditReport``), written as ``audit.json`` and ``audit.md``, and
which saved reports measured what the current protocol measures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...threat import ThreatModel
from .. import sanity
from ..harness import AttackSpec
from ...records import Accuracy, EvalRecord, flags_from_string, flags_to_string
from ...io import write_json_atomic, write_text_atomic
from ..sanity import CheckResult
from .budget import AuditBudget

FORMAT = "aeshield-audit-v1"
# What a report measured, beyond its budget and settings. 2 (2026-12-02): orthogonal PGD joins
# the battery of pipelines with a detector, and a failed unbounded-eps run is repeated with
# finer steps. A version-1 report of a pipeline without a detector whose unbounded-eps check
# passed measured exactly what version 2 measures (``measures_as_current_protocol``).
# 3 (2026-12-02): on a pipeline with a detector the sanity checks' reference attack is the
# worst case of detector-aware and orthogonal PGD (was detector-aware PGD alone), and the
# unbounded-eps retry counts an example fooled by either of its two runs. Reports of pipelines
# without a detector measured the same under 2 and 3.
# 4 (2026-12-02): the headline counts an example as robust only if it also survived every run
# of the sanity checks' reference attack inside the threat model (the eps sweep at eps no larger
# than the audited one, the steps sweep, both runs of the longer-attack check). Under 3 a longer
# attack could fool three quarters of the examples the headline called robust (MagNet-MNIST).
# 5 (2026-12-02): on a random pipeline the randomness check also scores one run of the reference
# attack over ``judge_draws`` draws (expected accuracy vs. an attacker who retries). The headline
# is unchanged, so a version-4 report of a deterministic pipeline measured the same.
PROTOCOL = 5

@dataclass
class AuditReport:
    """Everything an audit found; ``save(out)`` writes ``audit.json`` and ``audit.md``."""

    record: EvalRecord
    checks: list[CheckResult]
    battery: list[AttackSpec]
    budget: AuditBudget
    threat: ThreatModel
    random: bool
    model: dict
    subset_n: int | None
    sweeps: dict = field(default_factory=dict)
    plots: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    seconds: float = 0.0
    check_seconds: dict = field(default_factory=dict)
    # The checks' attacks inside the threat model: label -> robust flags ('0'/'1') on the
    # subset ``check_index`` (positions in the evaluation set) that the checks ran on.
    check_attacks: dict = field(default_factory=dict)
    check_index: list = field(default_factory=list)

    def robust_flags(self) -> torch.Tensor:
        """Per example: robust to the cascade and to every check attack inside the threat model."""
        flags = self.record.flags()
        if self.check_attacks:
            index = torch.tensor(self.check_index, dtype=torch.long)
            for f in self.check_attacks.values():
                flags[index] &= flags_from_string(f)
        return flags

    @property
    def robust(self) -> Accuracy:
        """The headline: the worst case over the cascade and the checks' attacks at radii no
        larger than the audited one, since each of them is an attack inside the threat model."""
        return Accuracy.from_flags(self.robust_flags())

    @property
    def battery_robust(self) -> Accuracy:
        """The cascade alone, without what the checks' attacks fooled."""
        return self.record.robust

    def fooled_by_checks(self) -> dict[str, int]:
        """Per check attack, the examples it fooled that the cascade left robust."""
        battery = self.record.flags()[torch.tensor(self.check_index, dtype=torch.long)]
        return {label: int((battery & ~flags_from_string(f)).sum())
                for label, f in self.check_attacks.items()}

    @property
    def clean(self) -> Accuracy:
        return self.record.clean

    @property
    def flags(self) -> list[CheckResult]:
        return [c for c in self.checks if c.flagged]

    def check(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check {name!r}; ran {[c.name for c in self.checks]}")

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "summary": {"protocol": PROTOCOL, "robust": self.robust.to_dict(),
                        "battery_robust": self.battery_robust.to_dict(),
                        "clean": self.clean.to_dict(), "clean_reject_rate": self.record.clean_reject_rate,
                        "threat": self.threat.to_dict(), "budget": self.budget.name,
                        "n": self.record.n, "seed": self.record.seed, "random": self.random,
                        "checks": {c.name: c.verdict for c in self.checks},
                        "flags": [c.name for c in self.flags], "seconds": self.seconds},
            "record": self.record.to_dict(),
            "robust_flags": flags_to_string(self.robust_flags()),
            "checks": [c.to_dict() for c in self.checks],
            "checks_subset_n": self.subset_n,
            "check_attacks": {"index": self.check_index, "robust_flags": self.check_attacks,
                              "fooled_beyond_cascade": self.fooled_by_checks()},
            "battery": [s.to_dict() for s in self.battery],
            "budget": self.budget.to_dict(),
            "model": self.model,
            "sweeps": self.sweeps,
            "plots": self.plots,
            "timing": {"total_seconds": self.seconds,
                       "attacks": [{"attack": a.name, "seconds": a.seconds,
                                    "peak_memory_mb": a.peak_memory_mb} for a in self.record.attacks],
                       "checks_seconds": self.check_seconds},
            "manifest": self.manifest,
        }

    def attack_lines(self) -> list[str]:
        lines = [f"{'attack':26s} {'newly fooled':>12s} {'robust after (Wilson 95%)':>27s} "
                 f"{'time s':>8s} {'peak RSS MB':>11s}"]
        for a in self.record.attacks:
            mem = f"{a.peak_memory_mb:.0f}" if a.peak_memory_mb is not None else "-"
            lines.append(f"{a.name:26s} {a.newly_fooled:12d} {a.accuracy_after.format():>27s} "
                         f"{a.seconds:8.1f} {mem:>11s}")
        return lines

    def to_markdown(self) -> str:
        r, t = self.record, self.threat
        who = " + ".join(p for p in (r.defense if r.defense not in ("", "none") else "",
                                      r.classifier) if p) or self.model.get("type", "model")
        flags = self.flags
        lines = [f"# Robustness audit: {who}", ""]
        lines += [f"Dataset **{r.dataset or '(tensors)'}**, n = {r.n}, threat **{t.describe()}** "
                  f"(bounds {list(t.bounds)}), budget **{self.budget.name}**, seed {r.seed}.", ""]
        robust = self.robust
        lines += [f"- **Worst-case robust accuracy: {robust.format()} %** (Wilson 95% interval, "
                  f"{robust.correct}/{r.n}), over {len(r.attacks)} attacks run as a cascade"
                  + (f" and the {len(self.check_attacks)} runs of the sanity checks' reference "
                     "attack inside the threat model." if self.check_attacks else ".")]
        if self.check_attacks:
            extra = r.robust.correct - robust.correct
            fooled = {k: v for k, v in self.fooled_by_checks().items() if v}
            lines.append(f"- The cascade alone: {r.robust.format()} %; the checks' attacks fooled "
                         f"{extra} more example(s)"
                         + (" (" + "; ".join(f"{k}: {v}" for k, v in fooled.items()) + ")." if fooled else "."))
        lines.append(f"- Clean accuracy: {r.clean.format()} %.")
        if r.clean_reject_rate is not None:
            lines.append(f"- Clean reject rate (detector): {100 * r.clean_reject_rate:.1f} %. "
                         "Rejected adversarial inputs count as robust.")
        randomness = (f"random, so every gradient attack ran through EOT with {self.budget.eot_samples} samples"
                      if self.random else "deterministic")
        lines.append(f"- Randomness: {randomness}.")
        q = self.sweeps.get("one_query")
        if q:
            lo, hi = q["expected_interval"]
            lines.append(f"- Random pipeline, so every run judges its adversarial inputs by one draw and "
                         f"the headline holds against an attacker who may retry. One run of the reference "
                         f"attack scored over {q['draws']} draws: **expected accuracy (one query) "
                         f"{100 * q['expected']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] %** (bootstrap 95%), "
                         f"majority vote {accuracy_of(q['majority']).format()} %, held in every draw "
                         f"{accuracy_of(q['every_draw']).format()} % (on {q['n']} examples).")
        if flags:
            lines.append(f"- **{len(flags)} sanity check(s) flagged: "
                         f"{', '.join(c.name for c in flags)}. Treat the robust accuracy as an upper "
                         "bound that the attacks may not have reached.**")
        elif self.checks:
            lines.append("- All sanity checks passed (or were skipped, see below).")
        lines.append(f"- Total time {self.seconds:.0f} s.")
        lines += ["", "## Attacks", "",
                  "Each attack sees only the examples that every earlier attack left robust, so "
                  "*newly fooled* is what it contributed. Peak memory is the process's peak "
                  "resident set size when the attack finished (a running maximum).", "",
                  "| # | attack | settings | newly fooled | robust after (%) | time (s) | peak RSS (MB) |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for i, a in enumerate(r.attacks, 1):
            settings = ", ".join(f"{k}={v}" for k, v in a.settings.items() if v is not None)
            mem = f"{a.peak_memory_mb:.0f}" if a.peak_memory_mb is not None else "-"
            lines.append(f"| {i} | {a.name} | {settings} | {a.newly_fooled} | "
                         f"{a.accuracy_after.format()} | {a.seconds:.1f} | {mem} |")
        sub = (f"on a seeded subset of {self.subset_n} of the {r.n} examples"
               if self.subset_n is not None and self.subset_n < r.n else "on all examples")
        lines += ["", "## Sanity checks", "",
                  f"Checks that run attacks do so {sub}; the black-box check reads the cascade "
                  "above. See docs/audit.md for what each check means and what to do when it flags.",
                  "", "| check | verdict | examples | time (s) | explanation |", "|---|---|---:|---:|---|"]
        for c in self.checks:
            secs = self.check_seconds.get(c.name)
            lines.append(f"| {c.name} | **{c.verdict}** | {c.n if c.n is not None else '-'} | "
                         f"{'-' if secs is None else f'{secs:.1f}'} | {c.explanation} |")
        if self.plots:
            lines += ["", "## Plots", ""]
            for title, path in self.plots.items():
                lines += [f"![{title}]({path})", ""]
        if self.sweeps:
            lines += ["## Sweeps (reference attack alone)", ""]
            for key in ("eps", "steps"):
                curve = self.sweeps.get(key)
                if curve:
                    cells = ", ".join(f"{p[key]:g}: {accuracy_of(p['accuracy']).format()}" for p in curve)
                    lines.append(f"- accuracy (%) vs {key}: {cells}")
            lines.append("")
        lines += ["## Settings", "", "```json",
                  json.dumps({"budget": self.budget.to_dict(), "threat": t.to_dict(), "model": self.model,
                              "random": self.random, "seed": r.seed,
                              "battery": [s.to_dict() for s in self.battery]}, indent=1, default=str),
                  "```", "", "## Provenance", ""]
        m = self.manifest
        lines += [f"- created {m.get('created')}, git commit `{m.get('git_commit')}`",
                  f"- device: {m.get('device')}",
                  f"- versions: {', '.join(f'{k} {v}' for k, v in m.get('versions', {}).items())}",
                  f"- data hashes: {', '.join(f'{k}={v}' for k, v in m.get('data_hashes', {}).items())}",
                  ""]
        return "\n".join(lines)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        write_json_atomic(out / "audit.json", self.to_dict())
        write_text_atomic(out / "audit.md", self.to_markdown())
        return out


def accuracy_of(d: dict) -> Accuracy:
    return Accuracy(d["correct"], d["n"])


def measures_as_current_protocol(saved: dict) -> bool:
    """Whether a saved ``audit.json`` measured what an audit under ``PROTOCOL`` would."""
    version = saved["summary"].get("protocol", 1)
    if version == PROTOCOL:
        return True
    if version == 4:
        # 5 added the one-query measurement of random pipelines and changed nothing else.
        return not saved["summary"].get("random", False)
    if saved.get("checks"):
        # Before 4 the headline left out what the checks' attacks fooled.
        return False
    labels = [spec["label"] for spec in saved.get("battery", [])]
    if any(label.startswith("detector-pgd") for label in labels):
        return False
    return version == 2 or sanity.UNBOUNDED not in saved["summary"]["flags"]
