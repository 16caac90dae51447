"""Deprecated: DRAW is a model architecture, now in :mod:`aeshield.models.draw`."""

from .._deprecated import moved
from ..models.draw import *  # noqa: F401,F403
from ..models.draw import DRAW, draw_attn_mnist, draw_mnist  # noqa: F401

moved("aeshield.defenses.draw", "aeshield.models.draw")
