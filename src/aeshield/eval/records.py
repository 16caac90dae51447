"""Deprecated: records are core now, in :mod:`aeshield.records`."""

from .._deprecated import moved
from ..io import write_json_atomic, write_text_atomic  # noqa: F401
from ..records import *  # noqa: F401,F403
from ..records import config_hash, flags_from_string, flags_to_string  # noqa: F401

moved("aeshield.eval.records", "aeshield.records")
