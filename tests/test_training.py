import math

import torch
import torch.nn.functional as F

from aeshield.defenses.aaa import AAAConfig, train_aaa
from aeshield.defenses.adversarial_training import AdversarialTrainingConfig, adversarial_training
from aeshield.models import ConvAutoencoder
from aeshield.train import LoopConfig, fit
from aeshield.train.classifier import augment_batch
from conftest import tiny_mlp

TINY_AAA = dict(attack_steps=2, step_size=0.1, epochs=2, batch_size=32, warmup_steps=3,
                checkpoint_every=2)


def _data(n=96):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_loop_resume_after_kill_matches_uninterrupted(tmp_path):
    x, y = _data()

    def run(max_steps=None, ckpt=None):
        torch.manual_seed(0)
        model = tiny_mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)

        def step(xb, yb, gen):
            loss = F.cross_entropy(model(xb), yb)
            return loss, {"loss": loss.detach()}
        cfg = LoopConfig(epochs=3, batch_size=32, checkpoint_every=1, max_steps=max_steps)
        result = fit({"model": model}, opt, step, x, y, cfg, checkpoint=ckpt, progress=False)
        return model, result

    reference, ref_result = run()
    ckpt = tmp_path / "loop.ckpt"
    run(max_steps=4, ckpt=ckpt)  # "killed" after 4 of 9 steps: in the middle of epoch 2
    stale_tmp = tmp_path / ".loop.ckpt.abcd1234.tmp"  # a checkpoint write killed half-way
    stale_tmp.write_bytes(b"half a checkpoint")
    resumed, result = run(ckpt=ckpt)  # a fresh process would start the same way
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    # Epoch 2's train_loss averages all three of its steps, also those before the kill.
    assert result.history == ref_result.history and result.steps == ref_result.steps == 9
    assert not stale_tmp.exists()


def test_loop_resume_keeps_the_early_stopping_count(tmp_path):
    x, y = _data()
    val_losses = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])

    def run(max_steps=None, ckpt=None, losses=None):
        model = tiny_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)

        def step(xb, yb, gen):
            loss = F.cross_entropy(model(xb), yb)
            return loss, {"loss": loss.detach()}
        cfg = LoopConfig(epochs=6, batch_size=32, checkpoint_every=1, max_steps=max_steps,
                         early_stop_patience=2)
        return fit({"model": model}, opt, step, x, y, cfg, checkpoint=ckpt, progress=False,
                   val_fn=lambda: {"val_loss": next(losses)})

    reference = run(losses=iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert len(reference.history) == 3  # no improvement after epoch 1: stops after epoch 3
    ckpt = tmp_path / "loop.ckpt"
    run(max_steps=7, ckpt=ckpt, losses=val_losses)  # killed in epoch 3, one stale epoch counted
    resumed = run(ckpt=ckpt, losses=val_losses)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


def test_aaa_updates_only_the_autoencoder():
    x, y = _data()
    classifiers = [tiny_mlp().eval(), tiny_mlp(32).train()]
    before = [_state(c) for c in classifiers]
    modes = [c.training for c in classifiers]
    g = ConvAutoencoder()
    g_before = _state(g)
    train_aaa(g, classifiers, x, y, AAAConfig(**TINY_AAA), progress=False)
    for c, state, mode in zip(classifiers, before, modes):
        for k, v in c.state_dict().items():
            assert torch.equal(v, state[k]), f"classifier tensor {k} changed"
        assert c.training is mode and all(p.requires_grad for p in c.parameters())
    assert any(not torch.equal(v, g_before[k]) for k, v in g.state_dict().items())


def test_aaa_ensemble_visits_every_classifier():
    x, y = _data()
    classifiers = [tiny_mlp(16), tiny_mlp(24), tiny_mlp(32)]
    result = train_aaa(ConvAutoencoder(), classifiers, x, y,
                       AAAConfig(**{**TINY_AAA, "epochs": 4}), progress=False)
    assert sum(result.visits) == 12
    assert all(v > 0 for v in result.visits)


def test_aaa_resume_after_kill_matches_uninterrupted(tmp_path, monkeypatch):
    x, y = _data()
    xv, yv = _data(32)

    def run(ckpt=None):
        torch.manual_seed(0)
        classifiers = [tiny_mlp(16), tiny_mlp(24)]
        torch.manual_seed(1)
        g = ConvAutoencoder()
        result = train_aaa(g, classifiers, x, y, AAAConfig(**TINY_AAA), x_val=xv, y_val=yv,
                           checkpoint=ckpt, progress=False)
        return g, result

    reference, ref_result = run()
    ckpt = tmp_path / "aaa.ckpt"
    import aeshield.train.loop as loop

    original = loop.fit

    def killed_fit(*args, **kwargs):
        config = args[5]
        return original(*args[:5], LoopConfig(**{**config.__dict__, "max_steps": 3}), **kwargs)

    monkeypatch.setattr("aeshield.defenses.aaa.fit", killed_fit)
    run(ckpt)
    monkeypatch.setattr("aeshield.defenses.aaa.fit", original)
    resumed, result = run(ckpt)
    for k, v in reference.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert result.history == ref_result.history
    assert result.visits == ref_result.visits and sum(result.visits) == 6  # the 3 steps before the kill count


def test_adversarial_training_changes_the_classifier():
    x, y = _data()
    model = tiny_mlp()
    before = _state(model)
    adversarial_training(model, x, y, AdversarialTrainingConfig(attack_steps=2, step_size=0.1,
                                                                 epochs=1, batch_size=32), progress=False)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_augmentation_is_seeded_and_shape_preserving():
    x = torch.rand(8, 3, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    c = augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_adversarial_training_eps_ramp_follows_the_optimizer_step_count():
    from aeshield.defenses.adversarial_training import ramp

    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([weight], lr=0.1)
    assert ramp(optimizer, 0) == 1.0
    seen = []
    for _ in range(6):
        seen.append(ramp(optimizer, 4))
        weight.sum().backward()
        optimizer.step()
    assert seen == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    restored = torch.optim.Adam([weight], lr=0.1)
    restored.load_state_dict(optimizer.state_dict())  # what a resumed run sees
    assert ramp(restored, 10) == 0.7


def test_cosine_lr_anneals_to_zero_and_resumes_from_the_step_count():
    import math

    from aeshield.defenses.adversarial_training import cosine_lr

    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([weight], lr=0.1)
    seen = []
    for _ in range(5):
        seen.append(cosine_lr(optimizer, 0.1, 4))
        weight.sum().backward()
        optimizer.step()
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in (0, 1, 2, 3, 4)]
    assert all(math.isclose(a, b, abs_tol=1e-12) for a, b in zip(seen, expected))
    assert seen[0] == 0.1 and seen[-1] < 1e-12 and optimizer.param_groups[0]["lr"] == seen[-1]
    restored = torch.optim.Adam([weight], lr=0.1)
    restored.load_state_dict(optimizer.state_dict())
    assert math.isclose(cosine_lr(restored, 0.1, 10), 0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))


def test_aaa_cosine_lr_starts_after_the_warmup():
    x, y = _data()
    config = AAAConfig(**{**TINY_AAA, "cosine_lr": True, "epochs": 4, "warmup_steps": 20})
    torch.manual_seed(0)
    result = train_aaa(ConvAutoencoder(), [tiny_mlp(16)], x, y, config, progress=False)
    lrs = [h["lr"] for h in result.history]
    # 4 epochs of 3 updates: the lr of the last update of each epoch, on the cosine that starts
    # after the 20 warm-up updates (a schedule counting those would sit at 0 throughout).
    expected = [config.lr * 0.5 * (1 + math.cos(math.pi * t / 12)) for t in (2, 5, 8, 11)]
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(lrs, expected)), lrs
