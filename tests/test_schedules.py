"""Attack schedules for adversarial training (issue 26): "fast", "free" and the guard against
catastrophic overfitting, for AAA and Madry adversarial training alike."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aeshield.attacks.gradient import fgsm, noisy_fgsm_train, pgd_train
from aeshield.defenses.aaa import AAAConfig, AAAShieldConfig, train_aaa
from aeshield.defenses.adversarial_training import AdversarialTrainingConfig, adversarial_training, steps_taken
from aeshield.defenses.registry import config_from_dict, config_to_dict
from aeshield.defenses.schedules import (FreeReplay, OverfitGuard, craft, guarded, schedule_state, step_factor,
                                         warn_if_never_robust)
from aeshield.errors import ConfigError
from aeshield.threat import ThreatModel


def _data(n: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _classifier(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))


def _autoencoder(seed: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Sigmoid(), nn.Unflatten(1, (1, 8, 8)))


def test_fast_is_one_step_from_a_random_start_inside_the_ball():
    x, y = _data()
    model, threat = _classifier().eval(), ThreatModel("Linf", 0.3)
    fast = craft(model, x, y, schedule="fast", threat=threat, step_size=0.01, steps=40, step_factor=1.25,
                 generator=torch.Generator().manual_seed(0))
    assert threat.contains(fast, x).all() and fast.min() >= 0 and fast.max() <= 1
    # The same random start and one step of 1.25 eps: pgd_train with steps=1.
    one = pgd_train(model, x, y, threat=threat, step_size=0.375, steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast, one)
    # "pgd" is pgd_train exactly as the trainers called it before the schedules existed.
    pgd = craft(model, x, y, schedule="pgd", threat=threat, step_size=0.05, steps=3, step_factor=1.25,
                generator=torch.Generator().manual_seed(0))
    assert torch.equal(pgd, pgd_train(model, x, y, threat=threat, step_size=0.05, steps=3,
                                      generator=torch.Generator().manual_seed(0)))


def test_nfgsm_steps_from_a_noise_larger_than_eps_and_leaves_the_ball_but_not_the_box():
    x, y = _data(256)
    model, threat = _classifier().eval(), ThreatModel("Linf", 0.1)
    gen = torch.Generator().manual_seed(0)
    adv = craft(model, x, y, schedule="nfgsm", threat=threat, step_size=0.01, steps=40, step_factor=1.0,
                noise_factor=2.0, generator=gen)
    assert adv.min() >= 0 and adv.max() <= 1
    distance = (adv - x).abs().flatten(1).amax(1)
    assert (distance <= 0.3 + 1e-6).all()  # noise 2 eps + step eps, nothing more
    assert not threat.contains(adv, x).all()  # not projected to the ball: de Jorge et al.'s point
    # Without noise it is FGSM of step eps from the clean image.
    plain = noisy_fgsm_train(model, x, y, threat=threat, step_size=0.1, noise=0.0,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, fgsm(model, x, y, eps=0.1))
    with pytest.raises(ValueError, match="L-inf"):
        noisy_fgsm_train(model, x, y, threat=ThreatModel("L2", 1.0), step_size=0.1, noise=0.2, generator=gen)


def test_nfgsm_has_its_own_step_rule_and_the_guard():
    config = AdversarialTrainingConfig(schedule="nfgsm")
    assert guarded(config) and step_factor(config) == 1.0 and config.nfgsm_noise == 2.0
    assert step_factor(AdversarialTrainingConfig(schedule="fast")) == 1.25
    assert not guarded(AdversarialTrainingConfig(schedule="nfgsm", guard_drop=None))
    data = config_to_dict(AAAShieldConfig(training=AAAConfig(schedule="nfgsm", nfgsm_noise=1.0)))["training"]
    assert data["nfgsm_noise"] == 1.0 and "nfgsm_step" not in data
    with pytest.raises(ConfigError, match="nfgsm_step"):
        AAAConfig(schedule="nfgsm", nfgsm_step=0.0)


def test_free_replays_each_minibatch_m_times_and_carries_the_perturbation():
    x, y = _data()
    model = _classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    threat = ThreatModel("Linf", 0.1)
    free = FreeReplay(replays=3)
    seen: list[torch.Tensor] = []

    def loss_fn(xb, yb):
        def run(x_adv):
            seen.append((x_adv - xb).detach().clone())
            loss = F.cross_entropy(model(x_adv), yb)
            return loss, {"loss": loss.detach()}
        return run

    for b, (xb, yb) in enumerate(zip(x.split(32), y.split(32))):
        loss, _ = free.step(xb, loss_fn(xb, yb), optimizer, lambda: threat)
        optimizer.zero_grad(set_to_none=True)  # what the training loop does with the last replay
        loss.backward()
        optimizer.step()
        assert steps_taken(optimizer) == 3 * (b + 1)  # m parameter updates per minibatch
    assert free.updates == 4
    assert torch.equal(seen[0], torch.zeros_like(seen[0]))  # zeros at the start
    for earlier, later in zip(seen, seen[1:]):
        # each replay starts where the last one's step left the perturbation, across minibatches
        assert (later - earlier).abs().max() > 0
    state = free.state_dict()["delta"]  # the last replay's step, taken for the checkpoint
    assert state.abs().max() <= 0.1 + 1e-7 and state.abs().max() > 0
    assert all(d.abs().max() <= 0.1 + 1e-6 for d in seen)


def test_free_keeps_its_perturbation_in_the_pixel_box_so_a_zero_pixel_can_move_up_again():
    """A black pixel pushed down must not stay below 0, and one at 0 must get a gradient: a clamp
    in the graph gives none on the box's edge, and on MNIST, mostly black, the carried
    perturbation went dead (free training left no robustness before this was fixed)."""
    x = torch.zeros(4, 1, 3, 3)
    model = nn.Linear(1, 1)  # only to give the optimizer something to update
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    threat = ThreatModel("Linf", 0.1)
    free = FreeReplay(replays=3)
    seen: list[torch.Tensor] = []

    def loss_fn(x_adv):
        # the loss rises as the pixels fall on the first replay, and as they rise afterwards
        direction = -1.0 if not seen else 1.0
        seen.append(x_adv.detach().clone())
        return direction * x_adv.sum() + 0 * model.weight.sum(), {}

    loss, _ = free.step(x, loss_fn, optimizer, lambda: threat)
    loss.backward()
    free.state_dict()  # takes the last replay's step
    assert torch.equal(seen[0], x) and torch.equal(seen[1], x)  # pushed down, clamped at 0
    assert torch.allclose(seen[2], x + 0.1)  # and up again from there
    assert torch.allclose(free.delta, torch.full_like(x, 0.1))  # the last step, inside the box


def test_the_guard_watches_free_too_a_restore_drops_the_carried_perturbation_and_shortens_its_step():
    x, y = _data(32)
    model = _classifier()
    config = AdversarialTrainingConfig(schedule="free", replays=2, guard_backoff=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    free, guard = schedule_state(config, lambda: [model], {"model": model}, optimizer, x, y, None, None)
    assert guarded(config) and guard is not None and guard.step_factor == 1.0
    threat = ThreatModel("Linf", 0.1)

    seen: list[torch.Tensor] = []

    def outer(x_adv):
        seen.append((x_adv - x).detach().abs().max())
        loss = F.cross_entropy(model(x_adv), y)
        return loss, {}

    def one_minibatch():
        loss, _ = free.step(x, outer, optimizer, lambda: threat)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    accuracies = iter([0.6, 0.1, 0.55])  # baseline, the collapse, after the restore
    guard.measure = lambda: next(accuracies)
    guard.baseline()
    one_minibatch()
    assert free.state_dict()["delta"].abs().max() == pytest.approx(0.1)  # two steps of eps, clipped
    assert guard.check()["guard_restored"] == 1.0 and free.delta is None  # the perturbation dropped
    assert float(seen[1]) == pytest.approx(0.1)  # the second replay: one step of eps
    one_minibatch()
    assert float(seen[2]) == 0.0  # after the restore, from no perturbation
    assert float(seen[3]) == pytest.approx(0.05)  # then one step of half eps (the backoff)


@pytest.mark.parametrize("schedule", ["fast", "nfgsm", "free"])
def test_both_trainers_run_every_schedule_and_checkpoint_its_state(schedule, tmp_path):
    x, y = _data(96)
    ckpt = tmp_path / "at.ckpt"
    config = AdversarialTrainingConfig(epochs=2, batch_size=32, schedule=schedule, replays=2,
                                       checkpoint_every=1, guard_n=16, guard_steps=2)
    result = adversarial_training(_classifier(), x, y, config, x_val=x[:16], y_val=y[:16], checkpoint=ckpt,
                                  progress=False)
    payload = torch.load(ckpt, weights_only=True)
    steps = next(iter(payload["optimizer"]["state"].values()))["step"]
    assert int(steps) == (2 if schedule == "free" else 1) * 3 * 2
    if schedule == "free":
        assert payload["extra"]["free"]["delta"].abs().max() <= 0.3 + 1e-6
    assert float(payload["extra"]["guard"]["step_factor"]) == (1.25 if schedule == "fast" else 1.0)
    assert all("guard_adv_acc" in h and h["guard_restored"] == 0.0 for h in result.history)
    aaa = train_aaa(_autoencoder(), [_classifier(), _classifier(3)], x, y,
                    AAAConfig(epochs=1, batch_size=32, warmup_steps=2, schedule=schedule, replays=2,
                              guard_n=16, guard_steps=2), x_val=x[:16], y_val=y[:16], progress=False)
    assert aaa.config["schedule"] == schedule and sum(aaa.visits) == 3
    assert "guard_adv_acc" in aaa.history[0]


def test_a_check_within_the_epoch_restores_the_state_of_the_last_good_check():
    """``guard_every``: on one- or two-epoch budgets a collapse inside the first epoch leaves
    an end-of-epoch check nothing to go back to; a check every few updates does."""
    x, y = _data(8)
    model = _classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = OverfitGuard(lambda: [model], {"model": model}, optimizer, x, y, eps=0.3, steps=2, drop=0.2,
                         backoff=0.5, step_factor=1.25, every=2)
    accuracies = iter([0.5, 0.6, 0.1, 0.55, 0.58])  # baseline, update 2, update 4 (collapse), restored, end
    guard.measure = lambda: next(accuracies)
    start = [p.detach().clone() for p in model.parameters()]
    guard.baseline()
    for _ in range(5):
        guard.tick()
        with torch.no_grad():  # the update this tick came before
            for p in model.parameters():
                p.add_(1.0)
    # Restored at update 4 to the state checked at update 2, then one more update.
    assert all(torch.allclose(p, s + 3.0) for p, s in zip(model.parameters(), start))
    assert guard.step_factor == 0.625 and guard.restores == 1
    record = guard.check()
    assert record["guard_restored"] == 1.0 and record["guard_checks"] == 3.0
    assert guard.state_dict()["updates"] == 5


def test_guard_every_checks_inside_each_epoch_of_a_training_run(tmp_path):
    x, y = _data(96)
    ckpt = tmp_path / "at.ckpt"
    config = AdversarialTrainingConfig(epochs=2, batch_size=16, schedule="fast", guard_every=4, guard_n=16,
                                       guard_steps=2, checkpoint_every=1)
    result = adversarial_training(_classifier(), x, y, config, x_val=x[:16], y_val=y[:16], checkpoint=ckpt,
                                  progress=False)
    # 6 updates an epoch: checks before update 4 and at the end of epoch 1, before update 10
    # and at the end of epoch 2.
    assert [h["guard_checks"] for h in result.history] == [2.0, 2.0]
    guard_state = torch.load(ckpt, weights_only=True)["extra"]["guard"]
    assert int(guard_state["updates"]) == 12 and int(guard_state["checked_at"]) == 12
    # Without guard_every the records are what they were before it existed.
    plain = adversarial_training(_classifier(), x, y, dataclasses.replace(config, guard_every=None),
                                 x_val=x[:16], y_val=y[:16], progress=False)
    assert all("guard_checks" not in h for h in plain.history)
    with pytest.raises(ConfigError, match="guard_every"):
        AdversarialTrainingConfig(guard_every=0)


@pytest.mark.parametrize("trainer", ["at", "aaa"])
def test_a_restore_within_the_epoch_keeps_the_lr_schedule(trainer, monkeypatch):
    """A restore puts back the optimizer's state of the last good check, its lr included: the
    schedule's lr must be set after the check, so no update runs at an earlier, larger lr."""
    accuracies = iter([0.5, 0.6, 0.1, 0.55, 0.58])  # baseline, update 2, update 4 (collapse), restored, end
    monkeypatch.setattr(OverfitGuard, "measure", lambda self: next(accuracies))
    lrs: list[float] = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    x, y = _data(96)
    common = dict(epochs=1, batch_size=16, schedule="fast", guard_every=2, guard_n=16, guard_steps=2,
                  cosine_lr=True, lr=1e-2)
    try:
        if trainer == "at":
            result = adversarial_training(_classifier(), x, y, AdversarialTrainingConfig(**common),
                                          progress=False)
        else:
            result = train_aaa(_autoencoder(), [_classifier()], x, y, AAAConfig(warmup_steps=0, **common),
                               progress=False)
    finally:
        hook.remove()
    assert result.history[0]["guard_restored"] == 1.0
    assert len(lrs) == 6 and all(a > b for a, b in zip(lrs, lrs[1:]))  # the cosine, never back up


def test_a_fast_run_that_never_became_robust_under_pgd_is_told_to_use_pgd(caplog):
    # What FGSM training of MNIST's B at eps 0.3 ended with (docs/dev/fast-training.md).
    never = [{"train_adv_acc": 0.66, "guard_adv_acc": 0.0}, {"train_adv_acc": 0.90, "guard_adv_acc": 0.008}]
    with caplog.at_level("WARNING", logger="aeshield.defenses.schedules"):
        assert warn_if_never_robust(never)
    assert "schedule 'pgd'" in caplog.text and "90.0%" in caplog.text
    assert not warn_if_never_robust([{"train_adv_acc": 0.7, "guard_adv_acc": 0.4}])  # robust: fine
    assert not warn_if_never_robust([{"train_adv_acc": 0.3, "guard_adv_acc": 0.0}])  # nothing learnt yet
    assert not warn_if_never_robust([{"train_adv_acc": 0.9}])  # no guard
    assert not warn_if_never_robust([])


def test_schedule_fields_are_left_out_of_configs_at_their_default_and_checked():
    assert "schedule" not in config_to_dict(AAAShieldConfig())["training"]
    assert "guard_drop" not in config_to_dict(AdversarialTrainingConfig())
    fast = AAAShieldConfig(training=AAAConfig(schedule="fast", fgsm_step_factor=1.0))
    data = config_to_dict(fast)["training"]
    assert data["schedule"] == "fast" and data["fgsm_step_factor"] == 1.0 and "replays" not in data
    assert config_from_dict(AAAShieldConfig, config_to_dict(fast)) == fast
    with pytest.raises(ConfigError, match="unknown schedule"):
        AAAConfig(schedule="fgsm")
    with pytest.raises(ConfigError, match="replays"):
        AdversarialTrainingConfig(schedule="free", replays=0)
    with pytest.raises(ConfigError, match="guard_drop"):
        AdversarialTrainingConfig(guard_drop=2.0)
    assert "precision" not in config_to_dict(AdversarialTrainingConfig())
    assert config_to_dict(AdversarialTrainingConfig(precision="bfloat16"))["precision"] == "bfloat16"
    with pytest.raises(ConfigError, match="precision must be one of float32, bfloat16"):
        AAAConfig(precision="float16")


def test_bfloat16_training_runs_its_forward_passes_in_bfloat16_and_keeps_float32_weights(monkeypatch):
    from aeshield.train import loop

    x, y = _data(64)
    seen = []
    real = loop.precision_context

    def spy(precision, device):
        seen.append(precision)
        return real(precision, device)

    monkeypatch.setattr(loop, "precision_context", spy)
    dtypes = []
    classifier = _classifier()
    classifier.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    result = adversarial_training(classifier, x, y, AdversarialTrainingConfig(
        epochs=1, batch_size=32, attack_steps=2, step_size=0.1, precision="bfloat16"), progress=False)
    assert seen == ["bfloat16", "bfloat16"] and torch.bfloat16 in dtypes
    assert all(v.dtype == torch.float32 for v in classifier.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in classifier.state_dict().items())
    assert all(math.isfinite(v) for h in result.history for k, v in h.items() if k.startswith("train_"))
    autoencoder = _autoencoder()
    train_aaa(autoencoder, [_classifier()], x, y, AAAConfig(epochs=1, batch_size=32, warmup_steps=0,
              attack_steps=2, precision="bfloat16"), progress=False)
    assert seen[2:] == ["bfloat16", "bfloat16"]
    assert all(p.dtype == torch.float32 for p in autoencoder.parameters())


def test_the_guard_checks_in_float32_inside_a_mixed_precision_step():
    # ``guard_every`` checks run inside the training step, hence under its autocast; a bfloat16
    # PGD measured weaker, so the check steps out of it.
    x, y = _data(16)
    model = _classifier()
    dtypes = []
    model.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    guard = OverfitGuard(lambda: [model], {"model": model}, torch.optim.Adam(model.parameters()), x, y,
                         eps=0.3, steps=2, drop=0.2, backoff=0.5, step_factor=1.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        dtypes.clear()
        guard.measure()
    assert dtypes and all(d == torch.float32 for d in dtypes)


def test_a_spec_passes_the_schedule_to_the_defense_config_and_keys_only_what_it_sets():
    from aeshield.experiments.config import AdvTrainSpec, ShieldSpec, spec_dict
    from aeshield.experiments.methods import from_spec

    spec = ShieldSpec(method="aaa", autoencoder="conv-ae", against=("A",))
    fast = dataclasses.replace(spec, schedule="fast", fgsm_step_factor=1.0)
    assert "schedule" not in spec_dict(spec) and spec_dict(fast)["schedule"] == "fast"
    assert from_spec(AAAConfig, fast, seed=0).schedule == "fast"
    assert from_spec(AAAConfig, fast, seed=0).fgsm_step_factor == 1.0
    at = AdvTrainSpec(schedule="free", replays=8)
    assert from_spec(AdversarialTrainingConfig, at, seed=0).replays == 8
    assert spec_dict(at)["replays"] == 8 and "replays" not in spec_dict(AdvTrainSpec())
    mixed = dataclasses.replace(spec, precision="bfloat16")
    assert from_spec(AAAConfig, mixed, seed=0).precision == "bfloat16"
    assert spec_dict(mixed)["precision"] == "bfloat16" and "precision" not in spec_dict(spec)


@pytest.mark.slow
def test_the_overfitting_guard_fires_on_an_oversized_fgsm_step_and_restores_the_last_good_state():
    """A small CNN, FGSM-trained at eps 0.2 on 1,000 MNIST images to about 37% PGD-10 accuracy,
    then trained on with a deliberately oversized step (4 eps: after the clip, every pixel at a
    corner of the ball) and a large lr (1e-2): PGD accuracy falls to 16% in one epoch. The guard
    restores the state before that epoch (its accuracy again), lowers the step factor to 3 and,
    on a second collapse, to 2.25. (With the step at 1 eps and the same lr, the accuracy fell to
    19.5%, under the guard's 20-point threshold: the oversized step makes the difference here.
    The collapse is of PGD and training accuracy together, a large-step divergence, not the
    FGSM-accuracy-soars signature of Wong et al.'s catastrophic overfitting, which did not
    appear within 20 epochs on 2,000 images at this size.)"""
    from aeshield.data import load_dataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, val = load_dataset("mnist", "train"), load_dataset("mnist", "val")
        x, y, xv, yv = train.images[:1000], train.labels[:1000], val.images[:200], val.labels[:200]
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 16, 5, 2, 2), nn.ReLU(), nn.Conv2d(16, 32, 5, 2, 2), nn.ReLU(),
                              nn.Flatten(), nn.Linear(32 * 49, 64), nn.ReLU(), nn.Linear(64, 10))
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        for _ in range(2):  # natural pre-training
            for i in range(0, 1000, 50):
                loss = F.cross_entropy(model(x[i:i + 50]), y[i:i + 50])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        common = dict(eps=0.2, batch_size=50, schedule="fast", guard_n=200)
        first = adversarial_training(model, x, y, AdversarialTrainingConfig(
            epochs=4, fgsm_step_factor=1.0, guard_drop=1.0, **common), x_val=xv, y_val=yv, progress=False)
        good = first.history[-1]["guard_adv_acc"]
        assert good > 0.3
        before = {k: v.clone() for k, v in model.state_dict().items()}
        oversized = adversarial_training(model, x, y, AdversarialTrainingConfig(
            epochs=2, lr=1e-2, fgsm_step_factor=4.0, guard_drop=0.2, **common), x_val=xv, y_val=yv, progress=False)
    finally:
        torch.set_num_threads(threads)
    epoch1, epoch2 = oversized.history
    assert epoch1["guard_restored"] == 1.0 and epoch1["guard_adv_acc"] < good - 0.2
    assert epoch1["guard_step_factor"] == 3.0
    assert epoch1["guard_adv_acc_restored"] == pytest.approx(good)  # not the collapsed value
    assert epoch1["val_adv_acc"] > epoch1["guard_adv_acc"] + 0.1  # validation measures the restored model
    assert epoch2["guard_restored"] == 1.0 and epoch2["guard_step_factor"] == 2.25
    # Restored twice to the state before the oversized run: its weights are back.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
