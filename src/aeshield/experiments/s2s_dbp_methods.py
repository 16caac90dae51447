"""Deprecated: the S2SNet and DBP runner methods moved to
:mod:`aeshield.experiments.methods.s2snet` and :mod:`aeshield.experiments.methods.dbp`."""

from __future__ import annotations

import warnings

from .methods.dbp import DBP, DBPSpec, load_dbp, train_dbp
from .methods.s2snet import S2SNET, S2SNetSpec, load_s2snet, train_s2snet

warnings.warn("aeshield.experiments.s2s_dbp_methods moved to aeshield.experiments.methods.s2snet "
              "and aeshield.experiments.methods.dbp", DeprecationWarning, stacklevel=2)

__all__ = ["DBP", "DBPSpec", "S2SNET", "S2SNetSpec", "load_dbp", "load_s2snet", "train_dbp",
           "train_s2snet"]
