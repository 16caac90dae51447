"""MagNet diversity: one random autoencoder per example, the same one for the reformer and the
detectors of a query, a deterministic mode, the diversity term, the weight file, EOT."""

from __future__ import annotations

import torch
from torch import nn

from aeshield.attacks import EOT
from aeshield.attacks.adaptive import detector_pgd, orthogonal_pgd
from aeshield.defenses.magnet import (DiverseAutoencoder, MagNetTrainConfig, diversity_loss, magnet,
                                      train_diverse_autoencoders)
from aeshield.experiments.config import spec_dict
from aeshield.experiments.methods.magnet import MagNetSpec
from aeshield.models.autoencoders import ConvAutoencoder
from aeshield.models.io import load_weights, save_weights
from aeshield.threat import ThreatModel

from conftest import tiny_mlp


class Constant(nn.Module):
    """An 'autoencoder' whose output is the constant ``value``: it tells which member answered."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.value) * self.scale


def _members(k: int = 4) -> DiverseAutoencoder:
    return DiverseAutoencoder([Constant(i / 10) for i in range(k)])


def _aes(k: int = 3) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(ConvAutoencoder(width=4, code=2) for _ in range(k)).eval()


def test_draw_is_per_example_and_covers_every_member():
    ae = _members(4)
    x = torch.rand(400, 1, 28, 28)
    out = ae(x)
    index = ae.last_draw(x)
    assert torch.equal(torch.bincount(index, minlength=4) > 0, torch.ones(4, dtype=torch.bool))
    # each example answered by its own member, the one recorded
    assert torch.allclose(out[:, 0, 0, 0], index.float() / 10)
    assert ae.stochastic


def test_same_tensor_same_draw_new_tensor_new_draw():
    ae = _members(4)
    x = torch.rand(64, 1, 28, 28)
    assert torch.equal(ae(x), ae(x))
    assert not torch.equal(ae(x.clone()), ae(x))


def test_predict_and_detector_score_use_the_same_draw():
    ae = _members(4)
    model = magnet(ae, tiny_mlp(), detectors=("l2",), fpr=0.0, calibration=torch.rand(50, 1, 28, 28))
    x = torch.rand(200, 1, 28, 28)
    with torch.no_grad():
        recon = model.purifier(x)
        index = ae.last_draw(x)
        score = model.detector.members[0].score(x)
    expected = (x - index.float().view(-1, 1, 1, 1) / 10).pow(2).flatten(1).mean(1)
    assert torch.allclose(score, expected, atol=1e-6)
    assert torch.equal(ae.last_draw(x), index)
    assert torch.allclose(recon[:, 0, 0, 0], index.float() / 10)
    assert model.stochastic


def test_random_detector_is_calibrated_on_every_members_scores_pooled():
    # member k answers the constant k/10, so one member's errors sit far above the others':
    # the rate a query meets, averaged over its uniform draw, is the pooled exceedance rate
    ae = _members(4)
    calib = torch.rand(2000, 1, 28, 28) * 0.5
    model = magnet(ae, tiny_mlp(), detectors=("l2",), fpr=0.05, calibration=calib)
    detector = model.detector.members[0]
    assert detector.autoencoder is ae and ae.stochastic
    with torch.no_grad():
        per_member = torch.stack([(calib - k / 10).pow(2).flatten(1).mean(1) for k in range(4)])
        expected_rate = (per_member > detector.threshold).float().mean().item()
        drawn_rate = detector.rejects(calib).float().mean().item()
    assert abs(expected_rate - 0.05) <= 0.001
    assert abs(drawn_rate - 0.05) <= 0.015  # one random draw per image: binomial noise only


def test_deterministic_mode_is_deterministic():
    members = _aes(3)
    fixed = DiverseAutoencoder(members, member=1)
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        a, b = fixed(x), fixed(x.clone())
        assert torch.equal(a, b)
        assert torch.allclose(a, members[1](x))
        assert torch.equal(DiverseAutoencoder(members).fixed(1)(x), a)
    assert not fixed.stochastic
    seeded = [DiverseAutoencoder(members, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    with torch.no_grad():
        assert torch.equal(seeded[0](x), seeded[1](x.clone()))


def test_grouped_reconstruction_matches_running_every_member_and_gathering():
    ae = DiverseAutoencoder(_aes(3))
    x = torch.rand(30, 1, 28, 28)
    index = torch.randint(3, (30,))
    with torch.no_grad():
        grouped = ae.reconstruct(x, index)
        gathered = ae.reconstruct_all(x)[index, torch.arange(30)]
    assert torch.allclose(grouped, gathered, atol=1e-6)


def test_diversity_term_has_the_right_sign_and_identity():
    x = torch.rand(8, 1, 28, 28)
    r = torch.rand(3, 8, 1, 28, 28, requires_grad=True)
    loss0, m = diversity_loss(r, x, 0.0)
    loss5, _ = diversity_loss(r, x, 0.5)
    assert loss5 < loss0
    assert torch.allclose(loss0 - loss5, 0.5 * 3 * m["spread"])
    # (1 - eta) * spread + K * error of the mean
    mean_err = (r.mean(0) - x).pow(2).mean()
    assert torch.allclose(loss5, 0.5 * 3 * m["spread"] + 3 * mean_err, atol=1e-6)
    grad, = torch.autograd.grad(loss5, r)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_regularizer_increases_disagreement_on_a_toy_run(mnist_small):
    train, _ = mnist_small
    x = train.images[:256]
    spreads = {}
    for eta in (0.0, 0.9):
        members = _aes(2)
        train_diverse_autoencoders(members, x, MagNetTrainConfig(epochs=8, batch_size=32, lr=3e-3, eta=eta),
                                   progress=False)
        with torch.no_grad():
            r = torch.stack([m(x) for m in members])
            spreads[eta] = float((r - r.mean(0)).pow(2).mean())
    assert spreads[0.9] > spreads[0.0]


def test_weight_file_round_trip(tmp_path):
    members = _aes(3)
    path = save_weights(members, tmp_path / "div", architecture="conv-ae-small-test", dataset="mnist")
    # a registry architecture is not needed when the caller passes the model
    loaded, side = load_weights(path, model=nn.ModuleList(ConvAutoencoder(width=4, code=2) for _ in range(3)))
    assert side["members"] == 3
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        a = DiverseAutoencoder(members, member=None)
        b = DiverseAutoencoder(loaded, member=None)
        index = torch.randint(3, (8,))
        assert torch.equal(a.reconstruct(x, index), b.reconstruct(x, index))


def test_weight_file_rebuilds_the_list_from_its_sidecar(tmp_path):
    from aeshield.models import create_model

    torch.manual_seed(0)
    members = nn.ModuleList(create_model("conv-ae-small") for _ in range(2)).eval()
    path = save_weights(members, tmp_path / "div", architecture="conv-ae-small", dataset="mnist", half=True)
    loaded, _ = load_weights(path)
    assert isinstance(loaded, nn.ModuleList) and len(loaded) == 2
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded[1](x), members[1].half().float()(x), atol=1e-5)


def test_eot_over_the_diverse_pipeline_averages_several_members():
    ae = _members(4)
    model = magnet(ae, tiny_mlp(), detectors=("l2",), fpr=0.0, calibration=torch.rand(50, 1, 28, 28))
    x = torch.rand(5, 1, 28, 28)
    eot = EOT(model, samples=16)
    with torch.no_grad():
        eot(x)
    seen = ae._cache[2].view(16, 5)  # the draws of the repeated batch
    assert ((seen != seen[:1]).any(0)).all()  # every example saw more than one member


def test_detector_aware_attacks_with_eot_stay_in_the_ball(batch):
    x, y = batch
    model = magnet(DiverseAutoencoder(_aes(2)), tiny_mlp(), detectors=("l2", "jsd10"), fpr=0.05,
                   calibration=x)
    for attack in (detector_pgd, orthogonal_pgd):
        x_adv = attack(EOT(model, 3), x, y, eps=0.1, steps=2, step_size=0.05)
        assert ThreatModel("Linf", 0.1).contains(x_adv, x).all()


def test_single_autoencoder_spec_keeps_its_hash_fields():
    single = MagNetSpec(method="magnet")
    assert "diversity" not in spec_dict(single) and "eta" not in spec_dict(single)
    assert spec_dict(MagNetSpec(method="magnet", diversity=4))["diversity"] == 4


def test_suites_restricted_to_a_shield_skip_other_rows():
    from aeshield.experiments.config import RowSpec, SuiteSpec

    suite = SuiteSpec("div", ThreatModel("Linf", 0.3), (), shields=("magnet-div",))
    assert suite.applies_to(RowSpec("MagNet (diversity)", "shield", "magnet-div"))
    assert not suite.applies_to(RowSpec("MagNet", "shield", "magnet"))
    assert not suite.applies_to(RowSpec("no defense"))
    assert SuiteSpec("all", ThreatModel("Linf", 0.3), ()).applies_to(RowSpec("no defense"))


def test_load_shield_wraps_several_members(tmp_path):
    import aeshield
    from aeshield.models import create_model

    members = nn.ModuleList(create_model("conv-ae-small") for _ in range(2)).eval()
    path = save_weights(members, tmp_path / "div", architecture="conv-ae-small", dataset="mnist", kind="shield")
    shield = aeshield.load_shield(str(path))
    assert shield.stochastic
    with torch.no_grad():
        assert shield(torch.rand(3, 1, 28, 28)).shape == (3, 1, 28, 28)
