import torch

from aeshield.defenses.dbp import (VAE, DBPConfig, jacobian_frobenius, jacobian_penalty,
                                   recon_grad_penalty, train_vae)


def _toy_images(n=256):
    g = torch.Generator().manual_seed(0)
    # Blurry blobs: a smooth low-dimensional family, so a tiny VAE fits it in a few epochs.
    centres = torch.rand(n, 2, generator=g) * 20 + 4
    grid = torch.stack(torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij"), -1)
    d2 = (grid[None] - centres[:, None, None]).pow(2).sum(-1)
    return torch.exp(-d2 / 18).unsqueeze(1)


def test_penalty_is_differentiable_wrt_weights():
    vae = VAE(latent=2, hidden=32)
    x = _toy_images(8)
    penalty = recon_grad_penalty(vae, x).mean()
    grads = torch.autograd.grad(penalty, list(vae.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    jp = jacobian_penalty(vae, x, projections=2, generator=torch.Generator().manual_seed(0)).mean()
    grads = torch.autograd.grad(jp, list(vae.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_random_projection_estimate_matches_exact_jacobian_norm():
    torch.manual_seed(0)
    vae = VAE(latent=3, hidden=16)
    x = _toy_images(4)
    exact = jacobian_frobenius(vae, x).pow(2)
    estimate = jacobian_penalty(vae, x, projections=400, generator=torch.Generator().manual_seed(1),
                                create_graph=False)
    assert torch.allclose(estimate, exact, rtol=0.2)


def test_exact_jacobian_norm_of_a_linear_map():
    w = torch.randn(784, 784, generator=torch.Generator().manual_seed(0)) * 0.01
    model = lambda x: (x.flatten(1) @ w.T).view_as(x)  # noqa: E731
    got = jacobian_frobenius(model, torch.rand(2, 1, 28, 28))
    assert torch.allclose(got, w.norm().expand(2), rtol=1e-4)


def test_dbp_lowers_the_input_gradient_norm_on_a_toy_problem():
    x = _toy_images()
    norms = {}
    for lam in (0.0, 1.0):
        torch.manual_seed(0)
        vae = VAE(latent=2, hidden=64)
        train_vae(vae, x, DBPConfig(lambda2=lam, epochs=6, batch_size=32, lr=2e-3), progress=False)
        vae.eval()
        norms[lam] = float(recon_grad_penalty(vae, x, create_graph=False).mean())
    assert norms[1.0] < 0.5 * norms[0.0], norms
