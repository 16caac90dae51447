import pytest
import torch

from aeshield.defenses import REJECT, Detector, Shielded
from aeshield.eval import AttackSpec, EvalRecord, evaluate, wilson_interval
from aeshield.stats import paired_difference_interval, paired_ratio_interval
from aeshield.threat import ThreatModel

PGD = AttackSpec("pgd", {"steps": 5, "step_size": 0.02})
FGSM = AttackSpec("fgsm")
BIM = AttackSpec("bim", {"steps": 5})


@pytest.fixture
def eval_data(mnist_small):
    _, test = mnist_small
    return test.images[:150], test.labels[:150]


def test_cascade_never_better_than_any_single_attack(trained_mlp, eval_data):
    x, y = eval_data
    threat = ThreatModel("Linf", 0.06)
    singles = [evaluate(trained_mlp, x, y, [a], threat, progress=False).robust.value
               for a in (FGSM, BIM, PGD)]
    cascade = evaluate(trained_mlp, x, y, [FGSM, BIM, PGD], threat, progress=False)
    assert cascade.robust.value <= min(singles)
    after = [a.accuracy_after.value for a in cascade.attacks]
    assert after == sorted(after, reverse=True)  # each attack can only remove survivors
    assert cascade.clean.value >= after[0]


def test_record_fields_and_roundtrip(trained_mlp, eval_data, tmp_path):
    x, y = eval_data
    record = evaluate(trained_mlp, x, y, [PGD], ThreatModel("Linf", 0.05), seed=3,
                      defense="none", classifier="mlp", dataset="mnist", progress=False)
    d = record.to_dict()
    assert d["n"] == 150 and d["seed"] == 3 and d["threat"]["eps"] == 0.05
    lo, hi = d["robust"]["ci95"]
    assert lo <= d["robust"]["accuracy"] <= hi
    assert d["attacks"][0]["settings"]["steps"] == 5
    path = record.save(tmp_path / "r.json")
    again = EvalRecord.load(path)
    assert again.robust.correct == record.robust.correct
    assert torch.equal(again.flags(), record.flags())


def test_checkpoint_resumes_to_same_result(trained_mlp, eval_data, tmp_path):
    from aeshield.attacks import fgsm, pgd, register, unregister
    from aeshield.attacks.registry import Untyped

    x, y = eval_data
    threat = ThreatModel("Linf", 0.05)
    calls = {"fgsm": 0, "crash": True}

    def counting_fgsm(model, xb, yb, threat, gen):
        calls["fgsm"] += 1
        return fgsm(model, xb, yb, eps=threat.eps)

    def flaky_pgd(model, xb, yb, threat, gen):
        if calls["crash"]:
            raise KeyboardInterrupt("simulated kill")
        return pgd(model, xb, yb, eps=threat.eps, steps=5, step_size=0.02, generator=gen)

    register("counting-fgsm", settings=Untyped, reference="test")(counting_fgsm)
    register("flaky-pgd", settings=Untyped, reference="test")(flaky_pgd)
    specs = [AttackSpec("counting-fgsm"), AttackSpec("flaky-pgd")]
    try:
        ckpt = tmp_path / "state.json"
        with pytest.raises(KeyboardInterrupt):
            evaluate(trained_mlp, x, y, specs, threat, progress=False, checkpoint=ckpt)
        assert ckpt.exists() and calls["fgsm"] == 1
        calls["crash"] = False
        resumed = evaluate(trained_mlp, x, y, specs, threat, progress=False, checkpoint=ckpt)
        assert calls["fgsm"] == 1  # the finished attack was not run again
        full = evaluate(trained_mlp, x, y, specs, threat, progress=False)
        assert resumed.robust_flags == full.robust_flags
        assert [a.newly_fooled for a in resumed.attacks] == [a.newly_fooled for a in full.attacks]
    finally:
        unregister("counting-fgsm")
        unregister("flaky-pgd")


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_paired_ratio_interval_keeps_the_pairing():
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(300, generator=gen) * 10 + 1  # wide spread between examples
    exact = paired_ratio_interval(3 * base, base)
    # Each example is exactly 3x its partner, so every resample gives 3: an unpaired bootstrap
    # would mix the spread between examples into the interval.
    assert exact["ratio"] == pytest.approx(3.0)
    assert exact["ci95"][0] == pytest.approx(3.0) and exact["ci95"][1] == pytest.approx(3.0)
    noisy = paired_ratio_interval(3 * base + torch.randn(300, generator=gen), base)
    lo, hi = noisy["ci95"]
    assert lo < noisy["ratio"] < hi and 2.8 < lo and hi < 3.2
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio_interval(base, base[:10])
    with pytest.raises(ValueError, match="denominator"):
        paired_ratio_interval(base, torch.zeros(300))


class ThresholdDetector(Detector):
    """Rejects images whose mean brightness exceeds the threshold."""

    def score(self, x):
        return x.flatten(1).mean(1)


def test_reject_counts_as_handled_for_attacks_and_as_error_when_clean(trained_mlp, eval_data):
    x, y = eval_data
    detector = ThresholdDetector()
    detector.threshold.fill_(-1.0)  # rejects everything
    model = Shielded(None, trained_mlp, detector)
    assert (model.predict(x) == REJECT).all()
    record = evaluate(model, x, y, [PGD], ThreatModel("Linf", 0.3), progress=False)
    assert record.clean.correct == 0  # a rejected clean input is an error
    assert record.clean_reject_rate == 1.0


def test_rejected_adversarial_input_is_handled(trained_mlp, eval_data):
    x, y = eval_data
    detector = ThresholdDetector()
    # Calibrated on clean data: adversarial PGD images (brighter on average) get rejected.
    detector.calibrate(x, false_positive_rate=0.0)
    model = Shielded(None, trained_mlp, detector)
    bright = AttackSpec("pgd", {"steps": 1, "step_size": 0.0, "random_start": True})
    undefended = evaluate(trained_mlp, x, y, [PGD], ThreatModel("Linf", 0.3), progress=False)
    defended = evaluate(model, x, y, [PGD, bright], ThreatModel("Linf", 0.3), progress=False)
    assert defended.robust.value > undefended.robust.value


def test_attack_leaving_threat_model_is_caught(trained_mlp, eval_data):
    from aeshield.attacks import register, unregister
    from aeshield.attacks.registry import Untyped

    register("broken", settings=Untyped, reference="test")(
        lambda model, x, y, threat, gen: (x + 0.5).clamp(0, 1))
    try:
        with pytest.raises(RuntimeError, match="left its threat model"):
            evaluate(trained_mlp, *eval_data, [AttackSpec("broken")], ThreatModel("Linf", 0.1),
                     progress=False)
    finally:
        unregister("broken")


def test_component_attacks_are_skipped_where_they_do_not_apply(trained_mlp, eval_data):
    x, y = eval_data
    record = evaluate(trained_mlp, x, y, [AttackSpec("recon-pgd", {"steps": 2})],
                      ThreatModel("Linf", 0.1), progress=False)
    assert record.attacks[0].settings["skipped"] and record.attacks[0].newly_fooled == 0


def test_paired_difference_interval_uses_the_pairing_and_matches_wald_at_large_n():
    import math

    gen = torch.Generator().manual_seed(0)
    first = torch.rand(10_000, generator=gen) < 0.9
    flip = torch.rand(10_000, generator=gen) < 0.08
    second = first ^ flip  # agrees with the first on 92% of the examples
    d = paired_difference_interval(first, second)
    b, c = d["discordant"]
    n = 10_000
    assert d["difference"] == pytest.approx((b - c) / n)
    wald = 1.96 * math.sqrt(b + c - (b - c) ** 2 / n) / n
    lo, hi = d["ci95"]
    assert lo < d["difference"] < hi
    assert lo == pytest.approx(d["difference"] - wald, abs=1e-3)
    assert hi == pytest.approx(d["difference"] + wald, abs=1e-3)
    # Ignoring the pairing (independent samples) would give a much wider interval.
    unpaired = 1.96 * math.sqrt(first.float().mean() * (1 - first.float().mean()) / n
                                + second.float().mean() * (1 - second.float().mean()) / n)
    assert hi - lo < 0.8 * 2 * unpaired


def test_paired_difference_interval_of_identical_models_is_zero_and_narrow():
    flags = torch.arange(1000) % 10 != 0
    d = paired_difference_interval(flags, flags)
    assert d["difference"] == 0 and d["discordant"] == [0, 0]
    lo, hi = d["ci95"]
    assert lo <= 0 <= hi and hi - lo < 0.01
    with pytest.raises(ValueError, match="equally long"):
        paired_difference_interval(flags, flags[:10])
