"""``aeshield eval`` (alias ``attack``): a (shielded) classifier under a cascade of attacks."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .options import dataset_choice


class RegisteredAttack(click.Choice):
    """The registered attacks' names, read each time click asks (parsing, help, completion), so
    that an attack registered after this module was imported is a choice too."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        from ..attacks import attack_names

        return tuple(attack_names())

    @choices.setter
    def choices(self, _value) -> None:
        pass  # click.Choice.__init__ assigns the fixed list this class replaces


def _attack_settings(name: str, options: dict) -> dict:
    """The eval command's shared options (--steps, --step-size, --restarts) that attack ``name``
    takes, as its settings dataclass declares them."""
    from ..attacks import get_attack

    return {key: options[key] for key in getattr(get_attack(name).settings, "command_line", ())}


@click.command("eval")
@click.option("--classifier", required=True, help="Shipped classifier name or .safetensors path.")
@click.option("--shield", default=None, help="Optional shield (shipped name or path) in front of it.")
@click.option("--dataset", required=True, type=dataset_choice(),
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
    from .. import load_classifier, load_shield
    from ..data import load_dataset
    from ..defenses.base import Shielded
    from ..eval import AttackSpec, evaluate
    from ..records import manifest
    from ..io import write_json_atomic
    from ..threat import ThreatModel

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
