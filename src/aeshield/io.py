"""Atomic writes: the one way aeshield puts a file on disk.

Every result, checkpoint, weight file, data file and figure is written to a unique temporary
file in the destination's folder and renamed over the destination, so a crash or Ctrl-C never
leaves half a file under the real name, and two processes sharing a cache never read each
other's partial output. A failed write removes its temporary file, and so does an interrupted
one (Ctrl-C, or SIGTERM where the process turns it into an exception, as ``aeshield`` and its
worker processes do). A temporary name carries the writer's process id
(``.<name>.<pid>.<random><suffix>``), so that a process that had to kill a writer outright can
remove what it left (:func:`remove_temp_files`) without touching another process's files.
A writer killed outright (SIGKILL cannot be caught) leaves its temporary behind:
``remove_temporaries`` clears those of a file the caller owns (a trainer, when it starts).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)


def _umask_mode() -> int:
    # mkstemp creates 0600 files; results are meant to be read by others, so honour the umask.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _umask_mode()


def write_atomic(path: str | Path, write: Callable[[Path], None], *, suffix: str = ".tmp",
                 keep_if: Callable[[Path, Path], bool] | None = None,
                 before_replace: Callable[[Path], None] | None = None) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it to ``path``.

    ``suffix`` ends the temporary name (matplotlib picks a figure's format from it).
    ``keep_if(old, new)``, when given and true for an existing ``path``, keeps the old file
    untouched (for writers whose output should not change the bytes that records hash).
    ``before_replace(final)`` is called with the file whose bytes ``path`` will hold (the
    temporary, or the old file that ``keep_if`` keeps) just before the rename: a companion
    file that records those bytes is written there, so that a crash between the two files
    leaves a pair whose record does not match rather than a silently mixed one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # after the writer, which may have recreated the file as 0600
        if keep_if is not None and path.exists() and keep_if(path, tmp):
            tmp.unlink()
            if before_replace is not None:
                before_replace(path)
        else:
            if before_replace is not None:
                before_replace(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ".<name>.<pid>.<mkstemp's 8 random characters>.tmp[<suffix>]"
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.tmp")


def is_temp_file(path: str | Path, pid: int | None = None) -> bool:
    """Whether ``path`` is named as :func:`write_atomic`'s temporary files are (by process
    ``pid``, when given)."""
    match = _TEMP_NAME.match(Path(path).name)
    return match is not None and (pid is None or int(match.group(1)) == pid)


def remove_temp_files(folder: str | Path, pids: set[int] | frozenset[int]) -> list[Path]:
    """Remove the temporary files that processes ``pids`` (killed before they could clean up)
    left anywhere under ``folder``; returns what was removed."""
    removed = []
    folder = Path(folder)
    if not pids or not folder.is_dir():
        return removed
    for candidate in folder.rglob(".*"):
        if candidate.is_file() and any(is_temp_file(candidate, pid) for pid in pids):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def lock_path(path: str | Path) -> Path:
    """The lock file that guards producing ``path``: ``<path>.lock``, beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextmanager
def file_lock(path: str | Path, what: str = "") -> Iterator[bool]:
    """Hold an exclusive lock on the lock file ``path`` while the block runs, so that two
    processes (or threads) sharing a cache do not produce the same file at once: the second
    waits, then (re-checking in the block) finds the file there. ``what`` names what the
    lock guards in the one log line a wait prints.

    The lock is the operating system's (``filelock``: flock on Unix), so a process that dies
    releases it; the (empty) lock file stays. Where it cannot be created (a read-only cache,
    someone else's file) the block runs unlocked, as it did before there were locks; the
    block receives whether it holds the lock.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    lock = FileLock(str(path))
    locked = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("waiting for another process to finish %s (lock %s)", what or path.stem, path)
            lock.acquire()
        locked = True
    except OSError as err:  # Timeout is one too, but only the first acquire has a timeout
        logger.debug("cannot lock %s (%s); going on without the lock", path, err)
    try:
        yield locked
    finally:
        if locked:
            lock.release()


def temporaries(path: str | Path) -> list[Path]:
    """The temporary files ``write_atomic`` made for ``path`` and never renamed (a writer killed
    mid-write): ``.<name>.<pid>.<8 random characters>.tmp[<suffix>]`` in ``path``'s folder."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+\.)?[a-z0-9_]{{8}}\.tmp(\.[^.]*)?")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return sorted(path.parent / n for n in names if pattern.fullmatch(n))


def remove_temporaries(*paths: str | Path) -> list[Path]:
    """Delete the temporaries left beside each of ``paths`` by writers killed mid-write; returns them.

    Call it only for files the caller owns (a trainer's checkpoint and output), when no other
    live process writes them: a temporary being filled right now looks the same as a stale one.
    """
    removed = []
    for path in paths:
        for tmp in temporaries(path):
            try:
                tmp.unlink()
            except FileNotFoundError:
                continue
            removed.append(tmp)
    return removed


def _write_stream(write: Callable[[BinaryIO], None]) -> Callable[[Path], None]:
    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    return to_file


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, _write_stream(lambda handle: handle.write(data)))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` so that a crash never leaves a half-written file behind."""
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, default=json_default) + "\n")


def save_figure_atomic(fig, path: str | Path, *, dpi: int = 110, close: bool = True) -> Path:
    """Save a matplotlib figure (format from ``path``'s suffix) and close it."""
    path = Path(path)
    written = write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi), suffix=f".tmp{path.suffix}")
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return written


def json_default(obj: Any) -> Any:
    """JSON for the objects records hold: paths, dataclasses with ``to_dict``, enums, tensors."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "value"):
        return obj.value
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialize {type(obj).__name__}")
