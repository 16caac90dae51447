"""CLI commands for the generative purifiers: ``aeshield train puvae`` and ``train magnet``.

Both checkpoint while they train; re-running the same command resumes from the checkpoint.
"""

from __future__ import annotations

import click
import torch

_DATASETS = click.Choice(["mnist", "fashion-mnist"])


def register(main: click.Group, train: click.Group) -> None:
    @train.command("puvae")
    @click.option("--dataset", required=True, type=_DATASETS, help="Training dataset.")
    @click.option("--classifier", required=True,
                  help="The frozen classifier: a shipped name (e.g. mnist-b) or a .safetensors path.")
    @click.option("--vae", default="cvae-mnist-quick", show_default=True,
                  help="Conditional VAE architecture (see `aeshield models --kind autoencoder`).")
    @click.option("--epochs", default=10, show_default=True, help="Passes over the training images.")
    @click.option("--batch-size", default=128, show_default=True, help="Mini-batch size.")
    @click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate.")
    @click.option("--kl-weight", default=1.0, show_default=True, help="Weight of the KL term.")
    @click.option("--ce-weight", default=10.0, show_default=True,
                  help="Weight of the classifier's cross-entropy on the reconstruction.")
    @click.option("--train-limit", type=int, default=None, help="Use only this many training images.")
    @click.option("--seed", default=0, show_default=True, help="Seed of shuffling and sampling.")
    @click.option("--out", required=True, type=click.Path(dir_okay=False),
                  help="Output .safetensors path (a JSON sidecar and a .ckpt checkpoint go beside it).")
    def train_puvae_cmd(dataset, classifier, vae, epochs, batch_size, lr, kl_weight, ce_weight,
                        train_limit, seed, out) -> None:
        """Train PuVAE's conditional VAE against a frozen classifier (recon + KL + CE)."""
        from pathlib import Path

        from .data import load_dataset
        from .defenses.puvae import PuVAETrainConfig, train_puvae
        from .models import create_model
        from .models.io import load_weights, save_weights

        frozen_classifier, _ = load_weights(classifier, dataset=dataset)
        data = load_dataset(dataset, "train")
        if train_limit:
            data = data.subset(train_limit, seed=seed)
        val = load_dataset(dataset, "val").subset(1000, seed=1)
        torch.manual_seed(seed)  # the initial weights too, so that --seed alone fixes the model
        model = create_model(vae)
        cfg = PuVAETrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, kl_weight=kl_weight,
                               ce_weight=ce_weight, seed=seed)
        path = Path(out).with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        result = train_puvae(model, frozen_classifier, data.images, data.labels, cfg, x_val=val.images,
                             y_val=val.labels, checkpoint=path.with_suffix(".ckpt"))
        save_weights(model, path, architecture=vae, dataset=dataset, kind="shield", method="puvae",
                     trained_against=str(classifier), history=result.history, train_n=len(data))
        click.echo(f"saved {path}")

    @train.command("magnet")
    @click.option("--dataset", required=True, type=_DATASETS, help="Training dataset.")
    @click.option("--autoencoder", default="conv-ae-small", show_default=True,
                  help="Autoencoder architecture (see `aeshield models --kind autoencoder`).")
    @click.option("--noise", default=0.1, show_default=True,
                  help="Standard deviation of the Gaussian noise added to training inputs.")
    @click.option("--epochs", default=10, show_default=True, help="Passes over the training images.")
    @click.option("--batch-size", default=256, show_default=True, help="Mini-batch size.")
    @click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate.")
    @click.option("--train-limit", type=int, default=None, help="Use only this many training images.")
    @click.option("--seed", default=0, show_default=True, help="Seed of shuffling and noise.")
    @click.option("--out", required=True, type=click.Path(dir_okay=False),
                  help="Output .safetensors path (a JSON sidecar and a .ckpt checkpoint go beside it).")
    def train_magnet_cmd(dataset, autoencoder, noise, epochs, batch_size, lr, train_limit, seed, out) -> None:
        """Train a MagNet autoencoder on noisy clean images (no classifier involved)."""
        from pathlib import Path

        from .data import load_dataset
        from .defenses.magnet import MagNetTrainConfig, train_magnet_autoencoder
        from .models import create_model
        from .models.io import save_weights

        data = load_dataset(dataset, "train")
        if train_limit:
            data = data.subset(train_limit, seed=seed)
        val = load_dataset(dataset, "val").subset(1000, seed=1)
        torch.manual_seed(seed)  # the initial weights too, so that --seed alone fixes the model
        model = create_model(autoencoder)
        cfg = MagNetTrainConfig(noise=noise, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        path = Path(out).with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        result = train_magnet_autoencoder(model, data.images, cfg, x_val=val.images,
                                          checkpoint=path.with_suffix(".ckpt"))
        save_weights(model, path, architecture=autoencoder, dataset=dataset, kind="shield",
                     method="magnet", history=result.history, train_n=len(data))
        click.echo(f"saved {path}")
