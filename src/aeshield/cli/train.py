"""``aeshield train``: classifiers and shields, checkpointed (re-run the same command to resume).

Every hyperparameter option is a field of the trainer's config dataclass (``config_option``):
its type and default are defined there once.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ..defenses.aaa import AAAConfig
from ..defenses.schedules import SCHEDULES
from ..defenses.magnet import MagNetTrainConfig
from ..defenses.puvae import PuVAETrainConfig
from ..train.classifier import ClassifierConfig
from ..train.loop import PRECISIONS
from .options import (check_cli_compatible, classifier_options, config_option, data_options, data_spec,
                      dataset_choice, device_option, force_option, load_cli_classifier, load_cli_data,
                      progress_option, resolve_device)

_PRECISION_HELP = ("bfloat16: mixed precision, each update's attack and loss in bfloat16 under autocast, "
                   "the weights in float32 (1.4x faster for aaa-mnist's quick shield on a CPU with "
                   "AVX512-BF16, the same robustness on validation images)")
_OUT_HELP = "Output .safetensors path (a .json sidecar, and a .ckpt checkpoint while training, go beside it)."


_TRAIN_LIMIT = click.option("--train-limit", type=click.IntRange(min=1), default=None,
                            help="Use only this many training images (a seeded subset).")


def _training_sets(dataset: str, train_limit: int | None, seed: int, val_n: int, device: str = "cpu"):
    """The training images (all, or a seeded subset of ``train_limit``) and ``val_n`` seeded
    validation images for early stopping, on ``device``."""
    from ..data import load_dataset

    data = load_dataset(dataset, "train")
    if train_limit is not None:
        data = data.subset(train_limit, seed=seed)
    return data.to(device), load_dataset(dataset, "val").subset(val_n, seed=1).to(device)


def _classifier(name: str, dataset: str, device: str):
    """A classifier trained on ``dataset`` (its sidecar must say so), in eval mode."""
    from ..errors import WeightsError
    from ..models.io import load_weights

    model, side = load_weights(name, dataset=dataset, device=device)
    if side.get("kind") not in (None, "classifier"):
        raise WeightsError(f"{name} is a {side.get('kind')}, not a classifier")
    return model.eval()


def _seeded_model(architecture: str, seed: int):
    """A new zoo model whose initial weights ``seed`` alone fixes."""
    from ..errors import ConfigError, nearest
    from ..models import MODELS, create_model

    if architecture not in MODELS:
        raise ConfigError(f"unknown architecture {architecture!r}{nearest(architecture, MODELS)}; "
                          "`aeshield models --kind autoencoder` lists them")
    torch.manual_seed(seed)
    return create_model(architecture)


def _weights_path(out: str) -> Path:
    """``out`` as a .safetensors path, its folder created (not at the first checkpoint, minutes in)
    and cleared of the temporary files of a save of ``out`` killed mid-write (this run owns ``out``)."""
    from ..models.io import remove_stale_temporaries

    path = Path(out).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    return path


@click.group()
def train() -> None:
    """Train classifiers and shields (checkpointed; re-run the same command to resume).

    Started by torchrun, training is data-parallel: --batch-size is the global batch, shared
    by the ranks, and a checkpoint resumes on any number of them. For example:

    \b
      torchrun --standalone --nproc-per-node 2 --no-python -- aeshield train shield ...
    """


@train.command("classifier")
@click.option("--model", "model_name", required=True, help="Architecture name (see `aeshield models`).")
@click.option("--dataset", required=True, type=dataset_choice(), help="Training dataset.")
@config_option(ClassifierConfig, "epochs", help="Passes over the training split.")
@config_option(ClassifierConfig, "batch_size", help="Mini-batch size.")
@config_option(ClassifierConfig, "lr", help="Learning rate.")
@config_option(ClassifierConfig, "optimizer", type=click.Choice(["adam", "sgd"]),
               help="Adam, or SGD with Nesterov momentum 0.9.")
@config_option(ClassifierConfig, "seed", help="Seed of initialization and data order.")
@config_option(ClassifierConfig, "train_limit", help="Use only N training images.")
@config_option(ClassifierConfig, "augment", help="Random crop (pad 4) and horizontal flip, for CIFAR-10.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help=_OUT_HELP)
@device_option()
@progress_option()
def train_classifier_cmd(model_name, dataset, epochs, batch_size, lr, optimizer, seed, train_limit,
                         augment, out, device, progress) -> None:
    """Naturally train a zoo classifier and save it with its sidecar."""
    from ..models import MODELS
    from ..train.classifier import train_classifier

    if model_name not in MODELS:
        from ..errors import nearest

        raise click.BadParameter(f"unknown model {model_name!r}{nearest(model_name, MODELS)}; "
                                 "`aeshield models` lists them", param_hint="--model")
    cfg = ClassifierConfig(model=model_name, dataset=dataset, epochs=epochs, batch_size=batch_size,
                           lr=lr, optimizer=optimizer, seed=seed, train_limit=train_limit,
                           augment=augment)
    _, info = train_classifier(cfg, _weights_path(out), progress=progress, device=resolve_device(device))
    click.echo(f"saved {out}: clean test accuracy {100 * info['clean_accuracy']:.2f}%")


@train.command("aaa")
@click.option("--classifier", "classifiers", multiple=True, required=True,
              help="Frozen classifier(s) to train against: shipped name or path; repeat for an ensemble.")
@click.option("--dataset", required=True, type=dataset_choice(),
              help="Training dataset (the classifiers' sidecars must name it).")
@click.option("--autoencoder", default="conv-ae", show_default=True, help="Autoencoder architecture.")
@config_option(AAAConfig, "loss", type=click.Choice(["xent", "mse", "xent+mse"]),
               help="Outer loss of the saddle point.")
@config_option(AAAConfig, "lam", help="Weight of the mse term in xent+mse.")
@config_option(AAAConfig, "eps", help="L-inf radius of the training attack.")
@config_option(AAAConfig, "step_size", help="Training PGD step size.")
@config_option(AAAConfig, "attack_steps", help="Training PGD steps.")
@config_option(AAAConfig, "epochs", help="Epochs.")
@config_option(AAAConfig, "batch_size", help="Mini-batch size (aaa-mnist's quick recipe: 32).")
@config_option(AAAConfig, "lr", help="The autoencoder's Adam learning rate (aaa-mnist's quick recipe: 0.01).")
@config_option(AAAConfig, "cosine_lr", "--cosine-lr/--constant-lr",
               help="Anneal the learning rate to 0 on a half cosine (aaa-mnist's quick recipe), or keep "
                    "it on the plateau schedule.")
@config_option(AAAConfig, "warmup_steps",
               help="Clean reconstruction updates before the adversarial ones (start near the identity).")
@config_option(AAAConfig, "schedule", type=click.Choice(list(SCHEDULES)),
               help="Training attack: pgd (Madry), fast (FGSM from a random start, Wong et al. 2020), "
                    "nfgsm (FGSM from a larger noise, not projected, de Jorge et al. 2022) or "
                    "free (minibatch replay, Shafahi et al. 2019).")
@config_option(AAAConfig, "replays", help="free: updates per minibatch, the perturbation carried.")
@config_option(AAAConfig, "fgsm_step_factor", help="fast: FGSM step as a multiple of eps.")
@config_option(AAAConfig, "nfgsm_noise", help="nfgsm: the uniform noise's radius as a multiple of eps.")
@config_option(AAAConfig, "nfgsm_step", help="nfgsm: FGSM step as a multiple of eps.")
@config_option(AAAConfig, "guard_every",
               help="fast, nfgsm, free: also run the overfitting guard's PGD check every this many "
                    "updates (free: minibatches; default: after each epoch only).")
@config_option(AAAConfig, "precision", type=click.Choice(list(PRECISIONS)), help=_PRECISION_HELP)
@_TRAIN_LIMIT
@config_option(AAAConfig, "seed", help="Seed of the initial weights, data order and attack starts.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help=_OUT_HELP)
@device_option()
@progress_option()
def train_aaa_cmd(classifiers, dataset, autoencoder, loss, lam, eps, step_size, attack_steps, epochs,
                  batch_size, lr, cosine_lr, warmup_steps, schedule, replays, fgsm_step_factor, nfgsm_noise,
                  nfgsm_step, guard_every, precision,
                  train_limit, seed, out, device, progress) -> None:
    """Train an AAA shield in front of frozen classifiers (resumes from <out>.ckpt)."""
    from ..defenses.aaa import train_aaa
    from ..models.io import save_weights

    cfg = AAAConfig(loss=loss, lam=lam, eps=eps, step_size=step_size, attack_steps=attack_steps,
                    epochs=epochs, batch_size=batch_size, lr=lr, cosine_lr=cosine_lr,
                    warmup_steps=warmup_steps, seed=seed, schedule=schedule, replays=replays,
                    fgsm_step_factor=fgsm_step_factor, nfgsm_noise=nfgsm_noise, nfgsm_step=nfgsm_step,
                    guard_every=guard_every, precision=precision)
    device = resolve_device(device)
    frozen = [_classifier(c, dataset, device) for c in classifiers]
    train_set, val = _training_sets(dataset, train_limit, seed, val_n=500, device=device)
    g = _seeded_model(autoencoder, seed).to(device)
    out_path = _weights_path(out)
    result = train_aaa(g, frozen, train_set.images, train_set.labels, cfg, x_val=val.images,
                       y_val=val.labels, checkpoint=out_path.with_suffix(".ckpt"), progress=progress)
    save_weights(g, out_path, architecture=autoencoder, dataset=dataset, kind="shield", method="aaa",
                 trained_against=list(classifiers), config=result.config, history=result.history,
                 data_hash=train_set.sha256)
    out_path.with_suffix(".ckpt").unlink(missing_ok=True)
    click.echo(f"saved shield {out_path}")


@train.command("puvae")
@click.option("--dataset", required=True, type=dataset_choice(image_size=(28, 28)), help="Training dataset.")
@click.option("--classifier", required=True,
              help="The frozen classifier: a shipped name (e.g. mnist-b) or a .safetensors path.")
@click.option("--vae", default="cvae-mnist-quick", show_default=True,
              help="Conditional VAE architecture (see `aeshield models --kind autoencoder`).")
@config_option(PuVAETrainConfig, "epochs", help="Passes over the training images.")
@config_option(PuVAETrainConfig, "batch_size", help="Mini-batch size.")
@config_option(PuVAETrainConfig, "lr", help="Adam learning rate.")
@config_option(PuVAETrainConfig, "kl_weight", help="Weight of the KL term.")
@config_option(PuVAETrainConfig, "ce_weight", help="Weight of the classifier's cross-entropy on the reconstruction.")
@_TRAIN_LIMIT
@config_option(PuVAETrainConfig, "seed", help="Seed of the initial weights, shuffling and sampling.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help=_OUT_HELP)
@device_option()
@progress_option()
def train_puvae_cmd(dataset, classifier, vae, epochs, batch_size, lr, kl_weight, ce_weight,
                    train_limit, seed, out, device, progress) -> None:
    """Train PuVAE's conditional VAE against a frozen classifier (recon + KL + CE)."""
    from ..defenses.puvae import train_puvae
    from ..models.io import save_weights

    cfg = PuVAETrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, kl_weight=kl_weight,
                           ce_weight=ce_weight, seed=seed)
    device = resolve_device(device)
    frozen_classifier = _classifier(classifier, dataset, device)
    data, val = _training_sets(dataset, train_limit, seed, val_n=1000, device=device)
    model = _seeded_model(vae, seed).to(device)
    path = _weights_path(out)
    result = train_puvae(model, frozen_classifier, data.images, data.labels, cfg, x_val=val.images,
                         y_val=val.labels, checkpoint=path.with_suffix(".ckpt"), progress=progress)
    save_weights(model, path, architecture=vae, dataset=dataset, kind="shield", method="puvae",
                 trained_against=str(classifier), history=result.history, train_n=len(data))
    path.with_suffix(".ckpt").unlink(missing_ok=True)
    click.echo(f"saved {path}")


@train.command("magnet")
@click.option("--dataset", required=True, type=dataset_choice(image_size=(28, 28)), help="Training dataset.")
@click.option("--autoencoder", default="conv-ae-small", show_default=True,
              help="Autoencoder architecture (see `aeshield models --kind autoencoder`).")
@config_option(MagNetTrainConfig, "noise", help="Standard deviation of the Gaussian noise added to training inputs.")
@config_option(MagNetTrainConfig, "epochs", help="Passes over the training images.")
@config_option(MagNetTrainConfig, "batch_size", help="Mini-batch size.")
@config_option(MagNetTrainConfig, "lr", help="Adam learning rate.")
@_TRAIN_LIMIT
@config_option(MagNetTrainConfig, "seed", help="Seed of the initial weights, shuffling and noise.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help=_OUT_HELP)
@device_option()
@progress_option()
def train_magnet_cmd(dataset, autoencoder, noise, epochs, batch_size, lr, train_limit, seed, out, device,
                     progress) -> None:
    """Train a MagNet autoencoder on noisy clean images (no classifier involved)."""
    from ..defenses.magnet import train_magnet_autoencoder
    from ..models.io import save_weights

    cfg = MagNetTrainConfig(noise=noise, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    device = resolve_device(device)
    data, val = _training_sets(dataset, train_limit, seed, val_n=1000, device=device)
    model = _seeded_model(autoencoder, seed).to(device)
    path = _weights_path(out)
    result = train_magnet_autoencoder(model, data.images, cfg, x_val=val.images,
                                      checkpoint=path.with_suffix(".ckpt"), progress=progress)
    save_weights(model, path, architecture=autoencoder, dataset=dataset, kind="shield",
                 method="magnet", history=result.history, train_n=len(data))
    path.with_suffix(".ckpt").unlink(missing_ok=True)
    click.echo(f"saved {path}")


# ---- train shield: any registered shield, any classifier and data, through train_shield -----
def _shield_names() -> list[str]:
    from ..defenses.registry import get_defense, list_defenses

    return [name for name in list_defenses() if get_defense(name).is_shield]


@train.command("shield")
@click.option("--defense", default="aaa", show_default=True,
              help="The shield to train: aaa, magnet, puvae, s2snet or dbp (any registered shield).")
@classifier_options(multiple=True, help="Frozen classifier to protect; repeat for an ensemble (aaa)")
@data_options
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Share of a file's or folder's images held out to validate and calibrate "
                                      "(seeded; a registered dataset uses its own validation split).")
@click.option("--eps", type=click.FloatRange(min=0), default=None,
              help="L-inf radius to train against (aaa; the other shields train on clean images).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs (every training stage).")
@_TRAIN_LIMIT
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Mini-batch size.")
@click.option("--architecture", default=None,
              help="Autoencoder architecture (default: the defense's; `aeshield models --kind autoencoder`).")
@click.option("--false-positive-rate", type=click.FloatRange(0, 1, max_open=True), default=0.01,
              show_default=True, help="Clean images each detector rejects (magnet, puvae); stored in the card.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the initial weights, data order, validation split and calibration.")
@click.option("--schedule", type=click.Choice(list(SCHEDULES)), default=None,
              help="aaa: how each step finds its adversarial examples (default pgd; fast = FGSM from a "
                   "random start, nfgsm = FGSM from a larger noise, each about 5x cheaper).")
@click.option("--attack-steps", type=click.IntRange(min=1), default=None,
              help="aaa: steps of the training attack (pgd schedule; default 40, the paper's; "
                   "aaa-mnist's quick recipe: 2).")
@click.option("--step-size", type=click.FloatRange(min=0, min_open=True), default=None,
              help="aaa: step of the training attack (default 0.01; aaa-mnist's quick recipe: 0.15 "
                   "at eps 0.3).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="aaa: the autoencoder's Adam learning rate (default 1e-3; aaa-mnist's quick recipe: 0.01).")
@click.option("--cosine-lr/--constant-lr", default=None,
              help="aaa: anneal the learning rate to 0 on a half cosine (aaa-mnist's quick recipe), or "
                   "keep it on the plateau schedule (the default).")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default=None,
              help="aaa: " + _PRECISION_HELP + " (default float32)")
@click.option("--query-only", type=click.Choice(["probs", "label"]), default=None,
              help="aaa: the classifier(s) answer only queries, with probabilities or only the label; "
                   "nothing is differentiated through them (see --query-method).")
@click.option("--query-method", type=click.Choice(["surrogate", "nes", "spsa"]), default="surrogate",
              show_default=True, help="With --query-only: distil a local --surrogate from the answers and "
                                      "train through it, or estimate gradients from queries (probs only).")
@click.option("--surrogate", default=None,
              help="With --query-method surrogate: the local model's architecture (`aeshield models "
                   "--kind classifier`; it needs the classifier's number of classes).")
@click.option("--query-budget", type=click.IntRange(min=1), default=None,
              help="With --query-only: stop with an error once this many images were sent.")
@force_option()
@click.option("--out", type=click.Path(dir_okay=False), required=True, help=_OUT_HELP)
@device_option()
@progress_option()
def train_shield_cmd(defense, classifier, normalize, dataset, data_file, val_fraction, eps, epochs, train_limit,
                     batch_size, architecture, false_positive_rate, seed, schedule, attack_steps, step_size, lr,
                     cosine_lr, precision, query_only, query_method, surrogate, query_budget, force, out, device,
                     progress) -> None:
    """Train any shield for your classifier(s) on your images (resumes from <out>.ckpt).

    A thin layer over ``aeshield.train_shield``: detectors are calibrated on the held-out
    clean images at --false-positive-rate and their thresholds stored in the shield's card.
    With --query-only (aaa), the classifiers are reached only through their answers, and the
    queries spent are printed and stored in the sidecar.
    """
    from ..data import DATASETS
    from ..defenses.train_shield import default_config, train_shield
    from ..errors import ConfigError, nearest
    from ..threat import ThreatModel

    shields = _shield_names()
    if defense not in shields:
        raise click.BadParameter(f"{defense!r} is not a shield{nearest(defense, shields)}; "
                                 f"choose one of {', '.join(shields)}", param_hint="--defense")
    if eps is not None and defense != "aaa":
        raise ConfigError(f"--eps sets the radius aaa trains against; {defense} trains on clean images only")
    recipe = {k: v for k, v in (("schedule", schedule), ("attack_steps", attack_steps), ("step_size", step_size),
                                ("lr", lr), ("cosine_lr", cosine_lr), ("precision", precision))
              if v is not None}
    if defense != "aaa" and (recipe or query_only):
        given = [("--cosine-lr" if v else "--constant-lr") if k == "cosine_lr" else f"--{k.replace('_', '-')}"
                 for k, v in recipe.items()] + (["--query-only"] if query_only else [])
        raise ConfigError(f"{', '.join(given)}: settings of aaa's training, not of {defense}")
    device = resolve_device(device)
    loaded = [load_cli_classifier(spec, normalize, device) for spec in classifier]
    # A file or folder is split here, seeded, so that the validation images are the same on a resumed run.
    data = load_cli_data(dataset, data_file, split="train", seed=seed, val_fraction=val_fraction)
    val = load_cli_data(dataset, data_file, split="val", seed=seed, val_fraction=val_fraction)
    if dataset is not None or data_spec(dataset, data_file) in DATASETS:
        val = val.subset(1000, seed=1)
    forced = check_cli_compatible(val, loaded, force=force)
    if train_limit is not None:
        data = data.subset(train_limit, seed=seed)
    config = default_config(defense, tuple(data.images.shape[1:]), seed=seed, epochs=epochs,
                            batch_size=batch_size, architecture=architecture)
    models = [model for model, _ in loaded]
    if recipe or query_only:
        import dataclasses

        from ..models.query import QueryOnly

        settings: dict = dict(recipe)
        if query_only:
            if query_method == "surrogate" and not surrogate:
                raise ConfigError("--query-method surrogate needs --surrogate ARCHITECTURE, the local model "
                                  "to distil (`aeshield models --kind classifier`)")
            models = [QueryOnly(m, output=query_only, budget=query_budget) for m in models]
            settings.update(query_method=query_method, surrogate=surrogate)
        config = dataclasses.replace(config, training=dataclasses.replace(config.training, **settings))
    shield = train_shield(models, data, ThreatModel("Linf", eps) if eps is not None else None,
                          defense, config, val=val, false_positive_rate=false_positive_rate, out=out,
                          progress=progress, device=device, seed=seed, trained_against=list(classifier),
                          forced=forced)
    card = shield.card
    line = (f"saved {defense} shield {shield.path}: {'x'.join(map(str, card.input_shape))} images, "
            f"{card.num_classes} classes")
    if card.deployment and card.deployment.get("calibration") == "stored":
        line += f", detectors calibrated at false-positive rate {card.deployment['false_positive_rate']:g}"
    if query_only:
        line += f"; {shield.metadata.get('queries', 0):,} queries sent to the classifier(s)"
    click.echo(line)
