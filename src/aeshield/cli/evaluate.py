"""``aeshield eval`` (alias ``attack``): a (shielded) classifier under a cascade of attacks."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .options import (COUNT, EPS, SIZE, Choice, check_cli_compatible, classifier_options, data_options, data_spec,
                      deployed_pipeline, device_option, force_option, load_cli_classifier, load_cli_data,
                      progress_option, resolve_device, seed_option)


class RegisteredAttack(Choice):
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
@classifier_options(required=True)
@click.option("--shield", default=None, help="Optional shield (shipped name or path) in front of it.")
@data_options
@click.option("--attack", "attacks", multiple=True, type=RegisteredAttack(),
              default=["pgd"], show_default=True, help="Attack(s), run as a cascade; repeatable.")
@click.option("--norm", type=Choice(["Linf", "L2"]), default="Linf", show_default=True,
              help="Threat model norm.")
@click.option("--eps", type=EPS, default=0.3, show_default=True,
              help="Threat model radius in pixel units of [0, 1] images (L-inf: at most 1).")
@click.option("--steps", type=COUNT, default=40, show_default=True, help="Iterations (PGD/BIM/CW).")
@click.option("--step-size", type=SIZE, default=0.01, show_default=True, help="PGD/BIM step size.")
@click.option("--restarts", type=COUNT, default=1, show_default=True, help="PGD random restarts.")
@click.option("--wrap", type=Choice(["none", "bpda", "eot", "classifier"]), default="none",
              show_default=True, help="Model adaptation applied before attacking (see docs).")
@click.option("--n", "n", type=COUNT, default=1000, show_default=True, help="Test images (seeded subset).")
@seed_option()
@click.option("--batch-size", type=COUNT, default=500, show_default=True, help="Attack batch size.")
@device_option()
@progress_option()
@force_option()
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the record JSON here.")
def eval_cmd(classifier, normalize, shield, dataset, data_file, attacks, norm, eps, steps, step_size, restarts, wrap,
             n, seed, batch_size, device, progress, force, out) -> None:
    """Evaluate a (shielded) classifier under attack; prints accuracy with a Wilson interval."""
    from ..eval import AttackSpec, evaluate
    from ..records import manifest
    from ..io import write_json_atomic
    from ..threat import ThreatModel

    device = resolve_device(device)
    threat = ThreatModel(norm, eps)
    data_spec(dataset, data_file)  # a usage error before any file is read
    clf, info = load_cli_classifier(classifier, normalize, device)
    test = load_cli_data(dataset, data_file, n=n, seed=seed, num_classes=info.num_classes)
    forced = check_cli_compatible(test, [(clf, info)], shield=shield, force=force)
    model = deployed_pipeline(shield, clf, device) if shield else clf  # detectors included
    test = test.to(device)
    shared = {"steps": steps, "step_size": step_size, "restarts": restarts}
    specs = [AttackSpec(a, _attack_settings(a, shared), wrap=None if wrap == "none" else wrap)
             for a in attacks]
    name = test.name
    record = evaluate(model, test.images, test.labels, specs, threat, batch_size=batch_size,
                      seed=seed, defense=shield or "none", classifier=classifier, dataset=name,
                      data_source=test.source, data_hash=test.sha256, progress=progress)
    click.echo(f"{name} ({test.source}), n={record.n}, threat {threat.describe()}")
    rejected = (f"   clean reject rate {100 * record.clean_reject_rate:.1f} % (a reject counts as robust "
                "under attack)" if record.clean_reject_rate is not None else "")
    click.echo(f"clean accuracy:  {record.clean.format()}{rejected}")
    for a in record.attacks:
        click.echo(f"after {a.name:30s} {a.accuracy_after.format()}  ({a.seconds:.1f}s)")
    click.echo(f"robust accuracy: {record.robust.format()} (worst case over the cascade)")
    if forced:
        click.echo(f"forced past {len(forced)} mismatch(es) with --force: {'; '.join(forced)}")
    if out:
        record.save(out)
        write_json_atomic(Path(out).with_suffix(".manifest.json"),
                          manifest({"command": sys.argv, "forced_mismatches": forced,
                                    "classifier": {"spec": classifier, "weights_sha256": info.weights_sha256,
                                                   "normalize": info.normalize}},
                                   {name: test.sha256}))
