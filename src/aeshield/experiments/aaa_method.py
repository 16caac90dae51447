"""Deprecated: AAA's runner method moved to :mod:`aeshield.experiments.methods.aaa`."""

from __future__ import annotations

import warnings

from .methods.aaa import METHOD, config, load, train

warnings.warn("aeshield.experiments.aaa_method moved to aeshield.experiments.methods.aaa",
              DeprecationWarning, stacklevel=2)

__all__ = ["METHOD", "config", "load", "train"]
