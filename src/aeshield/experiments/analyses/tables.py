"""Tables built from measured records: the target's main table (rows x columns, pooled over
each group's classifiers, with paired differences), the seed paper's transposed PuVAE table,
and the sampled-mode comparison of several pipelines under one cascade."""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ...attacks.registry import Stage, get_attack
from ...eval.audit.budget import get_budget
from ...eval.harness import evaluate
from ...records import Accuracy, EvalRecord
from ...io import write_json_atomic, write_text_atomic
from ...stats import paired_difference_interval
from ...threat import ThreatModel
from ..config import ColumnSpec, ExperimentConfig
from ..record_cache import slug
from .base import AnalysisContext, AnalysisResult, attack_at, data_label, fmt_accuracy, pipeline_key
from .curves import sweep_summary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingResult(AnalysisResult):
    evaluations: dict[str, EvalRecord]  # pipeline label -> its cascade's record


@dataclass(frozen=True)
class PairedDifference:
    """A column's accuracy minus the same column's for another row, on the same examples."""

    value: float
    interval: tuple[float, float]
    n: int
    correct = None  # a difference has no count of correct examples

    def format(self) -> str:
        lo, hi = self.interval
        return f"{100 * self.value:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _cell(config: ExperimentConfig, entries: list[dict], row: str, classifiers: tuple[str, ...],
          column: ColumnSpec) -> Accuracy | PairedDifference | None:
    if column.value != "difference":
        flags = _flags(config, entries, row, classifiers, column, column.value)
        return None if flags is None else Accuracy.from_flags(flags)
    if row == column.versus:
        return None
    pairs = []
    for c in classifiers:
        mine = _flags(config, entries, row, (c,), column, "robust")
        theirs = _flags(config, entries, column.versus, (c,), column, "robust")
        if mine is None or theirs is None:
            return None
        # A row measured on fewer images (its own n) pairs with the first n of the other's: both
        # are prefixes of the same seeded test permutation.
        n = min(len(mine), len(theirs))
        pairs.append((mine[:n], theirs[:n]))
    d = paired_difference_interval(torch.cat([m for m, _ in pairs]), torch.cat([t for _, t in pairs]))
    return PairedDifference(d["difference"], tuple(d["ci95"]), d["n"])


def _flags(config: ExperimentConfig, entries: list[dict], row: str, classifiers: tuple[str, ...],
           column: ColumnSpec, value: str) -> torch.Tensor | None:
    by_key = {(e["row"], e["classifier"], e["suite"]): e["record"] for e in entries}
    suites = column.suites or tuple(s.name for s in config.suites[:1])
    # Suites restricted to some shields do not exist for the other rows: leave them out.
    row_spec = next((r for r in config.rows if r.label == row), None)
    by_name = {s.name: s for s in config.suites}
    if row_spec is not None:
        suites = tuple(s for s in suites if s not in by_name or by_name[s].applies_to(row_spec))
        if not suites:
            return None
    flags = []
    for c in classifiers:
        records = [by_key.get((row, c, s)) for s in suites]
        if any(r is None for r in records):
            return None
        if value == "clean":
            clean = records[0].clean
            flags.append(torch.tensor([True] * clean.correct + [False] * (records[0].n - clean.correct)))
            continue
        if column.after is not None:
            (record,) = records
            match = [a for a in record.attacks if a.name == column.after]
            if not match:
                raise ValueError(f"column {column.label!r}: no attack {column.after!r} in suite {suites[0]}; "
                                 f"have {[a.name for a in record.attacks]}")
            acc = match[0].accuracy_after
            flags.append(torch.tensor([True] * acc.correct + [False] * (acc.n - acc.correct)))
            continue
        # Per-example flags; with no attack in the suite they are the clean ones.
        combined = records[0].flags()
        for r in records[1:]:
            combined &= r.flags()
        flags.append(combined)
    return torch.cat(flags)


def table_cells(config: ExperimentConfig, entries: list[dict]) -> list[dict]:
    cells = []
    for row in config.rows:
        for group in config.groups:
            for column in config.columns:
                acc = _cell(config, entries, row.label, group.classifiers, column)
                if acc is None:
                    continue
                lo, hi = acc.interval
                cells.append({"row": row.label, "group": group.label,
                              "classifiers": list(group.classifiers), "column": column.label,
                              "accuracy": acc.value, "ci95_low": lo, "ci95_high": hi,
                              "correct": acc.correct, "n": acc.n, "text": acc.format(),
                              "measure": ("paired difference, Newcombe interval"
                                          if isinstance(acc, PairedDifference) else "accuracy")})
    return cells


def _audit_line(config: ExperimentConfig, suite, entries: list[dict]) -> str:
    """An audit suite's line: its budget, its n, and each pipeline's battery as its records list it."""
    budget = get_budget(suite.audit)
    batteries: dict[tuple[str, ...], list[str]] = {}  # attack labels -> the rows that ran them
    for row in config.rows:
        records = [e["record"] for e in entries if e["row"] == row.label and e["suite"] == suite.name]
        if records:
            batteries.setdefault(tuple(a.name for a in records[0].attacks), []).append(row.label)
    cascades = "; ".join(f"{', '.join(rows)}: {', '.join(labels)}" for labels, rows in batteries.items())
    only = f", only for shield(s) {', '.join(suite.shields)}" if suite.shields else ""
    if suite.classifiers:
        only += f", only behind classifier(s) {', '.join(suite.classifiers)}"
    return (f"- suite `{suite.name}`: threat model {suite.threat.describe()}{only}, the audit's "
            f"{budget.name} battery (the cascade `aeshield audit` builds for each pipeline at this budget, "
            f"without its sanity checks; PGD: {budget.pgd_steps} steps, {budget.pgd_restarts} "
            f"restart(s); AutoAttack's parts: {budget.apgd_iters} iterations; Square: "
            f"{budget.square_queries} queries) on n = {suite.n or config.n} test images (the first n "
            f"of the same subset); cascade: {cascades or 'not measured yet'}")


def _threat_lines(config: ExperimentConfig, entries: list[dict] | None = None) -> list[str]:
    lines = []
    for suite in config.suites:
        if suite.audit is not None:
            lines.append(_audit_line(config, suite, entries or []))
            continue
        if not suite.attacks:
            lines.append(f"- suite `{suite.name}`: no attack, clean accuracy on n = "
                         f"{suite.n or config.n} test images")
            continue
        attacks = "; ".join(a.title for a in suite.attacks)
        only = f", only for shield(s) {', '.join(suite.shields)}" if suite.shields else ""
        behind = f", only behind classifier(s) {', '.join(suite.classifiers)}" if suite.classifiers else ""
        size = f", n = {suite.n} test images (the first n of the same subset)" if suite.n else ""
        lines.append(f"- suite `{suite.name}`: threat model {suite.threat.describe()} "
                     f"({_access(suite)}, whole pipeline){only}{behind}{size}, cascade: {attacks}")
    return lines


def _access(suite) -> str:
    """What the suite's attacks see: gradients (white-box) or only outputs (black-box)."""
    hooks = [get_attack(a.name).audit for a in suite.attacks]
    blind = [hook is not None and hook.stage is Stage.BLACK_BOX for hook in hooks]
    if all(blind):
        return "black-box: the attack sees only the pipeline's outputs"
    return "white-box and black-box attacks" if any(blind) else "white-box"


def _row_sizes(config: ExperimentConfig) -> str:
    """Rows measured on fewer images than the target's n, named (their intervals are wider)."""
    smaller = [f"{r.label}: n = {r.n}" for r in config.rows if r.n and r.n != config.n]
    return f" except {'; '.join(smaller)} (the first n of the same subset)" if smaller else ""


def render_tables(config: ExperimentConfig, entries: list[dict], out: Path,
                  aliases: dict[str, str] | None = None) -> str:
    cells = table_cells(config, entries)
    source = entries[0]["record"].data_source if entries else ""
    header = [f"# {config.title}", "",
              f"Target `{config.name}`, profile `{config.profile}`. Dataset: {config.dataset} "
              f"({source}). n = {config.n} test images per classifier (seeded subset, seed "
              f"{config.seed}){_row_sizes(config)}; groups of several classifiers pool their examples. "
              "Cells: accuracy % "
              "[Wilson 95% interval]. An example counts as robust only if it survives every restart "
              "and every attack of the cascade.", ""] + _threat_lines(config, entries)
    for alias, source in (aliases or {}).items():
        row = next(r for r in config.rows if r.label == alias)
        header.append(f"- row \"{alias}\" is row \"{source}\": the shield that selection "
                      f"`{row.select}` chose on validation images (selection_{row.select}.md); "
                      "its cells are that row's records")
    if config.notes:
        header += ["", config.notes.strip()]
    lines = header + [""]
    for group in config.groups:
        lines += [f"## {group.label} ({', '.join(group.classifiers)})", "",
                  "| row | " + " | ".join(c.label for c in config.columns) + " |",
                  "|---|" + "---|" * len(config.columns)]
        for row in config.rows:
            texts = []
            for column in config.columns:
                match = [c for c in cells if c["row"] == row.label and c["group"] == group.label
                         and c["column"] == column.label]
                texts.append(match[0]["text"] if match else "-")
            lines.append(f"| {row.label} | " + " | ".join(texts) + " |")
        lines.append("")
    markdown = "\n".join(lines)
    write_text_atomic(out / "table.md", markdown)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["row", "group", "column", "accuracy", "ci95_low",
                                                "ci95_high", "correct", "n"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(cells)
    write_text_atomic(out / "table.csv", buffer.getvalue())
    write_json_atomic(out / "table.json", {"target": config.name, "profile": config.profile,
                                           "dataset": config.dataset, "data_source": source,
                                           "suites": [{"name": s.name, "threat": s.threat.to_dict(),
                                                       "attacks": [a.to_dict() for a in s.attacks],
                                                       **({"audit": get_budget(s.audit).to_dict(),
                                                           "n": s.n or config.n} if s.audit else {})}
                                                      for s in config.suites],
                                           "cells": cells})
    return markdown


def sampling_analysis(figure: dict, ctx: AnalysisContext) -> SamplingResult:
    """The same cascade on several pipelines (e.g. PuVAE sampled with EOT vs. z = mean)."""
    config, data, zoo, out = ctx.config, ctx.data, ctx.zoo, ctx.out
    classifier = figure["classifier"]
    n = int(figure.get("n", 200))
    eps = float(figure.get("eps", 0.3))
    pipelines: dict[str, dict] = figure["pipelines"]  # label -> {shield, attacks}
    spec = {"models": {k: pipeline_key(zoo, v["shield"], classifier) for k, v in pipelines.items()},
            "pipelines": pipelines, "n": n, "eps": eps, "seed": config.seed}

    def compute() -> dict:
        test = data.test.subset(n, seed=config.seed)
        out_rows = {}
        for label, p in pipelines.items():
            model = zoo.shield_pipeline(p["shield"], classifier)
            torch.manual_seed(config.seed)
            record = evaluate(model, test.images, test.labels, [attack_at(a, eps) for a in p["attacks"]],
                              ThreatModel("Linf", eps), batch_size=config.batch_size,
                              seed=config.seed, progress=False)
            out_rows[label] = record.to_dict()
            logger.info("sampling %s: clean %s, robust %s", label, record.clean.format(), record.robust.format())
        return {"pipelines": out_rows, "n": n}

    record = ctx.records.get(figure.get("record", "sampling"), spec, compute)
    lines = ["# PuVAE's sampling: EOT over z ~ q(z|x,y) vs. the deterministic mode (z = mean)", "",
             f"{data_label(config, data.test)}, classifier `{classifier}`, n = {n} test images (seeded subset), "
             f"L-inf eps {eps}. Each pipeline's detector is calibrated in its own mode. Cells: "
             "accuracy % [Wilson 95%] after each attack of the cascade (cumulative worst case).", ""]
    if figure.get("note"):
        lines += [figure["note"].strip(), ""]
    evaluations = {label: EvalRecord.from_dict(r) for label, r in record["pipelines"].items()}
    for label, rec in evaluations.items():
        rr = rec.clean_reject_rate
        lines += [f"## {label}", "", f"clean {rec.clean.format()}" +
                  (f", clean reject rate {100 * rr:.1f}%" if rr is not None else ""), "",
                  "| attack (cumulative) | accuracy |", "|---|---|"]
        lines += [f"| {a.name} | {a.accuracy_after.format()} |" for a in rec.attacks] + [""]
    table = write_text_atomic(out / figure.get("table", "sampling.md"), "\n".join(lines) + "\n")
    return SamplingResult(record=record, files=(table,), evaluations=evaluations)


def paper_table(figure: dict, ctx: AnalysisContext) -> AnalysisResult:
    """Rows = attacks (the config's columns), columns = defenses (the config's rows), plus the
    detector pipeline at its worst-case eps from the sweep record. Built from table.json."""
    config, data, out = ctx.config, ctx.data, ctx.out
    table = json.loads((out / "table.json").read_text())
    cells = {(c["row"], c["column"]): c for c in table["cells"]}
    sweep_path = out / "records" / f"{figure.get('sweep_record', 'eps_sweep')}.json"
    sweep = json.loads(sweep_path.read_text()) if sweep_path.exists() else None
    summary = sweep_summary(sweep) if sweep else None
    worst_map: dict[str, str] = figure.get("worst_eps", {})
    defenses = [r.label for r in config.rows]
    worst_label = figure.get("worst_label", "PuVAE + detector, worst-case eps")
    insert_after = figure.get("worst_after", defenses[-1])
    header = []
    for d in defenses:
        header.append(d)
        if d == insert_after:
            header.append(worst_label)
    lines = [f"# {figure.get('title', config.title)}", "",
             f"The seed paper's layout: rows are attacks, columns are defenses. {data_label(config, data.test)}, "
             f"n = {config.n} test images (seeded subset) for every column except "
             f"\"{worst_label}\", which comes from the eps sweep "
             f"(n = {sweep['n'] if sweep else '-'}, its own seeded subset; the eps with the lowest "
             "accuracy, per attack). Cells: accuracy % [Wilson 95%]. Clean inputs count as correct "
             "only with their true label (a reject is an error); adversarial inputs count as handled "
             "with their true label or a reject.", ""]
    for column in config.columns:
        if column.suites:
            threat = "; ".join(f"`{s}`" for s in column.suites)
            lines.append(f"- **{column.label}**: suites {threat}")
    lines += ["", "| attack | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for column in config.columns:
        texts = []
        for h in header:
            if h == worst_label:
                sweep_label = worst_map.get(column.label)
                if summary and sweep_label in summary["attacks"]:
                    s = summary["attacks"][sweep_label]
                    texts.append(f"{fmt_accuracy(s['worst'])} (eps {s['worst_eps']})")
                else:
                    texts.append("-")
                continue
            c = cells.get((h, column.label))
            if c and _all_skipped(out, h, column):
                texts.append("n/a (no detector)")
            else:
                texts.append(c["text"] if c else "-")
        lines.append(f"| {column.label} | " + " | ".join(texts) + " |")
    lines += ["", "Clean false-reject rate of each pipeline (clean test inputs rejected, n = "
              f"{config.n}):", ""]
    for row in config.rows:
        for path in sorted((out / "records").glob(f"{slug(row.label)}__*.json")):
            if path.name.endswith(".partial.json"):
                continue
            rec = json.loads(path.read_text())
            rr = rec.get("clean_reject_rate")
            lines.append(f"- {row.label}: " + ("no detector" if rr is None else f"{100 * rr:.1f}%"))
            break
    return AnalysisResult(record=None, files=(write_text_atomic(out / figure.get("file", "table_paper.md"),
                                                                "\n".join(lines) + "\n"),))


def _all_skipped(out: Path, row_label: str, column: ColumnSpec) -> bool:
    """True when every attack of the column's suites was not applicable to this pipeline."""
    if not column.suites:
        return False
    for suite in column.suites:
        for path in (out / "records").glob(f"{slug(row_label)}__*__{suite}.json"):
            attacks = json.loads(path.read_text())["attacks"]
            if any("skipped" not in a["settings"] for a in attacks):
                return False
    return True
