"""A Gaussian-mixture classifier on an encoder's latent codes (the DBP paper's GMM head).

For each class ``c`` a ``K``-component, full-covariance Gaussian mixture ``p(z | c)`` is fitted
by EM on the latent codes ``z = E(x)`` of that class. The classifier's logits are
``log p(z | c) + log p(c)``, so ``softmax(logits)`` is the normalized class densities
``p(c | z)``. Everything is torch, so ``LatentGMMClassifier`` (encoder + mixture) is an
ordinary differentiable ``nn.Module`` that every attack can go through. Its log-densities have
a large dynamic range, so cross-entropy on them saturates and its gradient can vanish in
float32: evaluate it through :class:`Softened` too.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _log_gaussian(z: torch.Tensor, means: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``log N(z; means[m], L_m L_m^T)`` for every row of ``z`` (N, D) and component m: (N, M)."""
    diff = z[:, None, :] - means[None]  # (N, M, D)
    d = means.shape[1]
    eye = torch.eye(d, dtype=chol.dtype, device=chol.device).expand_as(chol)
    inverse = torch.linalg.solve_triangular(chol, eye, upper=False)  # L^-1, (M, D, D)
    solved = torch.einsum("mij,nmj->nmi", inverse, diff)
    maha = solved.pow(2).sum(-1)
    log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (maha + log_det[None] + d * math.log(2 * math.pi))


class GaussianMixtureClassifier(nn.Module):
    """Per-class mixtures; ``forward(z)`` gives class logits ``log p(z|c) + log p(c)``.

    Buffers: ``weights`` (C, K), ``means`` (C, K, D), ``covariances`` (C, K, D, D),
    ``log_prior`` (C,).
    """

    def __init__(self, num_classes: int, components: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weights", torch.full((num_classes, components), 1.0 / components))
        self.register_buffer("means", torch.zeros(num_classes, components, dim))
        self.register_buffer("covariances", torch.eye(dim).expand(num_classes, components, dim, dim).clone())
        self.register_buffer("log_prior", torch.full((num_classes,), -math.log(num_classes)))

    @property
    def shape(self) -> tuple[int, int, int]:
        c, k, d = self.means.shape
        return c, k, d

    def class_log_density(self, z: torch.Tensor) -> torch.Tensor:
        """``log p(z | c)`` for every class: (N, C)."""
        c, k, d = self.shape
        chol = torch.linalg.cholesky(self.covariances.reshape(c * k, d, d))
        comp = _log_gaussian(z, self.means.reshape(c * k, d), chol).view(-1, c, k)
        return torch.logsumexp(comp + self.weights.clamp_min(1e-30).log()[None], dim=2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.class_log_density(z.flatten(1)) + self.log_prior[None]

    @torch.no_grad()
    def fit(self, z: torch.Tensor, y: torch.Tensor, iterations: int = 100, reg: float = 1e-4,
            tol: float = 1e-4, seed: int = 0) -> "GaussianMixtureClassifier":
        """EM per class (k-means++-style seeding from a seeded generator). ``reg`` is added to
        every covariance's diagonal, as scikit-learn's ``reg_covar``."""
        c, k, d = self.shape
        z = z.flatten(1).to(self.means)
        gen = torch.Generator().manual_seed(seed)
        counts = torch.bincount(y, minlength=c).float()
        if (counts < k).any():
            raise ValueError(f"every class needs at least {k} examples to fit {k} components; "
                             f"got counts {counts.tolist()}")
        self.log_prior.copy_((counts / counts.sum()).log())
        for cls in range(c):
            w, mu, cov = fit_gmm(z[y == cls], k, iterations, reg, tol, gen)
            self.weights[cls], self.means[cls], self.covariances[cls] = w, mu, cov
        return self


def fit_gmm(z: torch.Tensor, k: int, iterations: int = 100, reg: float = 1e-4, tol: float = 1e-4,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EM for one full-covariance mixture; returns ``(weights (K,), means (K, D), cov (K, D, D))``."""
    n, d = z.shape
    gen = generator or torch.Generator().manual_seed(0)
    # k-means++ seeding: each next mean is drawn in proportion to the squared distance.
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [z[first]]
    for _ in range(1, k):
        dist = torch.cdist(z, torch.stack(centres)).pow(2).min(1).values
        idx = int(torch.multinomial((dist / dist.sum()).cpu(), 1, generator=gen))
        centres.append(z[idx])
    means = torch.stack(centres)
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    cov = (torch.cov(z.T) + reg * eye).expand(k, d, d).clone()
    weights = torch.full((k,), 1.0 / k, dtype=z.dtype, device=z.device)
    previous = -math.inf
    for _ in range(iterations):
        log_p = _log_gaussian(z, means, torch.linalg.cholesky(cov)) + weights.log()[None]
        total = torch.logsumexp(log_p, dim=1)
        resp = (log_p - total[:, None]).exp()  # (N, K)
        nk = resp.sum(0).clamp_min(1e-10)
        weights = nk / n
        means = resp.T @ z / nk[:, None]
        diff = z[:, None, :] - means[None]
        cov = torch.einsum("nk,nki,nkj->kij", resp, diff, diff) / nk[:, None, None] + reg * eye
        mean_ll = float(total.mean())
        if abs(mean_ll - previous) < tol:
            break
        previous = mean_ll
    return weights, means, cov


class LatentGMMClassifier(nn.Module):
    """``gmm(encoder(x))``: images in [0, 1] to class logits (log joint densities)."""

    def __init__(self, encoder: nn.Module, gmm: GaussianMixtureClassifier,
                 in_shape: tuple[int, ...] = (1, 28, 28)) -> None:
        super().__init__()
        self.encoder = encoder
        self.gmm = gmm
        self.in_shape = tuple(in_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gmm(self.encoder(x))


class Softened(nn.Module):
    """``model(x) / temperature``: the same predictions (arg-max is unchanged by a positive
    scale), but a cross-entropy that does not saturate, so its input gradient does not vanish.

    Used as the differentiable stand-in through which attacks reach the mixture (the BPDA
    idea of Athalye, Carlini and Wagner 2018: keep the forward decision, replace the gradient).
    Scaling only the mixture's Jacobian (``BPDA(gmm, gmm / T)``) would not help: the loss's
    own gradient at the saturated logits is already zero.
    """

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


@torch.no_grad()
def softening_temperature(model: nn.Module, x: torch.Tensor, target_gap: float = 5.0) -> float:
    """A temperature that brings the median gap between the top two logits to ``target_gap``."""
    top2 = torch.cat([model(b) for b in x.split(500)]).topk(2, dim=1).values
    gap = float((top2[:, 0] - top2[:, 1]).median())
    return max(gap / target_gap, 1.0)
