import pytest
import torch

from aeshield.defenses.dbp import DBPConfig, recon_grad_penalty, train_vae, vae_loss
from aeshield.models.draw import DRAW, filterbank
from aeshield.models.io import load_weights, save_weights


def _draw(attention: bool, seed: int = 0) -> DRAW:
    torch.manual_seed(seed)
    return DRAW(glimpses=3, hidden=16, latent=4, attention=attention, read_n=2, write_n=3)


@pytest.mark.parametrize("attention", [False, True])
def test_shapes_range_and_deterministic_forward(attention):
    model = _draw(attention).eval()
    x = torch.rand(5, 1, 28, 28)
    out = model(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, model(x))  # posterior means: a plain purifier, no EOT needed
    mu, logvar = model.posterior(x)
    assert mu.shape == logvar.shape == (5, 3 * 4)
    assert torch.equal(model.encode(x), mu)
    # Codes are per image: one image's code does not depend on the rest of the batch.
    assert torch.allclose(model.encode(x[:2]), mu[:2], atol=1e-6)
    logits, kl = model.elbo_terms(x, torch.Generator().manual_seed(0))
    assert logits.shape == x.shape and kl.shape == (5,) and (kl >= 0).all()


def test_wrong_input_shape_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="DRAW expects images of shape"):
        _draw(False)(torch.rand(2, 3, 28, 28))


def test_attention_filterbank_rows_are_normalized_and_centred():
    g = torch.tensor([5.0, 13.5, 20.0])
    delta = torch.tensor([1.0, 3.0, 0.5])
    var = torch.tensor([0.5, 2.0, 1.0])
    f = filterbank(g, delta, var, n=4, size=28)
    assert f.shape == (3, 4, 28)
    assert torch.allclose(f.sum(-1), torch.ones(3, 4), atol=1e-6)
    # Centres g + (i - N/2 - 0.5) delta, i = 1..N: the grid is symmetric about g.
    centres = (f * torch.arange(28.0)).sum(-1)
    assert torch.allclose(centres.mean(1), g, atol=1e-3)
    assert torch.allclose(centres[:, 1:] - centres[:, :-1], delta[:, None].expand(3, 3), atol=1e-3)


def test_attention_read_of_a_full_width_grid_sees_the_image_mean():
    model = _draw(True)
    with torch.no_grad():  # window centred, stride covering the image, intensity 1
        model.read_attn.params.weight.zero_()
        model.read_attn.params.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0]))
    x = torch.full((2, 1, 28, 28), 0.3)
    r = model._read(x, x - 0.5, torch.zeros(2, 16))
    assert torch.allclose(r[:, :4], torch.full((2, 4), 0.3), atol=1e-5)
    assert torch.allclose(r[:, 4:], torch.full((2, 4), -0.2), atol=1e-5)


@pytest.mark.parametrize("attention", [False, True])
def test_dbp_penalty_is_differentiable_through_draw(attention):
    model = _draw(attention)
    x = torch.rand(4, 1, 28, 28)
    penalty = recon_grad_penalty(model, x).mean()
    grads = torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True)
    assert sum(1 for g in grads if g is not None and g.abs().sum() > 0) >= len(grads) // 2
    for penalty_kind in ("recon-grad", "jacobian"):
        loss, metrics = vae_loss(model, x, DBPConfig(lambda2=1.0, penalty=penalty_kind),
                                 torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss) and metrics["penalty"] > 0


def test_training_lowers_the_draw_loss():
    x = torch.rand(64, 1, 28, 28).pow(4)
    model = _draw(False)
    cfg = DBPConfig(epochs=3, batch_size=16, lr=3e-3)
    before = float(vae_loss(model, x, cfg, torch.Generator().manual_seed(0))[0].detach())
    train_vae(model, x, cfg, progress=False)
    after = float(vae_loss(model, x, cfg, torch.Generator().manual_seed(0))[0].detach())
    assert after < before


@pytest.mark.parametrize("attention", [False, True])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, attention):
    model = _draw(attention).eval()
    x = torch.rand(3, 1, 28, 28)
    path = tmp_path / "draw.safetensors"
    arch = "draw-attn" if attention else "draw"
    save_weights(model, path, architecture=arch, dataset="mnist")
    fresh = _draw(attention, seed=1)
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
    loaded, side = load_weights(path, architecture=arch, dataset="mnist", model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert side["architecture"] == arch
