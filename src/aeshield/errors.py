"""aeshield's own errors: each is a mistake the user can fix, and its message says how.

The command line prints an ``AeshieldError`` as one or two lines on stderr and exits with
status 2 (``--debug`` shows the traceback); any other exception is a bug in aeshield. Each
subclass also derives from the built-in exception a Python caller would expect (``ValueError``
for a bad value, ``FileNotFoundError`` for missing data, ``ImportError`` for a missing extra),
so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class AeshieldError(Exception):
    """A user error: the message names what was given, what was expected and what to do."""


class ConfigError(AeshieldError, ValueError):
    """An argument, option or config value out of its range or of the wrong type."""


class WeightsError(AeshieldError, ValueError):
    """A weight file that is missing, corrupted, or made for another architecture or dataset."""


class DataMissingError(AeshieldError, FileNotFoundError):
    """A dataset that is not in the cache; the message names the command that fetches it."""


class MissingExtraError(AeshieldError, ImportError):
    """An optional dependency group is not installed; the message gives the pip command."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        super().__init__(f"{feature} needs the optional package {module!r}: "
                         f"pip install 'aeshield[{extra}]'")
        self.extra = extra


def require(module: str, *, extra: str, feature: str):
    """``import module``, or ``MissingExtraError`` naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but one of its own imports failed: not ours to hide
        raise MissingExtraError(feature, extra, module) from exc


def nearest(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or an empty string."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
