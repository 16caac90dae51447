"""The ``aeshield`` command: thin commands over library functions, one module per verb group.

Choices (datasets, models, attacks, budgets) come from the registries, and training options from
the trainers' config dataclasses (``options.config_option``), so nothing here is a second list.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from .. import __version__
from ..errors import AeshieldError
from .audit import audit_cmd
from .autoencoder import ae_attack_cmd
from .data import data
from .evaluate import eval_cmd
from .export import export_cmd
from .models import models_cmd
from .results import report_cmd, reproduce_cmd, targets_cmd
from .signals import install_signal_handlers
from .train import train


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _short(message: str) -> str:
    """The first line of a message, for the one-line error (the rest is for --debug)."""
    return message.strip().splitlines()[0] if message.strip() else message


class _Group(click.Group):
    """The ``aeshield`` group: a user error ends in one or two lines on stderr and exit status
    2, never a traceback (``--debug`` or ``AESHIELD_DEBUG=1`` re-raises it)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or os.environ.get("AESHIELD_DEBUG") == "1"
        try:
            return super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as done:  # --help, --version
            sys.exit(done.exit_code)
        except click.exceptions.Abort:
            click.echo("aeshield: interrupted; run the same command again to resume", err=True)
            sys.exit(130)
        except click.UsageError as err:
            if debug:
                raise
            where = err.ctx.command_path if err.ctx is not None else "aeshield"
            click.echo(f"error: {_short(err.format_message())}", err=True)
            click.echo(f"(see `{where} --help`)", err=True)
            sys.exit(2)
        except click.ClickException as err:
            if debug:
                raise
            click.echo(f"error: {_short(err.format_message())}", err=True)
            sys.exit(2)
        except (AeshieldError, OSError) as err:
            if debug:
                raise
            click.echo(f"error: {_short(_describe(err))}", err=True)
            sys.exit(2)
        except Exception as err:  # a bug in aeshield, not the user's doing
            if debug:
                raise
            click.echo(f"internal error: {type(err).__name__}: {_short(str(err))}", err=True)
            click.echo("this is a bug in aeshield: re-run with --debug for the traceback and report it",
                       err=True)
            sys.exit(1)


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, AeshieldError) and err.filename is not None:
        return f"{err.strerror or err}: {err.filename}"
    return str(err)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
def main(verbose: bool, debug: bool) -> None:
    """aeshield: autoencoder shields for frozen classifiers, and attacks that test them.

    train, eval, audit and reproduce also run on several processes, GPUs or machines when
    started by torchrun (`torchrun --nproc-per-node N --no-python -- aeshield ...`), with the
    numbers of one process.
    """
    _setup_logging(verbose)
    install_signal_handlers()  # SIGINT/SIGTERM: clean stop, one line, exit 130/143 (cli/signals.py)


for _command, _name in ((data, "data"), (models_cmd, "models"), (train, "train"), (eval_cmd, "eval"),
                        (eval_cmd, "attack"), (audit_cmd, "audit"), (ae_attack_cmd, "ae-attack"),
                        (report_cmd, "report"), (reproduce_cmd, "reproduce"), (targets_cmd, "targets"),
                        (export_cmd, "export")):
    main.add_command(_command, name=_name)

__all__ = ["main"]
