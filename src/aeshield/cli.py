"""The ``aeshield`` command: thin commands over library functions."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import __version__


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
def main(verbose: bool) -> None:
    """aeshield: autoencoder shields for frozen classifiers, and attacks that test them."""
    _setup_logging(verbose)


# ---- data ---------------------------------------------------------------------------------
@main.group()
def data() -> None:
    """Fetch and inspect datasets."""


@data.command("fetch")
@click.argument("name", type=click.Choice(["mnist", "fashion-mnist", "cifar10"]))
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Cache root (default: $AESHIELD_CACHE, else the user cache dir).")
def data_fetch(name: str, cache_dir: str | None) -> None:
    """Download (or find) dataset NAME, verify its checksums and store it in the cache."""
    from .data import DataError, fetch

    try:
        path = fetch(name, root=cache_dir)
    except DataError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{name}: verified files in {path}")


# ---- models -------------------------------------------------------------------------------
@main.command("models")
@click.option("--kind", type=click.Choice(["classifier", "autoencoder"]), default=None,
              help="Only list this kind of model.")
def models_cmd(kind: str | None) -> None:
    """List the architectures of the zoo and the shipped weight files."""
    from .models import MODELS
    from .models.io import shipped_dir

    for name, spec in sorted(MODELS.items()):
        if kind is None or spec.kind == kind:
            click.echo(f"{name:18s} {spec.kind:12s} {spec.dataset:14s} {spec.description}")
    if shipped_dir().exists():
        click.echo("\nshipped weights:")
        for side in sorted(shipped_dir().glob("*.json")):
            meta = json.loads(side.read_text())
            click.echo(f"  {side.stem:24s} {meta.get('kind', ''):10s} {meta['architecture']:14s} "
                       f"{meta['dataset']}")


# ---- train --------------------------------------------------------------------------------
@main.group()
def train() -> None:
    """Train classifiers and shields (checkpointed; re-run the same command to resume)."""


@train.command("classifier")
@click.option("--model", "model_name", required=True, help="Architecture name (see `aeshield models`).")
@click.option("--dataset", required=True, type=click.Choice(["mnist", "fashion-mnist", "cifar10"]),
              help="Training dataset.")
@click.option("--epochs", default=3, show_default=True, help="Passes over the training split.")
@click.option("--batch-size", default=128, show_default=True, help="Mini-batch size.")
@click.option("--lr", default=1e-3, show_default=True, help="Learning rate.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True,
              help="Adam, or SGD with Nesterov momentum 0.9.")
@click.option("--seed", default=0, show_default=True, help="Seed of initialization and data order.")
@click.option("--train-limit", type=int, default=None, help="Use only N training images.")
@click.option("--augment/--no-augment", default=False, show_default=True,
              help="Random crop (pad 4) and horizontal flip, for CIFAR-10.")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Output .safetensors path (a .json sidecar is written beside it).")
def train_classifier_cmd(model_name, dataset, epochs, batch_size, lr, optimizer, seed, train_limit,
                         augment, out) -> None:
    """Naturally train a zoo classifier and save it with its sidecar."""
    from .models import MODELS
    from .train.classifier import ClassifierConfig, train_classifier

    if model_name not in MODELS:
        raise click.BadParameter(f"unknown model; choose from {', '.join(sorted(MODELS))}",
                                 param_hint="--model")
    cfg = ClassifierConfig(model=model_name, dataset=dataset, epochs=epochs, batch_size=batch_size,
                           lr=lr, optimizer=optimizer, seed=seed, train_limit=train_limit,
                           augment=augment)
    _, info = train_classifier(cfg, out)
    click.echo(f"saved {out}: clean test accuracy {100 * info['clean_accuracy']:.2f}%")


@train.command("aaa")
@click.option("--classifier", "classifiers", multiple=True, required=True,
              help="Frozen classifier(s) to train against: shipped name or path; repeat for an ensemble.")
@click.option("--dataset", required=True, type=click.Choice(["mnist", "fashion-mnist", "cifar10"]),
              help="Training dataset (the classifiers' sidecars must name it).")
@click.option("--autoencoder", default="conv-ae", show_default=True, help="Autoencoder architecture.")
@click.option("--loss", type=click.Choice(["xent", "mse", "xent+mse"]), default="xent+mse",
              show_default=True, help="Outer loss of the saddle point.")
@click.option("--lam", default=0.01, show_default=True, help="Weight of the mse term in xent+mse.")
@click.option("--eps", default=0.3, show_default=True, help="L-inf radius of the training attack.")
@click.option("--step-size", default=0.01, show_default=True, help="Training PGD step size.")
@click.option("--attack-steps", default=40, show_default=True, help="Training PGD steps.")
@click.option("--epochs", default=10, show_default=True, help="Epochs.")
@click.option("--train-limit", type=int, default=None, help="Use only N training images.")
@click.option("--seed", default=0, show_default=True, help="Seed.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Output .safetensors path.")
def train_aaa_cmd(classifiers, dataset, autoencoder, loss, lam, eps, step_size, attack_steps, epochs,
                  train_limit, seed, out) -> None:
    """Train an AAA shield in front of frozen classifiers (resumes from <out>.ckpt)."""
    import torch

    from .data import load_dataset
    from .defenses.aaa import AAAConfig, train_aaa
    from .models import create_model
    from .models.io import load_weights, save_weights

    frozen = [load_weights(c, dataset=dataset)[0] for c in classifiers]
    train_set = load_dataset(dataset, "train")
    if train_limit:
        train_set = train_set.subset(train_limit, seed=seed)
    val = load_dataset(dataset, "val").subset(500, seed=1)
    torch.manual_seed(seed)  # the initial weights too, so that --seed alone fixes the shield
    g = create_model(autoencoder)
    cfg = AAAConfig(loss=loss, lam=lam, eps=eps, step_size=step_size, attack_steps=attack_steps,
                    epochs=epochs, seed=seed)
    out_path = Path(out).with_suffix(".safetensors")
    result = train_aaa(g, frozen, train_set.images, train_set.labels, cfg, x_val=val.images,
                       y_val=val.labels, checkpoint=out_path.with_suffix(".ckpt"))
    save_weights(g, out_path, architecture=autoencoder, dataset=dataset, kind="shield", method="aaa",
                 trained_against=list(classifiers), config=result.config, history=result.history,
                 data_hash=train_set.sha256)
    out_path.with_suffix(".ckpt").unlink(missing_ok=True)
    click.echo(f"saved shield {out_path}")


# ---- attack / eval ------------------------------------------------------------------------
class RegisteredAttack(click.Choice):
    """The registered attacks' names, read each time click asks (parsing, help, completion), so
    that an attack registered after this module was imported is a choice too."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        from .attacks import attack_names

        return tuple(attack_names())

    @choices.setter
    def choices(self, _value) -> None:
        pass  # click.Choice.__init__ assigns the fixed list this class replaces


def _attack_settings(name: str, options: dict) -> dict:
    """The eval command's shared options (--steps, --step-size, --restarts) that attack ``name``
    takes, as its settings dataclass declares them."""
    from .attacks import get_attack

    return {key: options[key] for key in getattr(get_attack(name).settings, "command_line", ())}


@main.command("eval")
@click.option("--classifier", required=True, help="Shipped classifier name or .safetensors path.")
@click.option("--shield", default=None, help="Optional shield (shipped name or path) in front of it.")
@click.option("--dataset", required=True, type=click.Choice(["mnist", "fashion-mnist", "cifar10"]),
              help="Dataset whose test split is attacked.")
@click.option("--attack", "attacks", multiple=True, type=RegisteredAttack(),
              default=["pgd"], show_default=True, help="Attack(s), run as a cascade; repeatable.")
@click.option("--norm", type=click.Choice(["Linf", "L2"]), default="Linf", show_default=True,
              help="Threat model norm.")
@click.option("--eps", type=float, default=0.3, show_default=True, help="Threat model radius.")
@click.option("--steps", type=int, default=40, show_default=True, help="Iterations (PGD/BIM/CW).")
@click.option("--step-size", type=float, default=0.01, show_default=True, help="PGD/BIM step size.")
@click.option("--restarts", type=int, default=1, show_default=True, help="PGD random restarts.")
@click.option("--wrap", type=click.Choice(["none", "bpda", "eot", "classifier"]), default="none",
              show_default=True, help="Model adaptation applied before attacking (see docs).")
@click.option("--n", "n", type=int, default=1000, show_default=True, help="Test images (seeded subset).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of subset and attacks.")
@click.option("--batch-size", type=int, default=500, show_default=True, help="Attack batch size.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the record JSON here.")
def eval_cmd(classifier, shield, dataset, attacks, norm, eps, steps, step_size, restarts, wrap, n,
             seed, batch_size, out) -> None:
    """Evaluate a (shielded) classifier under attack; prints accuracy with a Wilson interval."""
    from . import load_classifier, load_shield
    from .data import load_dataset
    from .defenses.base import Shielded
    from .eval import AttackSpec, evaluate
    from .records import manifest
    from .io import write_json_atomic
    from .threat import ThreatModel

    clf = load_classifier(classifier)
    model = Shielded(load_shield(shield), clf) if shield else clf
    test = load_dataset(dataset, "test").subset(n, seed=seed)
    shared = {"steps": steps, "step_size": step_size, "restarts": restarts}
    specs = [AttackSpec(a, _attack_settings(a, shared), wrap=None if wrap == "none" else wrap)
             for a in attacks]
    threat = ThreatModel(norm, eps)
    record = evaluate(model, test.images, test.labels, specs, threat, batch_size=batch_size,
                      seed=seed, defense=shield or "none", classifier=classifier, dataset=dataset,
                      data_source=test.source, data_hash=test.sha256)
    click.echo(f"{dataset} ({test.source}), n={record.n}, threat {threat.describe()}")
    click.echo(f"clean accuracy:  {record.clean.format()}")
    for a in record.attacks:
        click.echo(f"after {a.name:30s} {a.accuracy_after.format()}  ({a.seconds:.1f}s)")
    click.echo(f"robust accuracy: {record.robust.format()} (worst case over the cascade)")
    if out:
        record.save(out)
        write_json_atomic(Path(out).with_suffix(".manifest.json"),
                          manifest({"command": sys.argv}, {dataset: test.sha256}))


main.add_command(eval_cmd, name="attack")


def _register_audit() -> None:
    from .eval.audit_cli import audit_cmd

    main.add_command(audit_cmd, name="audit")


_register_audit()

# Modules that add their own commands: each defines ``register(main, train)``.
PLUGINS: tuple[str, ...] = ("aeshield.cli_purifiers", "aeshield.cli_s2s_dbp")


def _register_plugins() -> None:
    import importlib

    for name in PLUGINS:
        importlib.import_module(name).register(main, train)


_register_plugins()


# ---- report / reproduce -------------------------------------------------------------------
@main.command("report")
@click.argument("records", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["markdown", "csv"]), default="markdown",
              show_default=True, help="Table format.")
def report_cmd(records, fmt) -> None:
    """Print a table built from record JSON files (never typed by hand)."""
    from .records import EvalRecord
    from .eval.tables import records_table

    if not records:
        raise click.UsageError("give one or more record JSON files")
    click.echo(records_table([EvalRecord.load(p) for p in records], fmt))


@main.command("reproduce")
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
    from .experiments import reproduce
    from .experiments.parallel import default_jobs

    if smoke and ship:
        raise click.UsageError("--smoke measures nothing, so it cannot --ship")
    if smoke and out is None:
        out = "runs/smoke"
    jobs = default_jobs(device) if jobs is None else jobs
    path = reproduce(target, profile, out or "docs/results", use_shipped=not retrain,
                     progress=not no_progress, ship=ship, device=device, jobs=jobs, smoke=smoke)
    click.echo(f"\nresults in {path}")


@main.command("targets")
def targets_cmd() -> None:
    """List the reproducible targets."""
    from .experiments import list_targets

    for t in list_targets():
        click.echo(t)


if __name__ == "__main__":  # pragma: no cover
    main()
