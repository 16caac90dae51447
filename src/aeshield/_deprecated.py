"""Shims for modules that moved: importing the old path still works for one release, and warns."""

from __future__ import annotations

import warnings


def moved(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; import it from there (the old path goes in the next "
                  "release)", DeprecationWarning, stacklevel=3)
