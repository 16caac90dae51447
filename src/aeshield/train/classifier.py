"""Natural training of zoo classifiers."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import load_dataset
from ..distributed import rows_rand, rows_randint
from ..inputs import check_training_config
from ..models import create_model
from ..models.io import remove_stale_temporaries, save_weights
from .loop import LoopConfig, fit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierConfig:
    model: str = "mnist-a"
    dataset: str = "mnist"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # or "sgd" (momentum 0.9, Nesterov)
    weight_decay: float = 0.0
    seed: int = 0
    train_limit: int | None = None  # use only the first N training images (seeded order)
    augment: bool = False  # random crop (pad 4) + horizontal flip, for CIFAR-10
    val_limit: int = 2000
    test_limit: int | None = None  # measure the sidecar's clean accuracy on the first N only

    def __post_init__(self) -> None:
        check_training_config(self)


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use adam or sgd")


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Seeded random crop with zero padding and horizontal flip, batched (no per-image loop)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = rows_randint(0, 2 * pad + 1, (n,), gen)
    dy = rows_randint(0, 2 * pad + 1, (n,), gen)
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # (n, w)
    flip = (rows_rand((n,), gen) < 0.5).to(x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_idx = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of ``x`` labelled ``y``; a pipeline's reject (-1) counts as an error."""
    from ..models.predict import predict

    model.eval()
    return int((predict(model, x, batch_size) == y.to(x.device)).sum()) / max(1, len(y))


def train_classifier(config: ClassifierConfig, out: str | Path, *, progress: bool = True,
                     device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Train ``config.model`` naturally; write ``out`` (.safetensors + .json sidecar).

    A checkpoint ``<out>.ckpt`` is written as training goes, and a re-run resumes from it.
    The temporary files of a save of ``out`` killed mid-write are removed first: the caller
    owns ``out``.
    """
    out = Path(out).with_suffix(".safetensors")
    remove_stale_temporaries(out)
    train = load_dataset(config.dataset, "train")
    if config.train_limit:
        train = train.subset(config.train_limit, seed=config.seed)
    val = load_dataset(config.dataset, "val").subset(config.val_limit, seed=0)
    test = load_dataset(config.dataset, "test")
    if config.test_limit:
        test = test.subset(config.test_limit, seed=config.seed)
    torch.manual_seed(config.seed)
    model = create_model(config.model).to(device)
    optimizer = make_optimizer(model.parameters(), config.optimizer, config.lr, config.weight_decay)
    x, y = train.images.to(device), train.labels.to(device)
    xv, yv = val.images.to(device), val.labels.to(device)

    def step(xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator):
        if config.augment:
            xb = augment_batch(xb, gen)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        return loss, {"loss": loss.detach(), "acc": (logits.argmax(1) == yb).float().mean()}

    @torch.no_grad()
    def validate() -> dict:
        model.eval()
        logits = torch.cat([model(b) for b in xv.split(1000)])
        return {"val_loss": float(F.cross_entropy(logits, yv)),
                "val_acc": float((logits.argmax(1) == yv).float().mean())}

    loop = LoopConfig(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = out.with_name(out.stem + ".ckpt")
    result = fit({"model": model}, optimizer, step, x, y, loop, val_fn=validate,
                 checkpoint=ckpt, progress=progress)
    clean = accuracy(model, test.images.to(device), test.labels.to(device))
    logger.info("%s on %s: clean test accuracy %.4f", config.model, config.dataset, clean)
    save_weights(model, out, architecture=config.model, dataset=config.dataset, kind="classifier",
                 training="natural", clean_accuracy=clean, test_n=len(test), seed=config.seed,
                 config=asdict(config), data_hash=train.sha256, data_source=train.source,
                 history=result.history)
    ckpt.unlink(missing_ok=True)
    model.eval()
    return model, {"clean_accuracy": clean, "history": result.history}
