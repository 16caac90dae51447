"""``aeshield audit``: the robustness audit as a command (a thin layer over ``eval.audit.audit``)."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import click

from .options import (COUNT, EPS, Choice, check_cli_compatible, classifier_options, data_options, data_spec,
                      deployed_pipeline, deployment_description, device_option, force_option, guard_published,
                      load_cli_classifier, load_cli_data, progress_option, resolve_device, seed_option,
                      source_checkout)
from ..eval.audit import BUDGETS, measures_as_current_protocol

logger = logging.getLogger(__name__)

# The radii the literature reports for each dataset (Madry et al.; Croce and Hein; RobustBench).
DEFAULT_EPS = {("mnist", "Linf"): 0.3, ("fashion-mnist", "Linf"): 0.1, ("cifar10", "Linf"): 8 / 255,
               ("mnist", "L2"): 2.0, ("fashion-mnist", "L2"): 1.5, ("cifar10", "L2"): 0.5}


def _slug(text: str) -> str:
    """A folder name for a shield or classifier spec (a path's file stem; a factory spec with
    its punctuation turned into dashes)."""
    if text.endswith((".safetensors", ".pt2")) and ":" not in text:
        text = Path(text).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _echo_report(report) -> None:
    click.echo(f"clean accuracy:  {report.clean.format()} %"
               + (f"   clean reject rate {100 * report.record.clean_reject_rate:.1f} %"
                  if report.record.clean_reject_rate is not None else ""))
    for line in report.attack_lines():
        click.echo(line)
    for c in report.checks:
        secs = report.check_seconds.get(c.name)
        click.echo(c.line() + (f"  ({secs:.1f}s)" if secs is not None else ""))
    flags = report.flags
    checks = (f" and {len(report.check_attacks)} check runs inside the threat model (the cascade "
              f"alone: {report.battery_robust.format()} %)" if report.check_attacks else "")
    click.echo(f"robust accuracy: {report.robust.format()} % (worst case over {len(report.record.attacks)} "
               f"attacks{checks}, Wilson 95%); {len(flags)} flag(s); {report.seconds:.0f} s in all")


def weights_digest(name_or_path: str) -> str:
    """SHA-256 of the weight file a name resolves to: what an audit's numbers depend on."""
    import hashlib

    from ..models.io import resolve_weights

    return hashlib.sha256(resolve_weights(name_or_path).read_bytes()).hexdigest()


def _weights_used(classifier: str, shield: str | None, surrogate: str | None, known: dict | None = None) -> dict:
    """The SHA-256 of each role's weights. ``known`` gives those of loaded classifier specs
    (``ModelInfo.weights_sha256``: the weights file, or for a factory spec without one the
    hash of its state_dict); a name not in it is hashed as a weight file."""
    known = known or {}
    return {role: known.get(role) or weights_digest(name) for role, name in
            (("classifier", classifier), ("shield", shield), ("surrogate", surrogate)) if name}


def _run_one(*, classifier: str, shield: str | None, surrogate: str | None, dataset: str | None, norm: str,
             eps: float, budget: str, n: int, seed: int, batch_size: int, device: str,
             out: Path | None, progress: bool, data_file: str | None = None, normalize=None, force: bool = False):
    from ..threat import ThreatModel
    from ..eval.audit import audit

    threat = ThreatModel(norm, eps)
    data_spec(dataset, data_file)
    clf, info = load_cli_classifier(classifier, normalize, device)
    sur, sur_info = load_cli_classifier(surrogate, None, device) if surrogate else (None, None)
    test = load_cli_data(dataset, data_file, n=n, seed=seed, num_classes=info.num_classes)
    forced = check_cli_compatible(test, [(clf, info)] + ([(sur, sur_info)] if sur is not None else []),
                                  shield=shield, force=force)
    dataset = test.name
    model = deployed_pipeline(shield, clf, device) if shield else clf
    test = test.to(device)
    digests = _weights_used(classifier, shield, surrogate,
                            {"classifier": info.weights_sha256,
                             "surrogate": sur_info.weights_sha256 if sur_info else None})
    click.echo(f"auditing {shield + ' + ' if shield else ''}{classifier} on {dataset} ({test.source}), "
               f"n={len(test)}, threat {threat.describe()}, budget {budget}")
    return audit(model, test.images, test.labels, threat, budget=budget, surrogate=sur, seed=seed,
                 out=out, progress=progress, batch_size=batch_size, defense=shield or "none",
                 classifier=classifier, dataset=dataset, data_source=test.source,
                 data_hash=test.sha256, config={"command": sys.argv, "surrogate_name": surrogate,
                                                 "weights_sha256": digests,
                                                 "deployment": deployment_description(shield),
                                                 **({"normalize": info.normalize} if info.normalize else {}),
                                                 **({"forced_mismatches": forced} if forced else {})})


def _finished_audit(path: Path, *, classifier: str, shield: str, surrogate: str | None, norm: str,
                    eps: float, budget: str, n: int, seed: int) -> dict | None:
    """The summary of a finished audit at ``path`` if it measured exactly this (same weight
    files, threat, budget, subset and seed), so ``--all-shipped`` need not run it again."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        summary, manifest = saved["summary"], saved["manifest"]["config"]
        threat = summary["threat"]
        same = (summary["budget"] == budget and summary["n"] == n and summary["seed"] == seed
                and threat["norm"] == norm and abs(threat["eps"] - eps) < 1e-9
                and manifest.get("weights_sha256") == _weights_used(classifier, shield, surrogate)
                and manifest.get("deployment") == deployment_description(shield)
                and measures_as_current_protocol(saved))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return summary if same else None


@click.command("audit", context_settings={"help_option_names": ["-h", "--help"]})
@classifier_options(required=False, help="The classifier to audit (required unless --all-shipped)")
@click.option("--shield", default=None,
              help="Shield (shipped name or path) put in front of the classifier; omit to audit the bare classifier.")
@click.option("--surrogate", default=None,
              help="An independently trained classifier (name or path) for a transfer attack.")
@data_options
@click.option("--norm", type=Choice(["Linf", "L2"]), default="Linf", show_default=True,
              help="Threat model norm.")
@click.option("--eps", type=EPS, default=None,
              help="Threat model radius in [0, 1] pixel units (default: 0.3/0.1/8/255 for Linf on "
                   "mnist/fashion-mnist/cifar10, 2.0/1.5/0.5 for L2; --all-shipped uses the shield's "
                   "training eps for Linf).")
@click.option("--budget", type=Choice(list(BUDGETS)), default="quick", show_default=True,
              help="quick: CPU minutes, reduced AutoAttack budget; standard: GPU; paper: the standard "
                   "AutoAttack budget and 100-step PGD with 20 restarts.")
@click.option("--n", "n", type=COUNT, default=1000, show_default=True,
              help="Number of test images (a seeded subset).")
@seed_option()
@click.option("--batch-size", type=COUNT, default=500, show_default=True, help="Attack batch size.")
@device_option("auto")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Directory for audit.md, audit.json and the plots (and the checkpoints that let a "
                   "crashed audit resume). Default: print only; runs/audit with --all-shipped.")
@click.option("--publish", is_flag=True,
              help="Maintainers: write into the source checkout's docs/results/audit (one pair: its "
                   "SHIELD__CLASSIFIER folder there).")
@click.option("--all-shipped", is_flag=True,
              help="Audit every shipped shield against each classifier its sidecar lists in "
                   "trained_against; one report per pair under --out, plus index.md.")
@click.option("--reuse-only", is_flag=True,
              help="With --all-shipped: write index.md from the reports that are up to date and list "
                   "the other pairs as not audited, instead of running them (for audits run as "
                   "separate processes, one pair each).")
@force_option()
@progress_option()
def audit_cmd(classifier, normalize, shield, surrogate, dataset, data_file, norm, eps, budget, n, seed, batch_size,
              device, out, publish, all_shipped, reuse_only, force, progress) -> None:
    """Attack a (shielded) classifier with the full audit battery, run the gradient-masking
    sanity checks and write the report (see docs/audit.md)."""
    device = resolve_device(device)
    if publish:
        if out is not None:
            raise click.UsageError("--publish writes to the checkout's docs/results/audit; drop --out")
        if source_checkout() is None:
            raise click.UsageError("--publish writes into aeshield's source tree; run it from a git checkout")
        out = source_checkout() / "docs" / "results" / "audit"
        if not all_shipped and classifier:  # one pair: its folder in the published index
            out = out / (f"{_slug(shield)}__{_slug(classifier)}" if shield else _slug(classifier))
        out = str(out)
    if out is not None:
        guard_published(Path(out), publish)
    if all_shipped:
        _all_shipped(surrogate=surrogate, norm=norm, eps=eps, budget=budget, n=n, seed=seed,
                     batch_size=batch_size, device=device,
                     out=Path(out) if out else Path("runs/audit"), progress=progress,
                     reuse_only=reuse_only)
        return
    if reuse_only:
        raise click.UsageError("--reuse-only goes with --all-shipped")
    if not classifier:
        raise click.UsageError("give --classifier (or --all-shipped)")
    if not dataset and not data_file:
        raise click.UsageError("give --dataset NAME or --data SPEC (or --all-shipped)")
    if eps is None:
        from ..data.user import registered_name

        named = dataset or registered_name(data_spec(dataset, data_file))
        if (named, norm) not in DEFAULT_EPS:
            raise click.UsageError("give --eps: there is no customary radius for your own data")
        eps = DEFAULT_EPS[(named, norm)]
    report = _run_one(classifier=classifier, shield=shield, surrogate=surrogate, dataset=dataset,
                      data_file=data_file, normalize=normalize, force=force, norm=norm, eps=eps, budget=budget, n=n,
                      seed=seed, batch_size=batch_size, device=device, out=Path(out) if out else None,
                      progress=progress)
    _echo_report(report)
    if out:
        click.echo(f"report: {Path(out) / 'audit.md'}")


def _training_eps(meta: dict) -> float | None:
    """The L-inf radius a shield was trained at: ``config`` for a shield trained by ``aeshield
    train``, ``shield_spec`` for one shipped by ``reproduce --ship`` (reading only ``config`` once
    audited the Fashion-MNIST shields at the 0.1 default instead of their 0.2)."""
    for section in ("config", "shield_spec"):
        eps = (meta.get(section) or {}).get("eps")
        if eps is not None:
            return float(eps)
    return None


def _all_shipped(*, surrogate, norm, eps, budget, n, seed, batch_size, device, out: Path,
                 progress: bool, reuse_only: bool = False) -> None:
    from ..models.io import resolve_weights, shipped_dir
    from ..records import Accuracy
    from ..io import write_text_atomic

    shields = []
    if shipped_dir().exists():
        for side in sorted(shipped_dir().glob("*.json")):
            meta = json.loads(side.read_text())
            if meta.get("kind") == "shield":
                shields.append((side.stem, meta))
    if not shields:
        raise click.ClickException(f"no shipped shields (sidecars with \"kind\": \"shield\") in {shipped_dir()}")
    rows = []
    for name, meta in shields:
        dataset = meta["dataset"]
        # Audit the shield behind the classifiers it was trained with and those it transfers to.
        against = list(meta.get("trained_against") or []) + list(meta.get("transfer_classifiers") or [])
        if not against:
            rows.append((name, "-", "-", "-", "-", "-", "-", "sidecar lists no trained_against classifier"))
            continue
        trained_eps = _training_eps(meta)
        radius = eps if eps is not None else (
            float(trained_eps) if trained_eps is not None and norm == "Linf" else DEFAULT_EPS[(dataset, norm)])
        for clf in against:
            sub = f"{_slug(name)}__{_slug(str(clf))}"
            try:
                done = _finished_audit(out / sub / "audit.json", classifier=str(clf), shield=name,
                                       surrogate=surrogate, norm=norm, eps=radius, budget=budget, n=n,
                                       seed=seed)
            except FileNotFoundError:
                done = None
            if done is not None:
                click.echo(f"{name} + {clf}: audit in {out / sub} is up to date (same weights and settings)")
                # A report that ran no checks has no separate cascade figure.
                clean, robust, cascade = (Accuracy(d["correct"], d["n"]) for d in (
                    done["clean"], done["robust"], done.get("battery_robust", done["robust"])))
                rows.append((name, str(clf), dataset, f"{norm} {radius:g}", clean.format(),
                             cascade.format(), f"[{robust.format()}]({sub}/audit.md)",
                             ", ".join(done["flags"]) or "none"))
                continue
            if reuse_only:
                try:
                    resolve_weights(str(clf))
                    why = "not audited yet at these weights and settings"
                except FileNotFoundError as err:
                    why = f"skipped: {err}"
                rows.append((name, str(clf), dataset, f"{norm} {radius:g}", "-", "-", "-", why))
                continue
            try:
                report = _run_one(classifier=str(clf), shield=name, surrogate=surrogate, dataset=dataset,
                                  norm=norm, eps=radius, budget=budget, n=n, seed=seed,
                                  batch_size=batch_size, device=device, out=out / sub, progress=progress)
            except (FileNotFoundError, ValueError) as err:
                click.echo(f"skipping {name} + {clf}: {err}", err=True)
                rows.append((name, str(clf), dataset, f"{norm} {radius:g}", "-", "-", "-", f"skipped: {err}"))
                continue
            _echo_report(report)
            flags = ", ".join(c.name for c in report.flags) or "none"
            rows.append((name, str(clf), dataset, f"{norm} {radius:g}", report.clean.format(),
                         report.battery_robust.format(), f"[{report.robust.format()}]({sub}/audit.md)",
                         flags))
    lines = ["# Audits of the shipped shields", "",
             f"Budget **{budget}**, n = {n} test images per audit, seed {seed}. Accuracies in % with "
             "Wilson 95% intervals. *robust* is the worst case per example over every attack of the "
             "audit: the cascade and the sanity checks' runs inside the threat model; *cascade* leaves "
             "out the checks' runs, so where the two differ the cascade had not converged (or, on a "
             "random pipeline, the extra runs drew other randomness; docs/audit.md, Limits). "
             "See docs/audit.md for how to read a report.", "",
             "| shield | classifier | dataset | threat | clean | cascade | robust | flagged checks |",
             "|---|---|---|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    index = write_text_atomic(out / "index.md", "\n".join(lines) + "\n")
    click.echo(f"index: {index}")
