"""Deprecated: PuVAE / MagNet analyses now live in :mod:`aeshield.experiments.analyses`, grouped by kind,
each taking ``(figure, ctx)`` and returning a typed result. This module re-exports them for
one release."""

from __future__ import annotations

import warnings

from .analyses.curves import WORST, eps_sweep, sweep_summary
from .analyses.detectors import detector_analysis
from .analyses.figures import figure6
from .analyses.tables import paper_table, sampling_analysis

warnings.warn("aeshield.experiments.puvae_analyses is deprecated; import from aeshield.experiments.analyses",
              DeprecationWarning, stacklevel=2)

__all__ = ["WORST", "detector_analysis", "eps_sweep", "figure6", "paper_table",
           "sampling_analysis", "sweep_summary"]
