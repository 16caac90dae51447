"""Ctrl-C and SIGTERM for every ``aeshield`` command: stop cleanly, say so in one line, exit 130/143.

Python turns SIGINT into KeyboardInterrupt (which click reports as "Aborted!" with status 1) and
lets SIGTERM kill the process on the spot, skipping every ``finally`` and leaving an atomic
write's temporary file behind. While a command runs, both signals instead raise
:class:`Interrupted`, a ``SystemExit`` with the conventional status (128 + the signal's number):
the stack unwinds (an interrupted atomic write removes its temporary file; ``reproduce`` stops
its worker processes first, see ``experiments.parallel``), click lets it through, and when the
command's context closes one line on stderr says what happened and that running the same
command again resumes (training is checkpointed, finished records and artifacts are kept).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import click

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(SystemExit):
    """A command stopped by ``signum``; its exit status is ``128 + signum`` (130 for SIGINT,
    143 for SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(exit_code(signum))
        self.signum = signum


def exit_code(signum: int) -> int:
    """The shell's status for a process ended by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def message(signum: int, command: str | None = None) -> str:
    """The one line printed after a command was stopped by ``signum``."""
    then = "resume where it stopped" if command in _RESUMABLE else "start over"
    return (f"aeshield: interrupted by {signal_name(signum)}; nothing half-written was left. "
            f"Run the same command again to {then}.")


# Commands whose work is checkpointed or cached (a re-run skips what is done).
_RESUMABLE = {"reproduce", "train", "audit"}


class _Handlers:
    def __init__(self) -> None:
        self.received: int | None = None
        self.count = 0
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.received is None:
            self.received = signum
            raise Interrupted(signum)
        if self.count >= 3:  # a cleanup that hangs: the third signal ends the process as it is
            os._exit(exit_code(self.received))
        # The second: ignored, so that an impatient Ctrl-C does not cut the cleanup short.

    def install(self) -> bool:
        if self.previous or threading.current_thread() is not threading.main_thread():
            return False
        for signum in SIGNALS:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue  # ignored by whoever started us (a background job's SIGINT): keep it so
            self.previous[signum] = previous
            signal.signal(signum, self.handle)
        return bool(self.previous)

    def restore(self) -> int | None:
        """Put the previous handlers back; the signal that stopped the command, if one did."""
        for signum, previous in self.previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self.previous = {}
        received, self.received, self.count = self.received, None, 0
        return received


_HANDLERS = _Handlers()


def install_signal_handlers(ctx: click.Context | None = None) -> None:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` until ``ctx`` (default: the current
    click context) closes; then the previous handlers come back, and if a signal stopped the
    command, one line on stderr says so. A no-op off the main thread (where Python cannot set
    handlers), when already installed, and for a signal the process was started ignoring."""
    ctx = ctx or click.get_current_context()
    if _HANDLERS.install():
        ctx.call_on_close(lambda: _report(_HANDLERS.restore(), ctx.invoked_subcommand))


def _report(signum: int | None, command: str | None) -> None:
    if signum is not None:
        print(message(signum, command), file=sys.stderr, flush=True)


__all__ = ["Interrupted", "exit_code", "install_signal_handlers", "message", "signal_name"]
