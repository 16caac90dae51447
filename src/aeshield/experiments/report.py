"""Deprecated: Tables and figures now live in :mod:`aeshield.experiments.analyses`, grouped by kind,
each taking ``(figure, ctx)`` and returning a typed result. This module re-exports them for
one release."""

from __future__ import annotations

import warnings

from .analyses.figures import reconstructions_figure
from .analyses.tables import PairedDifference, render_tables, table_cells

warnings.warn("aeshield.experiments.report is deprecated; import from aeshield.experiments.analyses",
              DeprecationWarning, stacklevel=2)

__all__ = ["PairedDifference", "reconstructions_figure", "render_tables", "table_cells"]
