"""Corruption robustness: the AAA paper's Figure 1 and its tables.

``{kind: corruptions, ...}`` in a config's ``figures`` measures, for every (row, classifier),
the accuracy under each corruption and severity (:mod:`aeshield.eval.corruptions`), one
cached record per pair, then writes ``corruptions.md``/``.csv`` and, with ``file``, the
Figure-1 plot: per corruption, accuracy change relative to the naturally trained classifier
for each other row, one panel per classifier. Keys (all optional):

- ``n``: test images (seeded subset; default the config's ``n``); ``seed``: corruption seed;
- ``corruptions``: names (default all 19); ``skip``: names left out (say why in the notes);
- ``severities`` (default 1-5); ``rows``: row labels (default all); ``classifiers``;
- ``baseline``: the row the plot subtracts (default the first ``natural`` row);
- ``label``: data label on every output (default: the test set's source for CIFAR-10, and
  "<dataset> with imagecorruptions corruptions (not the official MNIST-C)" for the digits).
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...eval.corruptions import (
    ALL_CORRUPTIONS,
    COMMON_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    CorruptionCache,
    CorruptionResult,
    corruption_accuracy,
    library_version,
)
from ...io import write_text_atomic
from ..config import ExperimentConfig, spec_dict
from ..record_cache import slug
from .base import AnalysisContext, AnalysisResult, pyplot, save_png

logger = logging.getLogger(__name__)


_DIGIT_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def data_label(config: ExperimentConfig, test, figure: dict) -> str:
    if figure.get("label"):
        return str(figure["label"])
    if config.dataset in _DIGIT_NAMES:
        return (f"{_DIGIT_NAMES[config.dataset]} with imagecorruptions corruptions "
                "(not the official MNIST-C)")
    return f"{test.source} with imagecorruptions corruptions"


def _selection(config: ExperimentConfig, figure: dict) -> tuple[list[str], list[int], list, list[str]]:
    skip = set(figure.get("skip", ()))
    unknown = (set(figure.get("corruptions", ())) | skip) - set(ALL_CORRUPTIONS)
    if unknown:
        raise ValueError(f"unknown corruption(s) {sorted(unknown)}; known: {', '.join(ALL_CORRUPTIONS)}")
    corruptions = [c for c in figure.get("corruptions", ALL_CORRUPTIONS) if c not in skip]
    severities = [int(s) for s in figure.get("severities", SEVERITIES)]
    labels = figure.get("rows") or [r.label for r in config.rows]
    rows = []
    for label in labels:
        match = [r for r in config.rows if r.label == label]
        if not match:
            raise ValueError(f"corruption figure names unknown row {label!r}")
        rows.append(match[0])
    classifiers = figure.get("classifiers") or [c for g in config.groups for c in g.classifiers]
    return corruptions, severities, rows, list(classifiers)


def measure(figure: dict, ctx: AnalysisContext) -> dict[tuple[str, str], CorruptionResult]:
    """One cached record per (row, classifier); generation is shared through the disk cache."""
    config, zoo = ctx.config, ctx.zoo
    corruptions, severities, rows, classifiers = _selection(config, figure)
    n = int(figure.get("n", config.n))
    seed = int(figure.get("seed", config.seed))
    test = ctx.data.test.subset(n, seed=config.seed)
    cache = CorruptionCache.default()
    label = data_label(config, ctx.data.test, figure)
    results = {}
    for row in rows:
        for classifier in classifiers:
            zoo.pipeline(row, classifier)  # loads the weights, so their hashes are known
            spec = {"row": spec_dict(row), "classifier": classifier,
                    "model": zoo.model_key(row, classifier),
                    "weights": zoo.weights_of(row, classifier), "corruptions": corruptions,
                    "severities": severities, "n": n, "subset_seed": config.seed,
                    "corruption_seed": seed, "library": f"imagecorruptions-imaug {library_version()}"}

            def compute(row=row, classifier=classifier) -> dict:
                model, defense = zoo.pipeline(row, classifier)
                result = corruption_accuracy(model, test.images, test.labels, corruptions=corruptions,
                                             severities=severities, seed=seed, cache=cache,
                                             batch_size=config.batch_size)
                logger.info("%s | %s: clean %s, mean over %d corruption cells %s", row.label,
                            classifier, result.clean.format(), len(result.cells),
                            result.mean(corruptions).format())
                return {**result.to_dict(), "row": row.label, "classifier": classifier,
                        "defense": defense, "data_label": label, "n_images": n,
                        "test_indices_hash": test.sha256[:16]}

            record = ctx.records.get(f"corruptions__{slug(row.label)}__{classifier}", spec, compute)
            results[(row.label, classifier)] = CorruptionResult.from_dict(record)
    ctx.timings["corruption generation (this run)"] = cache.seconds_generating
    # counts, not seconds: they show whether this run generated or reused the corrupted sets
    ctx.timings["corrupted sets generated (count)"] = cache.generated
    ctx.timings["corrupted sets read from cache (count)"] = cache.reused
    return results


def _pct(acc) -> str:
    return "-" if acc is None else acc.format()


def render(config: ExperimentConfig, test, figure: dict, results: dict, out: Path) -> str:
    corruptions, severities, rows, classifiers = _selection(config, figure)
    label = data_label(config, test, figure)
    n = int(figure.get("n", config.n))
    skipped = [c for c in ALL_CORRUPTIONS if c not in corruptions]
    common = [c for c in corruptions if c in COMMON_CORRUPTIONS]
    extra = [c for c in corruptions if c in EXTRA_CORRUPTIONS]
    lines = [f"# Corruption robustness: {label}", "",
             f"Target `{config.name}`, profile `{config.profile}`. n = {n} test images "
             f"per cell (seeded subset, seed {config.seed}), corruptions of "
             f"imagecorruptions-imaug {library_version()} at severities "
             f"{', '.join(map(str, severities))}. Cells: accuracy % [Wilson 95% interval]; a "
             "reject counts as an error.",
             f"Mean (common) pools the {len(common)} common corruptions x {len(severities)} "
             f"severities = {len(common) * len(severities)} cells"
             + (" (the full mean over 75)" if len(common) * len(severities) == 75 else
                " (NOT the full 75: see skipped)")
             + f"; mean (extra) pools the {len(extra)} extra ones. The means' n counts predictions "
             "(cells x images); the same images recur in every cell, so their intervals are "
             "narrower than an honest one.",
             f"Skipped corruptions: {', '.join(skipped) if skipped else 'none'}."]
    if figure.get("notes"):
        lines += ["", str(figure["notes"]).strip()]
    lines += ["", "## Means", "", "| row | classifier | clean | mean (common) | n (common) | "
              "mean (extra) | n (extra) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for c in classifiers:
            r = results[(row.label, c)]
            mc, me = r.mean(common), r.mean(extra)
            lines.append(f"| {row.label} | {c} | {_pct(r.clean)} | {_pct(mc)} | "
                         f"{mc.n if mc else 0} | {_pct(me)} | {me.n if me else 0} |")
    lines += ["", "## Per corruption (mean over severities)", "",
              "| corruption | " + " | ".join(f"{row.label} / {c}" for row in rows for c in classifiers) + " |",
              "|---|" + "---|" * (len(rows) * len(classifiers))]
    for name in corruptions:
        cells = [results[(row.label, c)].mean([name]) for row in rows for c in classifiers]
        lines.append(f"| {name} | " + " | ".join(f"{100 * a.value:.1f}" for a in cells) + " |")
    lines += ["", "Per-severity cells with intervals: `corruptions.csv`; raw counts: "
              "`records/corruptions__*.json`."]
    markdown = "\n".join(lines) + "\n"
    write_text_atomic(out / "corruptions.md", markdown)

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["data", "row", "classifier", "corruption", "severity", "accuracy",
                     "ci95_low", "ci95_high", "correct", "n"])
    for row in rows:
        for c in classifiers:
            r = results[(row.label, c)]
            entries = [("clean", 0, r.clean)] + [(k, s, a) for (k, s), a in r.cells.items()]
            for name, severity, a in entries:
                lo, hi = a.interval
                writer.writerow([label, row.label, c, name, severity, f"{a.value:.4f}", f"{lo:.4f}",
                                 f"{hi:.4f}", a.correct, a.n])
    write_text_atomic(out / "corruptions.csv", buffer.getvalue())
    return markdown


def plot_relative(config: ExperimentConfig, test, figure: dict, results: dict, out: Path) -> Path:
    """AAA paper Figure 1: accuracy change vs the natural classifier, per corruption."""
    plt = pyplot()
    corruptions, severities, rows, classifiers = _selection(config, figure)
    base_label = figure.get("baseline") or next(r.label for r in rows if r.kind == "natural")
    others = [r for r in rows if r.label != base_label]
    fig, axes = plt.subplots(len(classifiers), 1, figsize=(max(8, 0.55 * len(corruptions)),
                                                            2.6 * len(classifiers)),
                             sharex=True, squeeze=False)
    x = np.arange(len(corruptions))
    width = 0.8 / max(1, len(others))
    for ax, c in zip(axes[:, 0], classifiers):
        base = results[(base_label, c)]
        for k, row in enumerate(others):
            r = results[(row.label, c)]
            delta = [100 * (r.mean([name]).value - base.mean([name]).value) for name in corruptions]
            ax.bar(x + (k - (len(others) - 1) / 2) * width, delta, width, label=row.label)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylabel(f"{c}: change (pts)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="best")
    axes[-1, 0].set_xticks(x)
    axes[-1, 0].set_xticklabels(corruptions, rotation=60, ha="right", fontsize=7)
    n = int(figure.get("n", config.n))
    fig.suptitle(f"{data_label(config, test, figure)}\naccuracy change relative to {base_label} per "
                 f"corruption (mean over severities {min(severities)}-{max(severities)}), "
                 f"n = {n} images per cell", fontsize=8)
    fig.tight_layout()
    return save_png(fig, out / figure["file"])


@dataclass(frozen=True)
class CorruptionFigureResult(AnalysisResult):
    """Accuracy under every corruption and severity, by (row label, classifier)."""

    results: dict[tuple[str, str], CorruptionResult]


def corruptions_figure(figure: dict, ctx: AnalysisContext) -> CorruptionFigureResult:
    results = measure(figure, ctx)
    print(render(ctx.config, ctx.data.test, figure, results, ctx.out))
    files = [ctx.out / "corruptions.md", ctx.out / "corruptions.csv"]
    if figure.get("file"):
        files.append(plot_relative(ctx.config, ctx.data.test, figure, results, ctx.out))
    return CorruptionFigureResult(record=None, files=tuple(files), results=results)
