"""PuVAE: class-conditional reconstructions, the arg-min selection, the RMSE detector, EOT and
the scoring of rejects (tiny untrained models; properties that hold for any weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aeshield.attacks import EOT
from aeshield.attacks.adaptive import detector_pgd
from aeshield.defenses.base import REJECT, Shielded
from aeshield.defenses.puvae import PuVAE, PuVAETrainConfig, RMSEDetector, build_pipeline, train_puvae
from aeshield.eval.harness import AttackSpec, evaluate
from aeshield.models.vae import ConditionalVAE
from aeshield.threat import ThreatModel

from conftest import tiny_mlp


def _vae(seed: int = 0) -> ConditionalVAE:
    torch.manual_seed(seed)
    return ConditionalVAE(z_dim=4, width=4, hidden=16).eval()


def test_reconstructions_differ_by_class(batch):
    x, _ = batch
    recons = _vae().reconstruct_all(x[:4])
    assert recons.shape == (4, 10, 1, 28, 28)
    assert recons.min() >= 0 and recons.max() <= 1
    # Each pair of classes gives a different image for the same input.
    diffs = (recons[:, :, None] - recons[:, None]).abs().flatten(3).amax(3)
    off_diagonal = ~torch.eye(10, dtype=torch.bool)
    assert (diffs[:, off_diagonal] > 1e-4).all()


def test_reconstruct_all_matches_per_class_decoding(batch):
    x, _ = batch
    vae = _vae()
    recons = vae.reconstruct_all(x[:3])
    for k in (0, 7):
        y = torch.full((3,), k)
        single, _, _ = vae(x[:3], y, sample=False)
        assert torch.allclose(recons[:, k], single, atol=1e-6)


def test_cifar_vae_purifies_rgb_images_per_class():
    # The CIFAR-10 PuVAE (z = 1024) on 3x32x32 inputs: one reconstruction per class, in range,
    # and the purifier's pick is the one with the smallest RMSE.
    torch.manual_seed(0)
    vae = ConditionalVAE(in_channels=3, size=32, z_dim=1024, width=4, hidden=16).eval()
    x = torch.rand(3, 3, 32, 32)
    recons = vae.reconstruct_all(x)
    assert recons.shape == (3, 10, 3, 32, 32) and recons.min() >= 0 and recons.max() <= 1
    selected, best, index = PuVAE(vae).purify(x)
    rmse = (recons - x[:, None]).pow(2).flatten(2).mean(2).sqrt()
    assert selected.shape == x.shape and torch.equal(index, rmse.argmin(1))


def test_selection_is_min_rmse_and_gradient_follows_selected_class(batch):
    x, _ = batch
    puvae = PuVAE(_vae())
    selected, best, index = puvae.purify(x[:5])
    recons = puvae.reconstructions(x[:5])
    rmse = (recons - x[:5, None]).pow(2).flatten(2).mean(2).sqrt()
    assert torch.equal(index, rmse.argmin(1))
    assert torch.allclose(best, rmse.min(1).values, atol=1e-5)
    assert torch.allclose(selected, recons[torch.arange(5), index])
    xg = x[:5].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(puvae(xg).sum(), xg)
    assert g.abs().sum() > 0  # the attack sees a gradient through the chosen reconstruction


def test_sampled_mode_is_random_and_mean_mode_is_not(batch):
    x, _ = batch
    vae = _vae()
    with torch.no_grad():
        a, b = (PuVAE(vae, sample=True).reconstructions(x[:2]) for _ in range(2))
        c, d = (PuVAE(vae, sample=False).reconstructions(x[:2]) for _ in range(2))
    assert not torch.equal(a, b)
    assert torch.equal(c, d)
    assert PuVAE(vae, sample=True).stochastic and not PuVAE(vae).stochastic


def test_label_and_score_come_from_the_same_draw(batch):
    x, _ = batch
    model = Shielded(PuVAE(_vae(), sample=True), tiny_mlp())
    model.detector = RMSEDetector(model.purifier)
    xb = x[:4]
    with torch.no_grad():
        selected = model.purifier(xb)
        assert torch.equal(model.purifier.purify(xb)[0], selected)  # cached: same draw
        other = xb.clone()
        assert not torch.equal(model.purifier(other), selected)    # a new tensor: a new draw


def test_detector_threshold_respects_calibration_set():
    torch.manual_seed(0)
    calib = torch.rand(2000, 1, 28, 28)
    model = build_pipeline(_vae(), tiny_mlp(), detector=True, sample=False, fpr=0.05,
                           calibration=calib)
    with torch.no_grad():
        rejected = torch.cat([model.detector.rejects(b) for b in calib.split(500)]).float().mean()
    assert abs(rejected.item() - 0.05) <= 0.002  # quantile of the calibration scores
    assert model.detector.threshold > 0


def test_reject_path_propagates_minus_one(batch):
    x, y = batch
    model = build_pipeline(_vae(), tiny_mlp(), detector=True, sample=False, fpr=0.0,
                           calibration=x)
    assert (model.predict(x) != REJECT).all()     # threshold = max calibration score
    model.detector.threshold.fill_(-1.0)           # everything is now suspicious
    assert (model.predict(x) == REJECT).all()


def test_eot_averages_more_than_one_sample(batch):
    x, _ = batch
    model = Shielded(PuVAE(_vae(), sample=True), tiny_mlp()).eval()
    calls = []
    model.purifier.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        torch.manual_seed(1)
        single = torch.log_softmax(model(x[:3]), 1)
        torch.manual_seed(1)
        averaged = EOT(model, samples=6)(x[:3])
    assert calls[-1] == 18  # six draws of each of the three images, in one batch
    assert not torch.allclose(single, averaged)


def test_counting_rejected_adversarial_is_handled_rejected_clean_is_error(batch):
    x, y = batch
    classifier = tiny_mlp()
    labels = classifier(x).argmax(1)
    model = build_pipeline(_vae(), classifier, detector=True, sample=False, fpr=0.0, calibration=x)
    model.detector.threshold.fill_(-1.0)  # reject every input
    record = evaluate(model, x, labels, [AttackSpec("fgsm")], ThreatModel("Linf", 0.3),
                      progress=False)
    assert record.clean.correct == 0            # a rejected clean input is an error
    assert record.clean_reject_rate == 1.0
    # Nothing was clean-correct, so nothing can be robust either; now accept clean inputs but
    # reject everything the attack moves: adversarial rejects count as handled.
    base = Shielded(model.purifier, classifier)
    clean_labels = base.predict(x)
    model.detector.threshold.fill_(float("inf"))
    record = evaluate(model, x, clean_labels, [AttackSpec("fgsm")], ThreatModel("Linf", 0.0),
                      progress=False)
    assert record.robust.correct == record.clean.correct == x.shape[0]


def test_detector_pgd_success_needs_not_rejected(batch):
    x, y = batch
    model = build_pipeline(_vae(), tiny_mlp(), detector=True, sample=False, fpr=0.0, calibration=x)
    model.detector.threshold.fill_(-1.0)
    x_adv = detector_pgd(model, x, y, eps=0.3, steps=3, step_size=0.1)
    assert ThreatModel("Linf", 0.3).contains(x_adv, x).all()
    assert (model.predict(x_adv) == REJECT).all()  # every point rejected: no success possible


def test_training_lowers_the_loss(mnist_small):
    train, _ = mnist_small
    classifier = tiny_mlp().eval()
    vae = ConditionalVAE(z_dim=4, width=4, hidden=32)
    x, y = train.images[:256], train.labels[:256]
    with torch.no_grad():
        torch.manual_seed(0)
        before = F.mse_loss(vae(x, y, sample=False)[0], x)
    train_puvae(vae, classifier, x, y, PuVAETrainConfig(epochs=3, batch_size=64, lr=3e-3),
                progress=False)
    with torch.no_grad():
        after = F.mse_loss(vae(x, y, sample=False)[0], x)
    assert after < before
    assert all(not p.requires_grad or p.grad is None for p in classifier.parameters())


def test_kl_warmup_grows_the_kl_weight_linearly_then_holds_it(monkeypatch):
    import aeshield.defenses.puvae as puvae_module

    seen = []
    real = puvae_module.puvae_loss

    def spy(vae, classifier, x, y, kl_weight, ce_weight):
        seen.append(kl_weight)
        return real(vae, classifier, x, y, kl_weight, ce_weight)

    monkeypatch.setattr(puvae_module, "puvae_loss", spy)
    torch.manual_seed(0)
    x, y = torch.rand(12, 1, 28, 28), torch.arange(12) % 10
    config = PuVAETrainConfig(epochs=1, batch_size=2, kl_weight=2.0, kl_warmup_steps=4)
    train_puvae(ConditionalVAE(z_dim=4, width=4, hidden=16), tiny_mlp().eval(), x, y, config,
                progress=False)
    assert seen == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])


def test_kl_warmup_at_its_default_keeps_the_training_key():
    from aeshield.experiments.methods.puvae import PuVAESpec
    from aeshield.experiments.config import spec_dict

    spec = PuVAESpec(method="puvae", vae="cvae-mnist", against=("F",))
    assert "kl_warmup_steps" not in spec_dict(spec)  # shipped PuVAE files keep their keys
    assert spec_dict(PuVAESpec(method="puvae", vae="cvae-mnist", against=("F",),
                               kl_warmup_steps=10))["kl_warmup_steps"] == 10
