"""Deprecated: S2SNet and DBP analyses now live in :mod:`aeshield.experiments.analyses`, grouped by kind,
each taking ``(figure, ctx)`` and returning a typed result. This module re-exports them for
one release."""

from __future__ import annotations

import warnings

from .analyses.curves import THREAT_MODELS, noise_sweep, strength_curves
from .analyses.gradients import (
    GRADIENT_KINDS,
    RECONSTRUCTION,
    SMOOTHNESS,
    auddc_analysis,
    gradient_similarity,
    smoothness,
)
from .analyses.latent import gmm_analysis

warnings.warn("aeshield.experiments.s2s_dbp_analyses is deprecated; import from aeshield.experiments.analyses",
              DeprecationWarning, stacklevel=2)

__all__ = ["GRADIENT_KINDS", "RECONSTRUCTION", "SMOOTHNESS", "THREAT_MODELS", "auddc_analysis",
           "gmm_analysis", "gradient_similarity", "noise_sweep", "smoothness", "strength_curves"]
