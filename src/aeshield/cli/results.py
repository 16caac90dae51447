"""``aeshield report``, ``reproduce`` and ``targets``: tables from records, and the paper targets."""

from __future__ import annotations

import click


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
    click.echo(records_table([EvalRecord.load(p) for p in records], fmt))


@click.command("reproduce")
@click.argument("target")
@click.option("--profile", type=click.Choice(["quick", "paper"]), default="quick", show_default=True,
              help="quick: CPU minutes, reduced budget (stated in the output); paper: the published protocol (GPU).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Results go to OUT/TARGET/PROFILE/ [default: docs/results; runs/smoke with --smoke].")
@click.option("--retrain", is_flag=True, help="Ignore shipped weights; train everything missing from the cache.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--ship", is_flag=True,
              help="Maintainers: also export the config's `ship` artifacts (float16) into the package.")
@click.option("--device", default="cpu", show_default=True,
              help="Torch device for data, training and attacks, e.g. cuda (the paper profile needs one).")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Worker processes for training and evaluation cells [default: one per CPU core, "
                   "at most 4; 1 on an accelerator]. Each cell is seeded by itself, so the schedule "
                   "does not change what is measured.")
@click.option("--smoke", is_flag=True,
              help="Run the profile's whole code path (its models, attacks, figures) at a few images "
                   "and steps, to check that it runs before spending hours on it; numbers are noise. "
                   "Results and artifacts go to runs/smoke unless --out is given.")
def reproduce_cmd(target, profile, out, retrain, no_progress, ship, device, jobs, smoke) -> None:
    """Regenerate a paper's table and figures: TARGET is a config name (see `aeshield targets`)."""
    from ..experiments import reproduce
    from ..experiments.parallel import default_jobs

    if smoke and ship:
        raise click.UsageError("--smoke measures nothing, so it cannot --ship")
    if smoke and out is None:
        out = "runs/smoke"
    jobs = default_jobs(device) if jobs is None else jobs
    path = reproduce(target, profile, out or "docs/results", use_shipped=not retrain,
                     progress=not no_progress, ship=ship, device=device, jobs=jobs, smoke=smoke)
    click.echo(f"\nresults in {path}")


@click.command("targets")
def targets_cmd() -> None:
    """List the reproducible targets."""
    from ..experiments import list_targets

    for t in list_targets():
        click.echo(t)
