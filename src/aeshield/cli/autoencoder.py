"""``aeshield ae-attack``: the AUDDC of an autoencoder (the S2SNet / DBP work)."""

from __future__ import annotations

import json

import click

from .options import COUNT, Choice, dataset_choice, device_option, resolve_device, seed_option


@click.command("ae-attack")
@click.argument("weights", type=click.Path(exists=True, dir_okay=False))
@click.option("--dataset", required=True, type=dataset_choice(image_size=(28, 28)),
              help="Dataset whose test split supplies the (original, target) pairs.")
@click.option("--mode", type=Choice(["output", "latent"]), default="output", show_default=True,
              help="Attack the reconstruction (output) or the latent posterior (latent).")
@click.option("--pairs", type=COUNT, default=20, show_default=True,
              help="Number of (original, target) pairs; each target has another label.")
@click.option("--c-count", type=COUNT, default=50, show_default=True,
              help="Log-spaced trade-off constants besides C = 0.")
@click.option("--steps", type=COUNT, default=300, show_default=True, help="Adam steps per run.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True,
              help="Adam learning rate.")
@seed_option("Seed of the pair subset.")
@device_option()
@click.option("--out", "--json-out", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the per-pair AUDDC values and settings here (JSON).")
def ae_attack_cmd(weights, dataset, mode, pairs, c_count, steps, lr, seed, device, json_out) -> None:
    """Attack the autoencoder in WEIGHTS (an aeshield .safetensors file: a DBP VAE, whose
    sidecar says `method: dbp`, or a registry autoencoder) and print its mean AUDDC."""
    from ..attacks.adaptive import other_class_targets
    from ..attacks.autoencoder import autoencoder_attack, c_values
    from ..data import load_dataset
    from ..defenses.dbp import VAE
    from ..eval.auddc import auddc_batch
    from ..stats import mean_interval
    from ..io import write_json_atomic
    from ..models.io import load_weights, read_sidecar

    side = read_sidecar(weights)
    if side.get("method") == "dbp":
        spec = side.get("shield_spec", {})
        model, _ = load_weights(weights, model=VAE(latent=spec.get("latent", 16), hidden=spec.get("hidden", 512)),
                                device=resolve_device(device))
    else:
        model, _ = load_weights(weights, device=resolve_device(device))
    if not hasattr(model, "encode"):
        raise click.ClickException(f"{weights} holds a {side.get('architecture')!r}, which has no "
                                   "encode(); give an autoencoder's weights")
    test = load_dataset(dataset, "test").subset(pairs, seed=seed).to(resolve_device(device))
    x_t = other_class_targets(test.images, test.labels)
    res = autoencoder_attack(model, test.images, x_t, mode=mode, c=c_values(c_count), steps=steps, lr=lr)
    areas = auddc_batch(res.distortion, res.distance)
    summary = mean_interval(areas)
    click.echo(f"{weights}: {mode} attack on {pairs} {dataset} pairs, C = 0 + {c_count} values, "
               f"{steps} steps: AUDDC {summary['mean']:.3f} [{summary['ci95'][0]:.3f}, "
               f"{summary['ci95'][1]:.3f}] (sd {summary['std']:.3f})")
    if json_out:
        write_json_atomic(json_out, {"weights": str(weights), "dataset": dataset, "mode": mode,
                                     "pairs": pairs, "c": res.c.tolist(), "steps": steps, "lr": lr,
                                     "auddc": summary, "per_pair": areas.tolist()})
        click.echo(f"wrote {json.dumps(str(json_out))}")
