"""The ``aeshield`` command: thin commands over library functions, one module per verb group.

Choices (datasets, models, attacks, budgets) come from the registries, and training options from
the trainers' config dataclasses (``options.config_option``), so nothing here is a second list.
"""

from __future__ import annotations

import logging

import click

from .. import __version__
from .audit import audit_cmd
from .autoencoder import ae_attack_cmd
from .data import data
from .evaluate import eval_cmd
from .models import models_cmd
from .results import report_cmd, reproduce_cmd, targets_cmd
from .signals import install_signal_handlers
from .train import train


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
def main(verbose: bool) -> None:
    """aeshield: autoencoder shields for frozen classifiers, and attacks that test them."""
    _setup_logging(verbose)
    install_signal_handlers()  # SIGINT/SIGTERM: clean stop, one line, exit 130/143 (cli/signals.py)


for _command, _name in ((data, "data"), (models_cmd, "models"), (train, "train"), (eval_cmd, "eval"),
                        (eval_cmd, "attack"), (audit_cmd, "audit"), (ae_attack_cmd, "ae-attack"),
                        (report_cmd, "report"), (reproduce_cmd, "reproduce"), (targets_cmd, "targets")):
    main.add_command(_command, name=_name)

__all__ = ["main"]
