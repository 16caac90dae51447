"""Deprecated: the intervals are core now, in :mod:`aeshield.stats`."""

from .._deprecated import moved
from ..stats import *  # noqa: F401,F403

moved("aeshield.eval.stats", "aeshield.stats")
