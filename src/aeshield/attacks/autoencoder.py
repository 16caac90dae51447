"""Targeted attacks on autoencoders themselves (Tabacof, Tavares and Valle 2016;
Gondim-Ribeiro, Tabacof and Valle 2018, "Adversarial attacks on variational autoencoders").

The adversary wants a small ``delta`` such that the autoencoder treats ``x + delta`` like a
target image ``x_t``:

- ``output`` attack: the reconstruction ``AE(x + delta)`` approaches ``AE(x_t)``;
- ``latent`` attack: the latent posterior of ``x + delta`` approaches that of ``x_t``
  (``KL(q(z|x+delta) || q(z|x_t))`` for a VAE exposing ``posterior``, else the squared
  distance between ``encode`` codes).

Each pair is attacked once per trade-off constant ``C`` by minimizing

    Delta(x + delta, x_t) / Delta(x, x_t) + C * ||delta||_2 / ||x - x_t||_2

with Adam inside the pixel box. Both terms are normalized per pair, so ``C`` is
dimensionless and one sweep fits every pair and model. Threat model: white-box, L2, targeted;
every (pair, C) runs in parallel in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MODES = ("output", "latent")


@dataclass
class AutoencoderAttackResult:
    """Per pair (P) and constant (M): ``x_adv`` (P, M, C, H, W), ``c`` (M,), normalized
    ``distortion = ||delta|| / ||x - x_t||`` and ``distance = ||AE(x+delta) - AE(x_t)|| /
    ||AE(x) - AE(x_t)||`` (both (P, M))."""

    x_adv: torch.Tensor
    c: torch.Tensor
    distortion: torch.Tensor
    distance: torch.Tensor


def c_values(count: int = 50, low: float = 1e-3, high: float = 1e3) -> torch.Tensor:
    """``0`` followed by ``count`` log-spaced constants from ``low`` to ``high``."""
    return torch.cat([torch.zeros(1), torch.logspace(torch.log10(torch.tensor(low)),
                                                    torch.log10(torch.tensor(high)), count)])


def _latent_gap(autoencoder: nn.Module, x: torch.Tensor, target: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if hasattr(autoencoder, "posterior"):
        mu, logvar = autoencoder.posterior(x)
        mu_t, logvar_t = target
        # KL(N(mu, s^2) || N(mu_t, s_t^2)), summed over latent dimensions.
        return 0.5 * (logvar_t - logvar + (logvar.exp() + (mu - mu_t).pow(2)) / logvar_t.exp() - 1).sum(1)
    return (autoencoder.encode(x).flatten(1) - target[0]).pow(2).sum(1)


def _latent_target(autoencoder: nn.Module, x_t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if hasattr(autoencoder, "posterior"):
        return autoencoder.posterior(x_t)
    return (autoencoder.encode(x_t).flatten(1),)


def autoencoder_attack(autoencoder: nn.Module, x: torch.Tensor, x_target: torch.Tensor, *,
                       mode: str = "output", c: torch.Tensor | None = None, steps: int = 300,
                       lr: float = 0.01, bounds: tuple[float, float] = (0.0, 1.0),
                       generator: torch.Generator | None = None) -> AutoencoderAttackResult:
    """Attack every pair ``(x[i], x_target[i])`` at every constant of ``c`` (default
    :func:`c_values`); returns the last iterate of each run and its normalized coordinates."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    if x.shape != x_target.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_target {tuple(x_target.shape)} must match")
    lo, hi = bounds
    c = (c_values() if c is None else c.detach().flatten()).to(x.device, x.dtype)
    p, m = x.shape[0], c.shape[0]
    autoencoder.eval()
    flags = [param.requires_grad for param in autoencoder.parameters()]
    for param in autoencoder.parameters():
        param.requires_grad_(False)
    try:
        xs = x.detach().repeat_interleave(m, dim=0)  # (P*M, ...), pair-major
        xt = x_target.detach().repeat_interleave(m, dim=0)
        cs = c.repeat(p)
        with torch.no_grad():
            rec_t = autoencoder(x_target.detach())
            rec_x = autoencoder(x.detach())
            if mode == "output":
                ref = (rec_x - rec_t).pow(2).flatten(1).sum(1)
                target = (rec_t.repeat_interleave(m, dim=0),)
            else:
                ref = _latent_gap(autoencoder, x.detach(), _latent_target(autoencoder, x_target.detach()))
                target = tuple(t.repeat_interleave(m, dim=0) for t in _latent_target(autoencoder, x_target.detach()))
            ref = ref.clamp_min(1e-12).repeat_interleave(m)
            scale = (xs - xt).flatten(1).norm(dim=1).clamp_min(1e-12)
        gen = generator or torch.Generator().manual_seed(0)
        # A tiny random start: ||delta|| is not differentiable at exactly zero.
        delta = (torch.randn(xs.shape, generator=gen) * 1e-3).to(xs).requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=lr)
        for _ in range(steps):
            with torch.enable_grad():
                x_adv = xs + delta
                if mode == "output":
                    gap = (autoencoder(x_adv) - target[0]).pow(2).flatten(1).sum(1)
                else:
                    gap = _latent_gap(autoencoder, x_adv, target)
                size = delta.flatten(1).pow(2).sum(1).add(1e-12).sqrt()
                loss = (gap / ref + cs * size / scale).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            with torch.no_grad():
                delta.copy_((xs + delta).clamp(lo, hi) - xs)
        with torch.no_grad():
            x_adv = (xs + delta).detach()
            rec = autoencoder(x_adv)
            rec_t_rep = rec_t.repeat_interleave(m, dim=0)
            rec_ref = (rec_x - rec_t).flatten(1).norm(dim=1).clamp_min(1e-12).repeat_interleave(m)
            distance = (rec - rec_t_rep).flatten(1).norm(dim=1) / rec_ref
            distortion = (x_adv - xs).flatten(1).norm(dim=1) / scale
    finally:
        for param, flag in zip(autoencoder.parameters(), flags):
            param.requires_grad_(flag)
    return AutoencoderAttackResult(x_adv.view(p, m, *x.shape[1:]), c.cpu(),
                                   distortion.view(p, m).cpu(), distance.view(p, m).cpu())
