import pytest
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


def test_smoothness_table_reports_both_units_and_paired_ratios(tmp_path):
    """dbp-mnist's whole quick path at smoke sizes: the smoothness record holds each quantity in
    both units, consistent with each other, and the comparison is the ratio of the row means."""
    import json

    from aeshield.experiments import reproduce

    out = reproduce("dbp-mnist", "quick", tmp_path, progress=False, smoke=True)
    record = json.loads((out / "records" / "dbp_smoothness.json").read_text())
    base, dbp = (record["rows"][k] for k in ("VAE", "VAE + DBP"))
    for row in (base, dbp):
        # Jensen: mean of squares >= square of the mean; mean of square roots <= root of the mean.
        assert row["jacobian_frobenius_sq"]["mean"] >= row["jacobian_frobenius"]["mean"] ** 2 - 1e-9
        assert row["reconstruction_distance"]["mean"] ** 2 <= row["reconstruction_error"]["mean"] + 1e-9
        assert row["recon_loss_grad_norm_sq"]["mean"] >= row["recon_loss_grad_norm"]["mean"] ** 2 - 1e-9
    c = record["comparison"]
    for key in ("jacobian_frobenius", "jacobian_frobenius_sq", "recon_loss_grad_norm",
                "recon_loss_grad_norm_sq"):
        assert c[key]["ratio"] == pytest.approx(base[key]["mean"] / dbp[key]["mean"])
        assert c[key]["ci95"][0] <= c[key]["ratio"] <= c[key]["ci95"][1]
    for key in ("reconstruction_error", "reconstruction_distance"):
        assert c[key]["ratio"] == pytest.approx(dbp[key]["mean"] / base[key]["mean"])
    table = (out / "dbp_smoothness.md").read_text()
    assert "‖dx'/dx‖_F^2" in table and "squared norm, L2 distance" in table and "||" not in table
