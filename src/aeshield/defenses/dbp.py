"""Double-backpropagation (DBP) autoencoders (Sun, Chen and Huang 2020).

"Double backpropagation for training autoencoders against adversarial attack". A VAE is
trained with

    L = reconstruction + KL(q(z|x) || N(0, I)) + lambda_2 * penalty(x)

where the paper's penalty is ``||d recon_loss / d x||^2``, the squared norm of the input
gradient of the reconstruction loss (the clean target held fixed); it is differentiated once more
w.r.t. the weights (double backpropagation, ``create_graph=True``). ``penalty="jacobian"`` instead penalizes the squared
Frobenius norm of the reconstruction's Jacobian ``d x' / d x``, estimated without bias by
random projections: ``E_v ||v^T J||^2 = ||J||_F^2`` for ``v ~ N(0, I)``.

A smooth autoencoder resists the attacks on autoencoders themselves
(:mod:`aeshield.attacks.autoencoder`): small input changes cannot move the reconstruction far.
The same training takes the paper's second model, DRAW (:class:`aeshield.models.draw.DRAW`):
any module with ``elbo_terms(x, generator) -> (logits, kl)`` and a deterministic ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import rows_randn
from ..train.loop import LoopConfig, LoopResult, fit
from .base import AutoencoderPurifier
from ..models.draw import DRAW
from .registry import Defense, Trained, pick, seeded_build

__all__ = ["ARCHITECTURES", "DEFENSE", "DRAW", "VAE", "DBPConfig", "DBPShieldConfig", "PENALTIES",
           "build", "jacobian_frobenius", "jacobian_penalty", "recon_grad_penalty",
           "reconstruction_error", "train", "train_vae", "vae_loss"]

PENALTIES = ("recon-grad", "jacobian")


class VAE(nn.Module):
    """Fully connected VAE for 28x28 grey images: 784-h-h-(mu, logvar)[latent]-h-h-784.

    ``encode`` returns the posterior mean, ``forward`` the deterministic reconstruction
    ``decode(mu)``, so used as a purifier it is a plain deterministic function (no EOT needed);
    ``posterior`` and ``sample`` expose the stochastic parts for training and latent attacks.
    """

    def __init__(self, latent: int = 16, hidden: int = 512, in_shape: tuple[int, int, int] = (1, 28, 28)
                 ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        d = in_shape[0] * in_shape[1] * in_shape[2]
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden // 2), nn.ReLU(),
                                     nn.Linear(hidden // 2, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden // 2), nn.ReLU(),
                                     nn.Linear(hidden // 2, hidden), nn.ReLU(), nn.Linear(hidden, d))
        self.latent = latent

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-12, 8)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, *self.in_shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))

    def elbo_terms(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A sampled pass: decoder logits and the per-image KL to ``N(0, I)``."""
        mu, logvar = self.posterior(x)
        eps = rows_randn(mu.shape, generator).to(mu.device, mu.dtype)
        z = mu + eps * (0.5 * logvar).exp()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return self.decode_logits(z), kl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def reconstruction_error(x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image sum of squared errors (the DBP paper's reconstruction error)."""
    return (x_rec - x).pow(2).flatten(1).sum(1)


def recon_grad_penalty(vae: nn.Module, x: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """Per-image ``||d recon_loss(x + delta, x) / d delta||^2`` at ``delta = 0``, through the
    deterministic path ``decode(mu)``: ``4 ||J^T (x' - x)||^2``.

    The target (the clean ``x``) is held fixed: that is the loss an adversary who perturbs the
    input can change. Differentiating the target too would add ``-2 (x' - x)``, a term that does
    not depend on the network's sensitivity and only duplicates the reconstruction loss.
    """
    target = x.detach()
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = reconstruction_error(vae(x), target)
        (grad,) = torch.autograd.grad(loss.sum(), x, create_graph=create_graph)
    return grad.flatten(1).pow(2).sum(1)


def jacobian_penalty(vae: nn.Module, x: torch.Tensor, projections: int = 1,
                     generator: torch.Generator | None = None, create_graph: bool = True
                     ) -> torch.Tensor:
    """Per-image unbiased estimate of ``||d x' / d x||_F^2`` from ``projections`` random
    projections ``v ~ N(0, I)``: the mean of ``||J^T v||^2``."""
    x = x.detach().requires_grad_(True)
    total = torch.zeros(x.shape[0], device=x.device)
    with torch.enable_grad():
        out = vae(x)
        for _ in range(projections):
            v = rows_randn(out.shape, generator).to(out.device, out.dtype)
            (g,) = torch.autograd.grad((out * v).sum(), x, create_graph=create_graph, retain_graph=True)
            total = total + g.flatten(1).pow(2).sum(1)
    return total / projections


@torch.no_grad()
def jacobian_frobenius(model: nn.Module, x: torch.Tensor, chunk: int = 112) -> torch.Tensor:
    """Exact per-image ``||d model(x) / d x||_F``, one vector-Jacobian product per output pixel
    (batched over ``chunk`` output pixels at a time with ``torch.func.vmap``)."""
    from torch.func import vjp, vmap

    norms = torch.zeros(x.shape[0], device=x.device)
    with torch.enable_grad():
        out, pullback = vjp(model, x)
        d = out[0].numel()
        eye = torch.eye(d, device=x.device, dtype=x.dtype)
        for rows in eye.split(chunk):
            cot = rows.view(-1, 1, *out.shape[1:]).expand(-1, *out.shape)
            (g,) = vmap(pullback)(cot)
            norms += g.flatten(2).pow(2).sum(2).sum(0)
    return norms.sqrt()


@dataclass(frozen=True)
class DBPConfig:
    """VAE training; ``lambda2 = 0`` is the plain VAE."""

    lambda2: float = 0.0
    penalty: str = "recon-grad"
    projections: int = 1
    beta: float = 1.0  # weight of the KL term
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0


def vae_loss(vae: nn.Module, x: torch.Tensor, config: DBPConfig, generator: torch.Generator
             ) -> tuple[torch.Tensor, dict]:
    """Negative ELBO (Bernoulli likelihood) plus ``lambda2 * penalty`` for a VAE or DRAW."""
    logits, kl = vae.elbo_terms(x, generator)
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    loss = recon + config.beta * kl
    metrics = {"recon_bce": recon.mean().detach(), "kl": kl.mean().detach()}
    if config.lambda2 > 0:
        if config.penalty == "recon-grad":
            penalty = recon_grad_penalty(vae, x)
        elif config.penalty == "jacobian":
            penalty = jacobian_penalty(vae, x, config.projections, generator)
        else:
            raise ValueError(f"unknown DBP penalty {config.penalty!r}; use one of {PENALTIES}")
        loss = loss + config.lambda2 * penalty
        metrics["penalty"] = penalty.mean().detach()
    return loss.mean(), metrics


def train_vae(vae: nn.Module, x: torch.Tensor, config: DBPConfig, *, x_val: torch.Tensor | None = None,
              checkpoint: str | Path | None = None, progress: bool = True) -> LoopResult:
    """Train ``vae`` (a :class:`VAE` or :class:`DRAW`) on images ``x`` with the VAE loss plus, if
    ``lambda2 > 0``, the DBP penalty."""
    if config.penalty not in PENALTIES:
        raise ValueError(f"unknown DBP penalty {config.penalty!r}; use one of {PENALTIES}")
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr)

    def step(xb: torch.Tensor, _yb: torch.Tensor, gen: torch.Generator):
        return vae_loss(vae, xb, config, gen)

    validate = None
    if x_val is not None:
        @torch.no_grad()
        def _validate() -> dict:
            vae.eval()
            err = torch.cat([reconstruction_error(vae(b), b) for b in x_val.split(500)])
            return {"val_loss": float(err.mean())}
        validate = _validate

    loop = LoopConfig(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed)
    dummy = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return fit({"vae": vae}, optimizer, step, x, dummy, loop, val_fn=validate,
               checkpoint=checkpoint, progress=progress)


# ---- the defense: config, build, train ------------------------------------------------------
ARCHITECTURES = ("vae", "draw", "draw-attn")


@dataclass(frozen=True)
class DBPShieldConfig:
    """A VAE or DRAW purifier and its training (``training.lambda2 > 0``: the DBP penalty).

    ``architecture``: ``vae`` (fully connected; ``hidden`` units, ``latent`` codes), ``draw``
    or ``draw-attn`` (``glimpses`` steps, LSTMs of ``hidden`` units, ``latent`` codes per
    step, ``read_n`` / ``write_n`` attention grids for ``draw-attn``).
    """

    architecture: str = "vae"
    latent: int = 16
    hidden: int = 512
    glimpses: int = 64
    read_n: int = 2
    write_n: int = 5
    training: DBPConfig = field(default_factory=DBPConfig)


def build(config: DBPShieldConfig, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """The VAE (fully connected: any ``input_shape``, default 1x28x28) or DRAW (1x28x28 only)."""
    if config.architecture == "vae":
        if input_shape is None or tuple(input_shape) == (1, 28, 28):
            return VAE(latent=config.latent, hidden=config.hidden)
        return VAE(latent=config.latent, hidden=config.hidden, in_shape=tuple(int(d) for d in input_shape))
    if config.architecture in ("draw", "draw-attn"):
        if input_shape is not None and tuple(input_shape) != (1, 28, 28):
            from ..errors import ConfigError

            raise ConfigError(f"dbp architecture {config.architecture!r} takes 1x28x28 images only, not "
                              f"{'x'.join(map(str, input_shape))}; use architecture 'vae' for other shapes")
        return DRAW(glimpses=config.glimpses, hidden=config.hidden, latent=config.latent,
                    attention=config.architecture == "draw-attn", read_n=config.read_n,
                    write_n=config.write_n)
    raise ValueError(f"dbp architecture must be one of {ARCHITECTURES}, got {config.architecture!r}")


def train(config: DBPShieldConfig, classifiers: list[nn.Module], data, *, val=None,
          checkpoint: str | Path | None = None, progress: bool = True, device: str = "cpu") -> Trained:
    """A new VAE (its weights from ``init_seed``, if given) trained by ``train_vae`` on
    ``data``'s images; no classifier is involved."""
    vae = seeded_build(build, config, config.training.seed, device, input_shape=data.images.shape[1:])
    result = train_vae(vae, data.images, config.training, x_val=None if val is None else val.images,
                       checkpoint=checkpoint, progress=progress)
    return Trained(vae, result.history)


def _from_sidecar(side: dict) -> DBPShieldConfig:
    spec = side.get("shield_spec") or {}
    return pick(DBPShieldConfig, spec, training=pick(DBPConfig, side.get("config"), spec))


DEFENSE = Defense(
    name="dbp", config=DBPShieldConfig, train=train, build=build,
    purifier=lambda module, config: AutoencoderPurifier(module), from_sidecar=_from_sidecar,
    reference="Sun, Chen and Huang (2020), Double backpropagation for training autoencoders "
              "against adversarial attack")
