"""``aeshield report``, ``reproduce`` and ``targets``: tables from records, and the paper targets."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (Choice, device_option, guard_published, jobs_option, progress_option, resolve_device,
                      source_checkout)


@click.command("report")
@click.argument("records", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["markdown", "csv"]), default="markdown",
              show_default=True, help="Table format.")
def report_cmd(records, fmt) -> None:
    """Print a table built from record JSON files (never typed by hand)."""
    from ..records import EvalRecord
    from ..eval.tables import records_table

    if not records:
        raise click.UsageError("give one or more record JSON files")
    click.echo(records_table([_record(p, EvalRecord) for p in records], fmt))


def _record(path: str, record_type):
    """The evaluation record in ``path``, or one line saying why it is not one."""
    import json

    from ..errors import ConfigError

    try:
        return record_type.load(path)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not a JSON file ({err})") from err
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConfigError(f"{path}: not an aeshield evaluation record ({type(err).__name__}: {err}); records "
                          "are written by `aeshield eval --out` and `aeshield reproduce`") from err


@click.command("reproduce")
@click.argument("target")
@click.option("--profile", type=Choice(["quick", "paper"]), default="quick", show_default=True,
              help="quick: CPU minutes, reduced budget (stated in the output); paper: the published protocol (GPU).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Results go to OUT/TARGET/PROFILE/ [default: runs/results; runs/smoke with --smoke].")
@click.option("--publish", is_flag=True,
              help="Maintainers: write into the source checkout's docs/results (the committed results).")
@click.option("--retrain", is_flag=True, help="Ignore shipped weights; train everything missing from the cache.")
@progress_option()
@click.option("--ship", is_flag=True,
              help="Maintainers: also export the config's `ship` artifacts (float16) into the package "
                   "(a source checkout only).")
@device_option()
@jobs_option("Worker processes for training and evaluation cells [default: one per CPU core, at most 4; 1 on "
             "an accelerator]. Each cell is seeded by itself, so the order of the cells does not change what "
             "is measured; the torch threads per process (1 per worker, all for --jobs 1) can, by round-off. "
             "Under torchrun the ranks are the workers (each job and cell on one rank) and --jobs is not used.")
@click.option("--smoke", is_flag=True,
              help="Run the profile's whole code path (its models, attacks, figures) at a few images "
                   "and steps, to check that it runs before spending hours on it; numbers are noise. "
                   "Results and artifacts go to runs/smoke unless --out is given.")
def reproduce_cmd(target, profile, out, publish, retrain, progress, ship, device, jobs, smoke) -> None:
    """Regenerate a paper's table and figures: TARGET is a config name (see `aeshield targets`)."""
    from ..errors import nearest
    from ..experiments import list_targets, reproduce
    from ..experiments.parallel import default_jobs

    if target not in list_targets():
        raise click.UsageError(f"unknown target {target!r}{nearest(target, list_targets())}; "
                               "`aeshield targets` lists them")
    if smoke and (ship or publish):
        raise click.UsageError("--smoke measures nothing, so it cannot --ship or --publish")
    if publish and out is not None:
        raise click.UsageError("--publish writes to the checkout's docs/results; drop --out")
    if (ship or publish) and source_checkout() is None:
        raise click.UsageError("--ship and --publish write into aeshield's own source tree; run them from a "
                               "git checkout with an editable install (pip install -e .)")
    if publish:
        out = str(source_checkout() / "docs" / "results")
    elif out is None:
        out = "runs/smoke" if smoke else "runs/results"
    guard_published(Path(out), publish)
    device = resolve_device(device)
    jobs = default_jobs(device) if jobs is None else jobs
    path = reproduce(target, profile, out, use_shipped=not retrain, progress=progress, ship=ship,
                     device=device, jobs=jobs, smoke=smoke)
    click.echo(f"\nresults in {path}")


@click.command("targets")
def targets_cmd() -> None:
    """List the reproducible targets."""
    from ..experiments import list_targets

    for t in list_targets():
        click.echo(t)
