"""The robustness audit: the battery, the sanity checks on their fixtures, resuming, the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_mlp
from torch import nn

from aeshield.attacks import orthogonal_pgd
from aeshield.defenses import REJECT, Detector, Purifier, Shielded
from aeshield.eval import sanity
from aeshield.eval.audit import (
    BUDGETS,
    AuditBudget,
    audit,
    build_battery,
    detector_pgd,
    reference_attack,
    with_budget,
)
from aeshield.attacks import get_attack, registry
from aeshield.attacks.registry import replace_run
from aeshield.records import Accuracy
from aeshield.threat import ThreatModel

# The quick budget shrunk further for tests: every number smaller, the same battery.
TINY = with_budget("quick", pgd_steps=10, pgd_restarts=1, apgd_iters=10,
                   square_queries=200, cw_steps=20, eot_samples=4, adaptive_steps=10, sanity_n=100,
                   eps_fractions=(0.5, 1.0, 1.5), steps_sweep=(2, 5, 10))
LINF = ThreatModel("Linf", 0.3)


# ---- fixtures: pipelines with known pathologies ----------------------------------------------
class Quantize(Purifier):
    """Rounds pixels to ``levels`` grey levels: the gradient is exactly zero almost everywhere."""

    def __init__(self, levels: int = 5) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


class Noise(Purifier):
    """Adds Gaussian noise: a random pipeline."""

    def __init__(self, sigma: float = 0.1, declare: bool = True) -> None:
        super().__init__()
        self.sigma = sigma
        self.stochastic = declare

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.sigma * torch.randn_like(x)).clamp(0, 1)


class FarGuard(nn.Module):
    """Answers from a memorized table of the clean test images whenever the input is farther
    than ``radius`` (L-inf) from its nearest one: only large perturbations are 'defended', and
    that part of the model has no gradient. Accuracy then rises with eps."""

    def __init__(self, classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 radius: float) -> None:
        super().__init__()
        self.classifier, self.radius = classifier, radius
        self.register_buffer("images", images.flatten(1).clone())
        self.register_buffer("labels", labels.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x)
        with torch.no_grad():
            nearest = torch.cdist(x.flatten(1), self.images).argmin(1)
            far = (x.flatten(1) - self.images[nearest]).abs().amax(1) > self.radius
            table = 50 * F.one_hot(self.labels[nearest], logits.shape[1]).to(logits.dtype)
        return torch.where(far[:, None], table, logits)


class MidGray(Detector):
    """Scores how grey the image is: MNIST digits are nearly binary, and PGD noise on the black
    background is not."""

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return (4 * x * (1 - x)).flatten(1).mean(1)


@pytest.fixture
def data(mnist_small):
    _, test = mnist_small
    return test.images[:150], test.labels[:150]


def _attack_accuracies(report):
    return [a.accuracy_after.value for a in report.record.attacks]


# ---- acceptance: the clean case ----------------------------------------------------------------
def test_undefended_classifier_falls_to_zero_with_no_flags(trained_mlp, data, tmp_path):
    x, y = data
    report = audit(trained_mlp, x, y, LINF, budget=TINY, out=tmp_path, progress=False,
                   dataset="mnist", classifier="mlp")
    assert report.clean.value > 0.8
    assert report.robust.value <= 0.02
    assert report.flags == [], [c.line() for c in report.flags]
    assert {c.name for c in report.checks} == set(sanity.CHECK_ORDER)
    assert not report.random
    for name in ("audit.md", "audit.json", "acc_vs_eps.png", "acc_vs_steps.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert not list(tmp_path.glob(".audit-*")), "checkpoints are removed once the report is written"
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["summary"]["robust"]["ci_method"] == "Wilson"
    assert saved["summary"]["flags"] == []
    assert "torch" in saved["manifest"]["versions"]
    assert saved["manifest"]["data_hashes"]["evaluation_tensors"]
    assert all("seconds" in a and "peak_memory_mb" in a for a in saved["timing"]["attacks"])
    assert saved["checks_subset_n"] == 100
    text = (tmp_path / "audit.md").read_text()
    assert "Worst-case robust accuracy" in text and "[PASS]" not in text and "**PASS**" in text


def test_audit_restores_the_model_mode(data):
    x, y = data
    model = tiny_mlp().train()
    audit(model, x[:20], y[:20], LINF, budget=TINY, progress=False, checks=False)
    assert model.training


def test_cascade_never_raises_accuracy(trained_mlp, data):
    x, y = data
    model = Shielded(Quantize(), trained_mlp)
    report = audit(model, x, y, LINF, budget=TINY, progress=False, checks=False)
    after = _attack_accuracies(report)
    assert after == sorted(after, reverse=True)
    assert after[0] <= report.clean.value
    assert report.robust.value == after[-1]
    assert sum(a.newly_fooled for a in report.record.attacks) == report.clean.correct - report.robust.correct


# ---- acceptance: masked gradients and randomness ---------------------------------------------
def test_quantizing_shield_is_flagged_and_bpda_breaks_it(trained_mlp, data):
    x, y = data
    model = Shielded(Quantize(levels=5), trained_mlp)
    report = audit(model, x, y, LINF, budget=TINY, progress=False)
    gradients = report.check(sanity.GRADIENTS)
    assert gradients.flagged and gradients.details["zero_fraction"] > 0.9
    assert "BPDA" in gradients.explanation
    plain = report.record.attacks[0].accuracy_after.value   # pgd-ce: stuck at its random start
    assert plain > 0.6
    assert report.robust.value < 0.1                        # BPDA (or Square) finds the truth
    bpda = next(a for a in report.record.attacks if a.name == "bpda-pgd-ce")
    assert bpda.newly_fooled > 0.5 * report.record.n
    assert report.check(sanity.UNBOUNDED).flagged           # plain PGD cannot even win at eps=1


def test_blackbox_beating_whitebox_is_flagged(trained_mlp, data):
    x, y = data
    model = nn.Sequential(Quantize(levels=5), trained_mlp)   # no Shielded, so no BPDA variant
    report = audit(model, x, y, LINF, budget=TINY, progress=False)
    blackbox = report.check(sanity.BLACKBOX)
    assert blackbox.flagged and blackbox.details["per_attack"]["square"] > 0.3 * report.record.n
    assert report.check(sanity.GRADIENTS).flagged


def test_stochastic_pipeline_triggers_eot(trained_mlp, data):
    x, y = data
    torch.manual_seed(0)
    model = Shielded(Noise(declare=False), trained_mlp)      # detected, not just declared
    report = audit(model, x[:100], y[:100], LINF, budget=TINY, progress=False)
    assert report.random
    check = report.check(sanity.RANDOMNESS)
    assert check.verdict == sanity.PASS and check.details["random"] and check.details["eot_samples"] == 4
    assert "stochastic=True" in check.explanation
    gradient_attacks = [s for s in report.battery if s.label.startswith(("pgd-", "apgd", "fab"))]
    assert gradient_attacks and all(s.wrap == "eot" for s in gradient_attacks)
    assert report.robust.value < 0.1
    one_query = check.details["one_query"]
    assert one_query["draws"] == TINY.judge_draws and one_query["n"] == 100
    assert "expected accuracy (one query)" in report.to_markdown()


def test_one_query_vs_retries_separates_the_draws_from_the_attack(trained_mlp, data):
    x, y = data[0][:60], data[1][:60]
    threat = ThreatModel("Linf", 0.05)
    make = reference_attack(trained_mlp, TINY, random=False)
    fixed = sanity.one_query_vs_retries(trained_mlp, x, y, threat, make, 5, draws=8)
    # A deterministic pipeline gives every example a rate of 0 or 1: all four figures agree.
    assert fixed["coin_flips"] == 0
    assert (fixed["majority"]["correct"] == fixed["every_draw"]["correct"] == fixed["one_draw"]["correct"]
            == round(fixed["expected"] * fixed["n"]))
    torch.manual_seed(0)
    noisy = Shielded(Noise(sigma=0.4), trained_mlp)
    q = sanity.one_query_vs_retries(noisy, x, y, threat, reference_attack(noisy, TINY, random=True), 5,
                                    draws=16)
    assert q["coin_flips"] > 0
    assert q["every_draw"]["accuracy"] < q["expected"]          # retrying beats one query
    assert q["every_draw"]["correct"] <= q["majority"]["correct"]
    lo, hi = q["expected_interval"]
    assert lo <= q["expected"] <= hi


def test_randomness_check_flags_when_eot_is_off():
    result = sanity.judge_randomness(True, max_logit_change=0.1, declared=True, eot_samples=None)
    assert result.flagged and "EOT" in result.explanation
    quiet = sanity.judge_randomness(False, max_logit_change=0.0, declared=False, eot_samples=None)
    assert quiet.verdict == sanity.PASS


def test_deterministic_model_is_not_random(trained_mlp, data):
    x, _ = data
    assert sanity.detect_randomness(trained_mlp, x[:32]) == (False, 0.0)
    assert sanity.detect_randomness(Shielded(Noise(), trained_mlp), x[:32])[0]


# ---- the sweeps and the longer attack on their fixtures --------------------------------------
def test_eps_and_unbounded_checks_fire_on_a_large_perturbation_guard(trained_mlp, data):
    x, y = data
    x, y = x[:100], y[:100]
    threat = ThreatModel("Linf", 0.15)
    guard = FarGuard(trained_mlp, x, y, radius=0.2).eval()
    for model, fires in ((guard, True), (trained_mlp, False)):
        make = reference_attack(model, TINY, random=False)
        values = [0.0, 0.075, 0.15, 0.225]
        accs = sanity.run_sweep(model, x, y, threat, make, [(e, TINY.pgd_steps) for e in values])
        assert sanity.judge_monotone(sanity.EPS_MONOTONE, "eps", values, accs).flagged is fires
        (unbounded,) = sanity.run_sweep(model, x, y, threat, make, [(1.0, TINY.pgd_steps)])
        assert sanity.judge_unbounded(unbounded, 1.0).flagged is fires


def test_steps_check_fires_on_noisy_gradients(trained_mlp, data):
    # Few EOT samples and small steps: the gradient is too noisy to make progress, so a
    # 2-step attack (large steps) beats a 40-step one and accuracy rises with steps.
    x, y = data
    x, y = x[:100], y[:100]
    torch.manual_seed(0)
    budget = with_budget(TINY, eot_samples=2)
    for model, random, fires in ((Shielded(Noise(sigma=0.1), trained_mlp), True, True),
                                 (trained_mlp, False, False)):
        make = reference_attack(model, budget, random=random)
        values = [2, 40]
        accs = sanity.run_sweep(model, x, y, LINF, make, [(LINF.eps, s) for s in values])
        result = sanity.judge_monotone(sanity.STEPS_MONOTONE, "steps", values, accs, random=random)
        assert result.flagged is fires, result.line()


def test_longer_attack_check_fires_when_the_budget_is_too_short(trained_mlp, data):
    x, y = data
    threat = ThreatModel("Linf", 0.08)
    make = reference_attack(trained_mlp, TINY, random=False)
    for steps, fires in ((1, True), (20, False)):
        short, long, only_long, only_short = sanity.run_longer(trained_mlp, x, y, threat, make, steps)
        result = sanity.judge_longer(short, long, only_long=only_long, only_short=only_short, factor=10)
        assert result.flagged is fires, result.line()


# ---- judgements on synthetic numbers ----------------------------------------------------------
def test_monotone_judgement_allows_sampling_noise():
    def a(correct):
        return Accuracy(correct, 200)

    assert not sanity.judge_monotone("m", "eps", [0.1, 0.2, 0.3], [a(100), a(60), a(62)]).flagged
    assert sanity.judge_monotone("m", "eps", [0.1, 0.2, 0.3], [a(100), a(60), a(90)]).flagged
    assert sanity.judge_monotone("m", "eps", [0.3], [a(1)]).verdict == sanity.SKIP


def test_longer_judgement_uses_a_sign_test():
    def a(correct):
        return Accuracy(correct, 200)

    assert sanity.judge_longer(a(50), a(40), only_long=10, only_short=0, factor=10).flagged
    assert not sanity.judge_longer(a(50), a(48), only_long=4, only_short=2, factor=10).flagged
    assert not sanity.judge_longer(a(50), a(50), only_long=0, only_short=0, factor=10).flagged
    assert sanity.sign_test(0, 0) == 1.0 and sanity.sign_test(10, 0) < 0.01


def test_gradient_judgement():
    assert sanity.judge_gradients(0.5, 0.0, n=100, shielded=True).flagged
    assert sanity.judge_gradients(0.0, 0.9, n=100, shielded=False).flagged
    assert not sanity.judge_gradients(0.0, 0.1, n=100, shielded=False).flagged


# ---- detector-aware attack ---------------------------------------------------------------------
def test_detector_pgd_finds_points_the_detector_accepts(trained_mlp, mnist_small):
    train, test = mnist_small
    detector = MidGray()
    detector.calibrate(train.images[:500], false_positive_rate=0.05)
    model = Shielded(None, trained_mlp, detector).eval()
    x, y = test.images[:100], test.labels[:100]
    settings = {"eps": 0.3, "steps": 20, "step_size": 0.03, "generator": torch.Generator().manual_seed(0)}
    from aeshield.attacks import pgd

    def evaded(x_adv):
        labels = model.predict(x_adv)
        return ((labels != y) & (labels != REJECT)).float().mean().item()

    plain = evaded(pgd(model, x, y, **settings))    # its noise is rejected
    aware = evaded(detector_pgd(model, x, y, **settings))
    orthogonal = evaded(orthogonal_pgd(model, x, y, **settings))
    assert plain < 0.05 and aware > 0.3 and orthogonal > 0.3
    labels = [s.label for s in build_battery(model, LINF, TINY)]
    assert "detector-pgd" in labels and "orthogonal-pgd" in labels


# ---- resuming ----------------------------------------------------------------------------------
def test_interrupted_audit_resumes_to_the_same_result(trained_mlp, data, tmp_path, monkeypatch):
    x, y = data
    model = Shielded(Quantize(), trained_mlp)
    budget = with_budget(TINY, sanity_n=50)
    calls = {"fab-t": 0, "pgd": 0}
    real_fab, real_pgd, real_longer = get_attack("fab-t").run, get_attack("pgd").run, sanity.longer_records
    # The attacks swapped below live in a copy of the registry that monkeypatch puts back.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def crash_at_fab(*args, **kw):
        raise KeyboardInterrupt("simulated kill during the cascade")

    out = tmp_path / "resumed"
    replace_run("fab-t", crash_at_fab)
    with pytest.raises(KeyboardInterrupt):
        audit(model, x, y, LINF, budget=budget, out=out, progress=False)
    assert (out / ".audit-cascade.json").exists()

    def crash_in_checks(*args, **kw):
        raise KeyboardInterrupt("simulated kill during the checks")

    replace_run("fab-t", real_fab)
    monkeypatch.setattr(sanity, "longer_records", crash_in_checks)
    with pytest.raises(KeyboardInterrupt):
        audit(model, x, y, LINF, budget=budget, out=out, progress=False)
    assert (out / ".audit-checks.json").exists()

    def counting(name, real):
        def run(*args, **kw):
            calls[name] += 1
            return real(*args, **kw)
        return run

    monkeypatch.setattr(sanity, "longer_records", real_longer)
    replace_run("fab-t", counting("fab-t", real_fab))
    replace_run("pgd", counting("pgd", real_pgd))
    monkeypatch.setattr(sanity, "sweep_records", lambda *a, **k: pytest.fail("finished checks re-ran"))
    monkeypatch.setattr(sanity, "gradient_statistics", lambda *a, **k: pytest.fail("re-ran"))
    resumed = audit(model, x, y, LINF, budget=budget, out=out, progress=False)
    # The finished cascade is not run again; only the interrupted check runs (short and long PGD).
    assert calls == {"fab-t": 0, "pgd": 2}
    monkeypatch.undo()
    fresh = audit(model, x, y, LINF, budget=budget, out=tmp_path / "fresh", progress=False)
    assert resumed.record.robust_flags == fresh.record.robust_flags
    assert torch.equal(resumed.robust_flags(), fresh.robust_flags())
    assert [a.newly_fooled for a in resumed.record.attacks] == [a.newly_fooled for a in fresh.record.attacks]
    assert [(c.name, c.verdict) for c in resumed.checks] == [(c.name, c.verdict) for c in fresh.checks]
    assert not list(out.glob(".audit-*"))


# ---- budgets and battery -----------------------------------------------------------------------
def test_budgets_are_frozen_and_ordered():
    assert set(BUDGETS) == {"quick", "standard", "paper"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        BUDGETS["quick"].pgd_steps = 1  # type: ignore[misc]
    paper = BUDGETS["paper"]
    assert (paper.apgd_iters, paper.apgd_restarts, paper.square_queries, paper.pgd_steps) == (100, 1, 5000, 100)
    assert BUDGETS["quick"].pgd_steps < BUDGETS["standard"].pgd_steps <= paper.pgd_steps
    assert isinstance(with_budget("quick", sanity_n=10), AuditBudget)


def test_battery_adapts_to_the_pipeline(trained_mlp):
    class Encoding(Purifier):
        def forward(self, x):
            return x

        def encode(self, x):
            return x

    bare = [s.label for s in build_battery(trained_mlp, ThreatModel("L2", 1.5), TINY)]
    assert "cw-l2" in bare and "square" in bare and not any(label.startswith("bpda") for label in bare)
    shielded = [s.label for s in build_battery(Shielded(Encoding(), trained_mlp), LINF, TINY,
                                                surrogate=trained_mlp)]
    for label in ("bpda-pgd-ce", "recon-pgd", "latent-pgd", "transfer-classifier", "transfer-surrogate"):
        assert label in shielded
    assert "cw-l2" not in shielded
    blackbox_first = min(shielded.index(label) for label in ("square", "transfer-classifier"))
    assert all(shielded.index(label) < blackbox_first for label in ("pgd-ce", "fab-t", "bpda-pgd-ce", "recon-pgd"))


# ---- the command -------------------------------------------------------------------------------
def test_cli_every_option_has_help():
    from aeshield.cli.audit import audit_cmd

    assert all(p.help for p in audit_cmd.params if p.name != "help")


def test_cli_audits_saved_weights_and_all_shipped(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from aeshield.cli.audit import audit_cmd
    from aeshield.models import create_model
    from aeshield.models.io import save_weights

    torch.manual_seed(0)
    weights = tmp_path / "weights"
    save_weights(create_model("mnist-c"), weights / "clf.safetensors", architecture="mnist-c",
                 dataset="mnist", kind="classifier")
    save_weights(create_model("conv-ae-small"), weights / "tiny-shield.safetensors",
                 architecture="conv-ae-small", dataset="mnist", kind="shield", method="test",
                 trained_against=[str(weights / "clf.safetensors")], config={"eps": 0.2})
    monkeypatch.setattr("aeshield.models.io.shipped_dir", lambda: weights)
    runner = CliRunner()
    result = runner.invoke(audit_cmd, ["--all-shipped", "--out", str(tmp_path / "audits"), "--n", "30",
                                       "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "robust accuracy" in result.output and "[PASS]" in result.output or "[FLAG]" in result.output
    index = (tmp_path / "audits" / "index.md").read_text()
    assert "tiny-shield" in index and "Linf 0.2" in index
    (report_dir,) = [p for p in (tmp_path / "audits").iterdir() if p.is_dir()]
    assert (report_dir / "audit.md").exists()
    # the row gives the cascade alone next to the headline, the checks' runs included
    summary = json.loads((report_dir / "audit.json").read_text())["summary"]
    cascade, robust = (Accuracy(summary[k]["correct"], summary[k]["n"]).format()
                       for k in ("battery_robust", "robust"))
    assert f"| {cascade} | [{robust}](" in index and "| cascade | robust |" in index

    # --reuse-only writes the same index from the finished reports and runs nothing
    reused = runner.invoke(audit_cmd, ["--all-shipped", "--reuse-only", "--out", str(tmp_path / "audits"),
                                       "--n", "30", "--no-progress", "--device", "cpu"])
    assert reused.exit_code == 0 and "robust accuracy" not in reused.output
    assert (tmp_path / "audits" / "index.md").read_text() == index
    # a finished audit of the same weight files and settings is reused, row for row ...
    again = runner.invoke(audit_cmd, ["--all-shipped", "--out", str(tmp_path / "audits"), "--n", "30",
                                      "--no-progress", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert "up to date" in again.output and "robust accuracy" not in again.output
    assert (tmp_path / "audits" / "index.md").read_text() == index
    # ... but not once the shield's weights change
    torch.manual_seed(1)
    save_weights(create_model("conv-ae-small"), weights / "tiny-shield.safetensors",
                 architecture="conv-ae-small", dataset="mnist", kind="shield", method="test",
                 trained_against=[str(weights / "clf.safetensors")], config={"eps": 0.2})
    retrained = runner.invoke(audit_cmd, ["--all-shipped", "--out", str(tmp_path / "audits"), "--n", "30",
                                          "--no-progress", "--device", "cpu"])
    assert retrained.exit_code == 0, retrained.output
    assert "up to date" not in retrained.output and "robust accuracy" in retrained.output

    stale = runner.invoke(audit_cmd, ["--all-shipped", "--reuse-only", "--out", str(tmp_path / "fresh"),
                                      "--n", "30", "--no-progress", "--device", "cpu"])
    assert stale.exit_code == 0 and "robust accuracy" not in stale.output
    assert "not audited yet" in (tmp_path / "fresh" / "index.md").read_text()

    missing = runner.invoke(audit_cmd, ["--dataset", "mnist"])
    assert missing.exit_code != 0 and "--classifier" in missing.output


def test_all_shipped_audits_each_shield_at_the_eps_it_was_trained_at():
    from aeshield.cli.audit import _training_eps
    from aeshield.models.io import shipped_dir

    assert _training_eps({"config": {"eps": 0.3}}) == 0.3               # aeshield train
    assert _training_eps({"shield_spec": {"eps": 0.2}}) == 0.2          # reproduce --ship
    assert _training_eps({"shield_spec": {"method": "magnet"}}) is None  # not adversarially trained
    sidecars = [json.loads(p.read_text()) for p in shipped_dir().glob("aaa-fmnist*.json")]
    assert sidecars and {_training_eps(m) for m in sidecars} == {0.2}


def test_shipped_shields_name_the_classifiers_they_go_with_by_loadable_names():
    """The audit loads these names; a config key such as "F" would be skipped."""
    from aeshield.models import list_models
    from aeshield.models.io import shipped_dir

    loadable = {p.stem for p in shipped_dir().glob("*.safetensors")} | set(list_models())
    for side in shipped_dir().glob("*.json"):
        meta = json.loads(side.read_text())
        if meta.get("kind") == "shield":
            names = (meta.get("trained_against") or []) + (meta.get("transfer_classifiers") or [])
            assert set(names) <= loadable, f"{side.name}: {names}"


def test_a_purifier_without_a_single_latent_space_gets_no_latent_attack(trained_mlp):
    from aeshield.defenses.base import AutoencoderPurifier
    from aeshield.defenses.magnet import DiverseAutoencoder
    from aeshield.models import create_model

    torch.manual_seed(0)
    one = AutoencoderPurifier(create_model("conv-ae-small"))
    several = AutoencoderPurifier(DiverseAutoencoder([create_model("conv-ae-small") for _ in range(2)]))
    assert hasattr(one, "encode") and not hasattr(several, "encode")  # it crashed the audit
    labels = {m: [s.label for s in build_battery(Shielded(p, trained_mlp), LINF, TINY)]
              for m, p in (("one", one), ("several", several))}
    assert "latent-pgd" in labels["one"] and "latent-pgd" not in labels["several"]
    assert "recon-pgd" in labels["several"]


def test_the_audit_attacks_shipped_puvae_and_magnet_with_their_detectors():
    import aeshield
    from aeshield.defenses.puvae import PuVAE
    from aeshield.cli.options import deployed_pipeline as _deployed, deployment_description as _deployment

    clf = aeshield.load_classifier("mnist-b")
    x = torch.rand(3, 1, 28, 28)
    assert isinstance(aeshield.load_shield("puvae-mnist"), PuVAE)  # not a plain AE purifier
    assert aeshield.load_shield("puvae-mnist")(x).shape == x.shape
    for name in ("puvae-mnist", "magnet-mnist"):
        model = _deployed(name, clf, "cpu")
        assert model.detector is not None and _deployment(name) is not None
    assert _deployed("aaa-mnist", clf, "cpu").detector is None and _deployment("aaa-mnist") is None


def test_audit_of_a_pipeline_with_a_detector(trained_mlp, mnist_small):
    train, test = mnist_small
    detector = MidGray()
    detector.calibrate(train.images[:500], false_positive_rate=0.05)
    model = Shielded(None, trained_mlp, detector)
    report = audit(model, test.images[:100], test.labels[:100], LINF, budget=TINY, progress=False)
    assert report.record.clean_reject_rate is not None and report.record.clean_reject_rate < 0.15
    assert "detector-pgd" in [a.name for a in report.record.attacks]
    plain = report.record.attacks[0].accuracy_after.value    # pgd-ce: its noise gets rejected
    assert plain > 0.5 and report.robust.value < plain
    assert not report.check(sanity.UNBOUNDED).flagged       # the reference attack is detector-aware


def test_unbounded_judgement_allows_sampling_noise():
    assert not sanity.judge_unbounded(Accuracy(0, 100), 1.0).flagged
    assert not sanity.judge_unbounded(Accuracy(3, 100), 1.0).flagged     # lower bound 1.0%
    assert sanity.judge_unbounded(Accuracy(8, 100), 1.0).flagged
    assert sanity.judge_unbounded(Accuracy(40, 1000), 1.0).flagged


def test_reports_of_the_previous_protocol_are_reused_only_where_it_measured_the_same():
    from aeshield.eval.audit import PROTOCOL, measures_as_current_protocol

    def saved(version, labels, flags=(), checks=()):
        summary = {"flags": list(flags)} | ({"protocol": version} if version else {})
        return {"summary": summary, "battery": [{"label": label} for label in labels],
                "checks": [{"name": name} for name in checks]}

    assert measures_as_current_protocol(saved(PROTOCOL, ["pgd-ce", "detector-pgd"], ["unbounded-eps"],
                                              checks=["longer-attack"]))
    # Before 4 the headline left out the checks' attacks; a report without checks is unaffected.
    for version in (None, 2, 3):
        assert not measures_as_current_protocol(saved(version, ["pgd-ce", "recon-pgd"],
                                                      checks=["longer-attack"]))
    assert measures_as_current_protocol(saved(None, ["pgd-ce", "recon-pgd"]))
    assert not measures_as_current_protocol(saved(None, ["pgd-ce", "detector-pgd [eot]"]))
    assert not measures_as_current_protocol(saved(None, ["pgd-ce"], ["unbounded-eps"]))
    # Version 5 only adds the one-query measurement of random pipelines.
    assert measures_as_current_protocol(saved(4, ["pgd-ce"], checks=["longer-attack"]))
    random_v4 = saved(4, ["pgd-ce [eot]"], checks=["longer-attack"])
    random_v4["summary"]["random"] = True
    assert not measures_as_current_protocol(random_v4)
    # Version 2 differs from 3 only on pipelines with a detector.
    assert measures_as_current_protocol(saved(2, ["pgd-ce", "recon-pgd"], ["unbounded-eps"]))
    assert not measures_as_current_protocol(saved(2, ["pgd-ce", "detector-pgd", "orthogonal-pgd"]))


# ---- the headline counts the checks' attacks -----------------------------------------------------
def test_the_headline_counts_every_example_the_checks_attacks_fooled_inside_the_threat_model(
        trained_mlp, data, tmp_path):
    x, y = data
    # A one-step cascade is too short to converge; the checks' longer runs fool more.
    short = with_budget(TINY, pgd_steps=1, pgd_restarts=1, apgd_iters=1, square_queries=1,
                        adaptive_steps=1, eps_fractions=(0.5, 1.0, 1.5), steps_sweep=(1, 2, 5))
    report = audit(trained_mlp, x, y, ThreatModel("Linf", 0.1), budget=short, out=tmp_path,
                   progress=False, plots=False)
    battery = report.record.flags()
    headline = report.robust_flags()
    assert not (headline & ~battery).any()                # never un-fools an example
    index = torch.tensor(report.check_index)
    labels = set(report.check_attacks)
    # Every run inside the ball counts (eps sweep at eps <= 0.1, the steps sweep, both longer
    # runs); the eps sweep's run outside it (1.5 eps) and the unbounded run do not.
    assert {"monotone-eps: eps=0.05 steps=1", "monotone-eps: eps=0.1 steps=1",
            "monotone-steps: eps=0.1 steps=5", "longer-attack: eps=0.1 steps=10"} <= labels
    assert not any("eps=0.15" in label or "unbounded" in label for label in labels)
    for flags in report.check_attacks.values():
        assert not (headline[index] & ~torch.tensor([c == "1" for c in flags])).any()
    assert report.robust.correct < report.battery_robust.correct   # the checks did add something
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["summary"]["robust"]["correct"] == report.robust.correct
    assert saved["summary"]["battery_robust"]["correct"] == report.battery_robust.correct
    assert saved["robust_flags"] == "".join("1" if f else "0" for f in headline.tolist())
    assert sum(saved["check_attacks"]["fooled_beyond_cascade"].values()) >= (
        report.battery_robust.correct - report.robust.correct)
    assert "The cascade alone" in (tmp_path / "audit.md").read_text()
