"""Robust accuracy against the queries a shield's training spent (issue 28's curve).

Every row whose shield reached a classifier only through queries (``query_only``) is a point:
x = the queries its training sent (the count its sidecar records: distillation, refreshes and
gradient estimates, validation included), y = its accuracy in one column of the main table
(e.g. PGD behind the query-only classifier), with the table's interval. Reference rows (no
shield, the white-box shield, the zero-query control) are horizontal bands. Rendered from
``table.json`` and the shields' sidecars: nothing is measured here.
"""

from __future__ import annotations

import json

from ...io import write_text_atomic
from .base import AnalysisContext, AnalysisResult, pyplot, save_png

MARKERS = {"nes": "o", "spsa": "s", "surrogate": "^"}


def query_points(figure: dict, ctx: AnalysisContext) -> tuple[list[dict], list[dict]]:
    """The curve's points (query-only rows) and reference levels, from table.json."""
    table = json.loads((ctx.out / "table.json").read_text())
    group, column = figure["group"], figure["column"]
    cells = {c["row"]: c for c in table["cells"] if c["group"] == group and c["column"] == column}
    points, references = [], []
    for row in ctx.config.rows:
        cell = cells.get(row.label)
        if cell is None:
            continue
        level = {"row": row.label, "accuracy": cell["accuracy"], "ci95": [cell["ci95_low"], cell["ci95_high"]],
                 "n": cell["n"]}
        if row.label in figure.get("references", ()):
            references.append(level)
        spec = ctx.config.shields.get(row.shield) if row.kind == "shield" and row.shield else None
        if spec is None or not getattr(spec, "query_only", ()):
            continue
        ctx.zoo.shield(row.shield)
        sidecar = json.loads(ctx.zoo.store.file_of(f"shield-{row.shield}").with_suffix(".json").read_text())
        points.append({**level, "shield": row.shield, "method": spec.query_method, "output": spec.query_output,
                       "queries": int(sidecar.get("queries", 0)),
                       "train_images": spec.train_limit, "epochs": spec.epochs})
    return points, references


def query_curve(figure: dict, ctx: AnalysisContext) -> AnalysisResult:
    """``{kind: query-curve, group: LABEL, column: LABEL, references: [row labels], file: PNG}``:
    the figure, and a markdown table of the same points beside it (``.md``)."""
    points, references = query_points(figure, ctx)
    png = ctx.out / figure.get("file", "query_curve.png")
    column, group = figure["column"], figure["group"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, ref in enumerate(references):
        color = colors[(k + 3) % len(colors)]
        ax.axhline(100 * ref["accuracy"], color=color, lw=1, ls="--", label=ref["row"])
        ax.axhspan(100 * ref["ci95"][0], 100 * ref["ci95"][1], color=color, alpha=0.12)
    by_kind: dict[tuple, list[dict]] = {}
    for p in points:
        by_kind.setdefault((p["method"], p["output"]), []).append(p)
    for k, ((method, output), group_points) in enumerate(sorted(by_kind.items())):
        group_points.sort(key=lambda p: p["queries"])
        xs = [max(p["queries"], 1) for p in group_points]
        ys = [100 * p["accuracy"] for p in group_points]
        err = [[100 * (p["accuracy"] - p["ci95"][0]) for p in group_points],
               [100 * (p["ci95"][1] - p["accuracy"]) for p in group_points]]
        ax.errorbar(xs, ys, yerr=err, marker=MARKERS.get(method, "o"), capsize=3, color=colors[k % len(colors)],
                    label=f"query-only: {method}, {output}")
    ax.set_xscale("log")
    ax.set_xlabel("queries spent in training (images sent to the classifier)")
    ax.set_ylabel(f"{column} accuracy (%)")
    ax.set_title(f"{ctx.config.name}: {group}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    files = [save_png(fig, png)]
    lines = [f"# Robust accuracy against queries spent ({ctx.config.name}, profile {ctx.config.profile})", "",
             f"Column \"{column}\", group \"{group}\" of table.md (same records, n and intervals). "
             "Queries: images the shield's training sent to the query-only classifier, as its "
             "weight file's sidecar records them.", "",
             "| row | method | answers | training images x epochs | queries | accuracy % [95%] |",
             "|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["method"], p["output"], p["queries"])):
        lines.append(f"| {p['row']} | {p['method']} | {p['output']} | {p['train_images'] or 'all'} x {p['epochs']} "
                     f"| {p['queries']:,} | {100 * p['accuracy']:.1f} [{100 * p['ci95'][0]:.1f}, "
                     f"{100 * p['ci95'][1]:.1f}] |")
    for ref in references:
        lines.append(f"| {ref['row']} (reference) | - | - | - | 0 | {100 * ref['accuracy']:.1f} "
                     f"[{100 * ref['ci95'][0]:.1f}, {100 * ref['ci95'][1]:.1f}] |")
    files.append(write_text_atomic(png.with_suffix(".md"), "\n".join(lines) + "\n"))
    return AnalysisResult(record={"points": points, "references": references}, files=tuple(files))


__all__ = ["query_curve", "query_points"]
