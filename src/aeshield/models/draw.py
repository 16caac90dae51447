"""DRAW, the recurrent VAE of Gregor et al. 2015 ("DRAW: a recurrent neural network for image
generation"), the DBP paper's second model.

Per glimpse ``t = 1..T``::

    x_hat = x - sigmoid(c_{t-1})
    r_t   = read(x, x_hat, h_dec_{t-1})
    h_enc = LSTM_enc([r_t, h_dec_{t-1}])          q(z_t | x) = N(mu_t, sigma_t^2)
    h_dec = LSTM_dec(z_t)
    c_t   = c_{t-1} + write(h_dec)

and the image is ``sigmoid(c_T)``. With ``attention=True`` read and write go through the
paper's Gaussian filterbanks (an ``N x N`` grid of isotropic Gaussians whose centre, stride,
width and intensity are emitted by the decoder state); otherwise read is the whole image
(and its error image) and write a full-image linear map.

Like :class:`aeshield.defenses.dbp.VAE`, ``forward`` is deterministic: every glimpse passes its
posterior mean, so as a purifier DRAW is a plain function (no EOT). ``posterior`` returns the
concatenated means and log-variances along that same path (for the latent attack), ``encode``
the concatenated means (for the latent attack and the GMM), and ``elbo_terms`` a sampled pass
for training.
"""

from __future__ import annotations

import torch
from torch import nn


def filterbank(g: torch.Tensor, delta: torch.Tensor, var: torch.Tensor, n: int, size: int
               ) -> torch.Tensor:
    """``(B, n, size)`` Gaussian filters along one axis, each row summing to 1.

    Centres ``g + (i - n/2 - 0.5) * delta`` for ``i = 1..n`` (pixel units), variance ``var``;
    ``g``, ``delta``, ``var`` are ``(B,)``.
    """
    i = torch.arange(n, device=g.device, dtype=g.dtype)
    mu = g[:, None] + (i - n / 2 + 0.5) * delta[:, None]  # i is 0-based here
    a = torch.arange(size, device=g.device, dtype=g.dtype)
    f = torch.exp(-(a[None, None] - mu[:, :, None]).pow(2) / (2 * var[:, None, None]))
    return f / f.sum(-1, keepdim=True).clamp_min(1e-8)


class _Attention(nn.Module):
    """Maps the decoder state to filterbanks ``(F_y, F_x)`` and an intensity ``gamma``."""

    def __init__(self, hidden: int, n: int, height: int, width: int) -> None:
        super().__init__()
        self.n, self.height, self.width = n, height, width
        self.params = nn.Linear(hidden, 5)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gx, gy, log_var, log_delta, log_gamma = self.params(h).unbind(1)
        gx = (self.width + 1) / 2 * (gx + 1)
        gy = (self.height + 1) / 2 * (gy + 1)
        delta = (max(self.height, self.width) - 1) / max(self.n - 1, 1) * log_delta.exp()
        var = log_var.exp()
        # gx, gy above are 1-based pixel coordinates as in the paper; the grid is 0-based.
        fy = filterbank(gy - 1, delta, var, self.n, self.height)
        fx = filterbank(gx - 1, delta, var, self.n, self.width)
        return fy, fx, log_gamma.exp()


class DRAW(nn.Module):
    """DRAW for ``in_shape`` images: ``glimpses`` steps, LSTMs of ``hidden`` units, ``latent``
    units per step; ``attention`` switches to ``read_n x read_n`` / ``write_n x write_n``
    Gaussian-filterbank glimpses."""

    def __init__(self, glimpses: int = 64, hidden: int = 256, latent: int = 100,
                 attention: bool = False, read_n: int = 2, write_n: int = 5,
                 in_shape: tuple[int, int, int] = (1, 28, 28)) -> None:
        super().__init__()
        if glimpses < 1:
            raise ValueError(f"DRAW needs at least one glimpse, got {glimpses}")
        self.in_shape = tuple(in_shape)
        self.glimpses, self.hidden, self.latent, self.attention = glimpses, hidden, latent, attention
        c, h, w = self.in_shape
        self.dim = c * h * w
        if attention:
            self.read_n, self.write_n = read_n, write_n
            self.read_attn = _Attention(hidden, read_n, h, w)
            self.write_attn = _Attention(hidden, write_n, h, w)
            read_size = 2 * c * read_n * read_n
            self.write = nn.Linear(hidden, c * write_n * write_n)
        else:
            read_size = 2 * self.dim
            self.write = nn.Linear(hidden, self.dim)
        self.encoder = nn.LSTMCell(read_size + hidden, hidden)
        self.to_posterior = nn.Linear(hidden, 2 * latent)
        self.decoder = nn.LSTMCell(latent, hidden)

    # ---- read / write --------------------------------------------------------------------
    def _read(self, x: torch.Tensor, x_hat: torch.Tensor, h_dec: torch.Tensor) -> torch.Tensor:
        if not self.attention:
            return torch.cat([x.flatten(1), x_hat.flatten(1)], 1)
        fy, fx, gamma = self.read_attn(h_dec)
        both = torch.cat([x, x_hat], 1)  # (B, 2C, H, W)
        glimpse = fy[:, None] @ both @ fx[:, None].transpose(-1, -2)  # (B, 2C, N, N)
        return gamma[:, None] * glimpse.flatten(1)

    def _write(self, h_dec: torch.Tensor) -> torch.Tensor:
        if not self.attention:
            return self.write(h_dec).view(-1, *self.in_shape)
        c = self.in_shape[0]
        patch = self.write(h_dec).view(-1, c, self.write_n, self.write_n)
        fy, fx, gamma = self.write_attn(h_dec)
        canvas = fy[:, None].transpose(-1, -2) @ patch @ fx[:, None]  # (B, C, H, W)
        return canvas / gamma[:, None, None, None]

    # ---- the recurrence ------------------------------------------------------------------
    def _run(self, x: torch.Tensor, generator: torch.Generator | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Canvas logits and per-step ``(mu, logvar)`` stacked ``(B, T, latent)``; samples
        ``z_t`` with ``generator`` if given, else passes the means."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"DRAW expects images of shape (B, {', '.join(map(str, self.in_shape))}), "
                             f"got {tuple(x.shape)}")
        b = x.shape[0]
        zeros = x.new_zeros(b, self.hidden)
        h_enc, c_enc, h_dec, c_dec = zeros, zeros, zeros, zeros
        canvas = x.new_zeros(b, *self.in_shape)
        mus, logvars = [], []
        for _ in range(self.glimpses):
            x_hat = x - torch.sigmoid(canvas)
            r = self._read(x, x_hat, h_dec)
            h_enc, c_enc = self.encoder(torch.cat([r, h_dec], 1), (h_enc, c_enc))
            mu, logvar = self.to_posterior(h_enc).chunk(2, dim=1)
            logvar = logvar.clamp(-12, 8)
            z = mu
            if generator is not None:
                eps = torch.randn(mu.shape, generator=generator).to(mu.device, mu.dtype)
                z = mu + eps * (0.5 * logvar).exp()
            h_dec, c_dec = self.decoder(z, (h_dec, c_dec))
            canvas = canvas + self._write(h_dec)
            mus.append(mu)
            logvars.append(logvar)
        return canvas, torch.stack(mus, 1), torch.stack(logvars, 1)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated ``(mu, logvar)`` over glimpses, ``(B, T * latent)`` each, along the
        deterministic (mean) path."""
        _, mu, logvar = self._run(x, None)
        return mu.flatten(1), logvar.flatten(1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def elbo_terms(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A sampled pass: canvas logits and the per-image KL to ``N(0, I)`` summed over steps."""
        logits, mu, logvar = self._run(x, generator)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
        return logits, kl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self._run(x, None)[0])


def draw_mnist() -> DRAW:
    """The DRAW paper's MNIST model without attention: 64 glimpses, 256 LSTM units, 100 latents."""
    return DRAW(glimpses=64, hidden=256, latent=100, attention=False)


def draw_attn_mnist() -> DRAW:
    """The DRAW paper's MNIST model with attention: read 2x2, write 5x5."""
    return DRAW(glimpses=64, hidden=256, latent=100, attention=True, read_n=2, write_n=5)
