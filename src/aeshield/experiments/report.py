"""Tables and figures, built only from measured records."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..records import Accuracy
from ..io import write_json_atomic, write_text_atomic
from ..stats import paired_difference_interval
from .config import ColumnSpec, ExperimentConfig

if TYPE_CHECKING:
    from .runner import Runner

logger = logging.getLogger(__name__)


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
    mine = _flags(config, entries, row, classifiers, column, "robust")
    theirs = _flags(config, entries, column.versus, classifiers, column, "robust")
    if mine is None or theirs is None or row == column.versus:
        return None
    d = paired_difference_interval(mine, theirs)
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
            flags.append(torch.tensor([True] * records[0].clean.correct + [False] * (records[0].n - records[0].clean.correct)))
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


def _threat_lines(config: ExperimentConfig) -> list[str]:
    lines = []
    for suite in config.suites:
        if not suite.attacks:
            lines.append(f"- suite `{suite.name}`: no attack, clean accuracy on n = "
                         f"{suite.n or config.n} test images")
            continue
        attacks = "; ".join(a.title for a in suite.attacks)
        only = f", only for shield(s) {', '.join(suite.shields)}" if suite.shields else ""
        lines.append(f"- suite `{suite.name}`: threat model {suite.threat.describe()} "
                     f"(white-box, whole pipeline){only}, cascade: {attacks}")
    return lines


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
              f"{config.seed}){_row_sizes(config)}; groups of several classifiers pool their examples. Cells: accuracy % "
              "[Wilson 95% interval]. An example counts as robust only if it survives every restart "
              "and every attack of the cascade.", ""] + _threat_lines(config)
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
                                                       "attacks": [a.to_dict() for a in s.attacks]}
                                                      for s in config.suites],
                                           "cells": cells})
    return markdown


def render_figures(runner: "Runner", out: Path) -> None:
    from .methods import get_figure

    for figure in runner.config.figures:
        get_figure(figure.get("kind"))(runner, figure, out)


def reconstructions_figure(runner: "Runner", figure: dict, out: Path) -> None:
    """Table 3 of the AAA paper: inputs next to each shield's reconstructions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..attacks import pgd
    from ..defenses.base import Shielded

    n = int(figure.get("n", 8))
    test = runner.test.subset(n, seed=runner.config.seed + 7)
    classifier = runner.classifier(figure["classifier"])
    attack_shield = runner.shield(figure["attack_through"]) if figure.get("attack_through") else None
    model = Shielded(attack_shield, classifier) if attack_shield is not None else classifier
    settings = figure.get("attack", {"eps": 0.3, "step_size": 0.01, "steps": 40})
    x_adv = pgd(model, test.images, test.labels, **settings)
    rows = [("clean input", test.images), ("adversarial input", x_adv)]
    for label, name in figure["shields"].items():
        with torch.no_grad():
            rows.append((f"{label}: G(adv)", runner.shield(name)(x_adv)))
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 1.1, len(rows) * 1.2))
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            img = images[c].detach().cpu()
            ax.imshow(img.permute(1, 2, 0).squeeze(-1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    attack = f"PGD L-inf eps={settings.get('eps')} steps={settings.get('steps')}"
    through = f" through {figure.get('attack_through')} + {figure['classifier']}" if attack_shield is not None else ""
    fig.suptitle(f"{runner.config.dataset}: {attack}{through}", fontsize=8)
    fig.tight_layout()
    path = out / figure.get("file", "reconstructions.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
