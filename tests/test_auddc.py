import pytest
import torch

from aeshield.attacks.autoencoder import autoencoder_attack, c_values
from aeshield.defenses.dbp import VAE
from aeshield.eval.auddc import auddc
from aeshield.stats import mean_interval


def test_auddc_of_a_hand_made_curve():
    # (0, 1) -> (0.5, 0.5), then flat at 0.5 to x = 1: 0.375 + 0.25.
    assert auddc([0.0, 0.5], [1.0, 0.5]) == pytest.approx(0.625)
    # Points beyond x = 1 are dropped; the curve still ends at x = 1 at its lowest y.
    assert auddc([0.0, 0.25, 2.0], [1.0, 0.2, 0.0]) == pytest.approx(0.5 * 1.2 * 0.25 + 0.75 * 0.2)


def test_auddc_uses_the_running_minimum_and_any_order():
    # A worse point at a larger distortion cannot raise the curve.
    assert auddc([0.5, 0.0, 0.8], [0.5, 1.0, 0.9]) == pytest.approx(0.625)


def test_auddc_rejects_bad_input():
    with pytest.raises(ValueError):
        auddc([], [])
    with pytest.raises(ValueError):
        auddc([0.0, float("nan")], [1.0, 0.5])


def test_mean_interval():
    m = mean_interval([1.0, 2.0, 3.0])
    assert m["mean"] == pytest.approx(2.0) and m["ci95"][0] < 2.0 < m["ci95"][1]


@pytest.mark.parametrize("mode", ["output", "latent"])
def test_autoencoder_attack_trades_distortion_for_distance(mode):
    torch.manual_seed(0)
    vae = VAE(latent=4, hidden=32)
    g = torch.Generator().manual_seed(0)
    x, x_t = torch.rand(3, 1, 28, 28, generator=g), torch.rand(3, 1, 28, 28, generator=g)
    c = c_values(4, 1e-2, 1e2)
    res = autoencoder_attack(vae, x, x_t, mode=mode, c=c, steps=60, lr=0.05)
    assert res.x_adv.shape == (3, 5, 1, 28, 28) and res.distance.shape == (3, 5)
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    # C = 0 (no distortion cost) moves further and gets closer to the target than C = 100.
    assert (res.distortion[:, 0] > res.distortion[:, -1]).all()
    assert (res.distance[:, 0] < res.distance[:, -1]).all()
    assert all(p.requires_grad for p in vae.parameters())
