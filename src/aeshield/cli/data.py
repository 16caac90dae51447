"""``aeshield data``: fetch and inspect datasets."""

from __future__ import annotations

import click

from .options import dataset_choice


@click.group()
def data() -> None:
    """Fetch and inspect datasets."""


@data.command("fetch")
@click.argument("name", type=dataset_choice())
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Cache root (default: $AESHIELD_CACHE, else the user cache dir).")
def data_fetch(name: str, cache_dir: str | None) -> None:
    """Download (or find) dataset NAME, verify its checksums and store it in the cache."""
    from ..data import DataError, fetch

    try:
        path = fetch(name, root=cache_dir)
    except DataError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{name}: verified files in {path}")
