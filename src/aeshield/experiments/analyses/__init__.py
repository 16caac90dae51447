"""Analyses: the ``figures`` entries of a target, grouped by kind.

- ``tables``: the target's main table, the PuVAE paper's transposed table, the sampled mode;
- ``curves``: accuracy against attack strength (PuVAE's eps sweep, S2SNet's strength curves and
  input-noise sweep);
- ``gradients``: gradient-map similarity, Jacobian smoothness, AUDDC;
- ``detectors``: held-out false-positive rates and PuVAE's RMSE gap;
- ``latent``: DBP's encoder + Gaussian-mixture classifier;
- ``corruption``: accuracy under common corruptions (AAA's Figure 1);
- ``figures``: reconstructions (AAA's Table 3, PuVAE's Figure 6);
- ``queries``: robust accuracy against the queries a query-only shield's training spent.

Each is ``fn(figure, ctx) -> AnalysisResult`` (see ``base``); a config names it by its kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ...eval.corruptions import library as corruption_library
from .base import AnalysisContext, AnalysisResult
from .corruption import corruptions_figure
from .curves import eps_sweep, noise_sweep, strength_curves
from .detectors import detector_analysis
from .figures import figure6, reconstructions_figure
from .gradients import auddc_analysis, gradient_similarity, smoothness
from .latent import gmm_analysis
from .queries import query_curve
from .tables import paper_table, sampling_analysis

Analysis = Callable[[dict, AnalysisContext], AnalysisResult]

# A config's ``figures`` entry ``{kind: NAME, ...}`` runs ANALYSES[NAME]; add a line to add one.
ANALYSES: dict[str, Analysis] = {
    "reconstructions": reconstructions_figure,
    "puvae-sweep": eps_sweep,
    "puvae-figure6": figure6,
    "puvae-detectors": detector_analysis,
    "puvae-sampling": sampling_analysis,
    "puvae-paper-table": paper_table,
    "s2s-curves": strength_curves,
    "s2s-noise": noise_sweep,
    "s2s-gradients": gradient_similarity,
    "dbp-smoothness": smoothness,
    "dbp-auddc": auddc_analysis,
    "gmm-latent": gmm_analysis,
    "corruptions": corruptions_figure,
    "query-curve": query_curve,
}


# Kinds that need an optional package: kind -> a loader that raises MissingExtraError without it.
REQUIRES: dict[str, Callable[[], object]] = {
    "corruptions": corruption_library,
}


def check_available(figures: Iterable[dict]) -> None:
    """``MissingExtraError`` now, before a run trains anything, if a figure needs a missing extra."""
    for figure in figures:
        loader = REQUIRES.get(figure.get("kind"))
        if loader is not None:
            loader()


def get_analysis(kind: str | None) -> Analysis:
    if kind not in ANALYSES:
        raise ValueError(f"unknown figure kind {kind!r}; known: {sorted(ANALYSES)}")
    return ANALYSES[kind]


def run_analyses(figures: Iterable[dict], ctx: AnalysisContext) -> list[AnalysisResult]:
    """Every ``figures`` entry of a config, in order (a later one may read an earlier one's
    record, e.g. the paper table reads the eps sweep)."""
    return [get_analysis(figure.get("kind"))(figure, ctx) for figure in figures]


__all__ = ["ANALYSES", "REQUIRES", "Analysis", "AnalysisContext", "AnalysisResult", "check_available",
           "get_analysis", "run_analyses"]
