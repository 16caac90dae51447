"""Deprecated: Corruption analyses now live in :mod:`aeshield.experiments.analyses`, grouped by kind,
each taking ``(figure, ctx)`` and returning a typed result. This module re-exports them for
one release."""

from __future__ import annotations

import warnings

from .analyses.corruption import corruptions_figure, data_label, measure, plot_relative, render

warnings.warn("aeshield.experiments.corruption_analyses is deprecated; import from aeshield.experiments.analyses",
              DeprecationWarning, stacklevel=2)

__all__ = ["corruptions_figure", "data_label", "measure", "plot_relative", "render"]
