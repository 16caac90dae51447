"""``aeshield train``: classifiers and shields, checkpointed (re-run the same command to resume).

Every hyperparameter option is a field of the trainer's config dataclass (``config_option``):
its type and default are defined there once.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ..defenses.aaa import AAAConfig
from ..defenses.magnet import MagNetTrainConfig
from ..defenses.puvae import PuVAETrainConfig
from ..train.classifier import ClassifierConfig
from .options import config_option, dataset_choice, device_option, progress_option, resolve_device

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
    """Train classifiers and shields (checkpointed; re-run the same command to resume)."""


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
@_TRAIN_LIMIT
@config_option(AAAConfig, "seed", help="Seed of the initial weights, data order and attack starts.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help=_OUT_HELP)
@device_option()
@progress_option()
def train_aaa_cmd(classifiers, dataset, autoencoder, loss, lam, eps, step_size, attack_steps, epochs,
                  train_limit, seed, out, device, progress) -> None:
    """Train an AAA shield in front of frozen classifiers (resumes from <out>.ckpt)."""
    from ..defenses.aaa import train_aaa
    from ..models.io import save_weights

    cfg = AAAConfig(loss=loss, lam=lam, eps=eps, step_size=step_size, attack_steps=attack_steps,
                    epochs=epochs, seed=seed)
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
