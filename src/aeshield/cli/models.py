"""``aeshield models``: the zoo's architectures and the shipped weight files."""

from __future__ import annotations

import json

import click


@click.command("models")
@click.option("--kind", type=click.Choice(["classifier", "autoencoder"]), default=None,
              help="Only list this kind of model.")
def models_cmd(kind: str | None) -> None:
    """List the architectures of the zoo and the shipped weight files."""
    from ..models import MODELS
    from ..models.io import shipped_dir

    for name, spec in sorted(MODELS.items()):
        if kind is None or spec.kind == kind:
            click.echo(f"{name:18s} {spec.kind:12s} {spec.dataset:14s} {spec.description}")
    if shipped_dir().exists():
        click.echo("\nshipped weights:")
        for side in sorted(shipped_dir().glob("*.json")):
            meta = json.loads(side.read_text())
            click.echo(f"  {side.stem:24s} {meta.get('kind', ''):10s} {meta['architecture']:14s} "
                       f"{meta['dataset']}")
