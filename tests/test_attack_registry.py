"""The attack registry: one entry per attack, one dispatcher that checks the threat model, typed
settings, and an attack registered here reaching the CLI and the audit battery."""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from battery_cases import battery_dicts
from click.testing import CliRunner
from torch import nn

from aeshield.attacks import (AuditHook, Stage, attack_names, autoattack, bim, cw_l2, detector_pgd,
                              fgsm, get_attack, latent_pgd, orthogonal_pgd, pgd, reconstruction_pgd,
                              register, run_attack, unregister)
from aeshield.attacks.registry import TOLERANCE, AttackLeftThreatModel
from aeshield.defenses import Shielded
from aeshield.eval.audit import build_battery
from aeshield.threat import ThreatModel

LINF = ThreatModel("Linf", 0.1)


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def _data(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g) * 0.8 + 0.1, torch.randint(0, 10, (n,), generator=g)


# ---- a new attack, registered from this module ---------------------------------------------
@dataclass(frozen=True)
class RandomSignSettings:
    scale: float = 1.0


def random_sign(model, x, y, threat, generator, *, scale):
    """A corner of the L-inf ball, drawn at random (a black-box baseline)."""
    sign = torch.randint(0, 2, x.shape, generator=generator).to(x) * 2 - 1
    return (x + scale * threat.eps * sign).clamp(*threat.bounds)


@pytest.fixture
def random_sign_registered():
    register("random-sign", settings=RandomSignSettings, reference="a test",
             norms=("Linf",), audit=AuditHook(Stage.BLACK_BOX, lambda budget, threat: {"scale": 1.0},
                                              through_eot=False))(random_sign)
    yield
    unregister("random-sign")


def test_a_registered_attack_reaches_the_cli_choices(random_sign_registered):
    from aeshield.cli import main

    help_text = CliRunner().invoke(main, ["eval", "--help"], terminal_width=400).output
    assert "random-sign" in help_text
    missing = CliRunner().invoke(main, ["eval", "--classifier", "x", "--dataset", "mnist",
                                        "--attack", "no-such-attack"])
    assert missing.exit_code != 0 and "random-sign" in missing.output


def test_a_registered_attack_with_an_audit_hook_joins_the_battery(random_sign_registered):
    model = Shielded(None, _linear())
    labels = [s.label for s in build_battery(model, LINF, "quick")]
    # Black-box stage: after Square, before the transfer attacks.
    assert labels[labels.index("square") + 1] == "random-sign"
    assert labels[-1] == "transfer-classifier"
    assert "random-sign" not in [s.label for s in build_battery(model, ThreatModel("L2", 1.0), "quick")]


def test_the_cli_no_longer_lists_an_unregistered_attack():
    from aeshield.cli import main

    assert "random-sign" not in attack_names()
    assert "random-sign" not in CliRunner().invoke(main, ["eval", "--help"], terminal_width=400).output


def test_a_registered_attack_runs_through_the_harness(random_sign_registered):
    from aeshield.eval import AttackSpec, evaluate

    x, y = _data()
    record = evaluate(_linear(), x, y, [AttackSpec("random-sign", {"scale": 1})], LINF, progress=False)
    assert record.attacks[0].settings == {"scale": 1, "wrap": None}  # the record keeps what was asked


# ---- the dispatcher checks the threat model -------------------------------------------------
def _register_overshoot(name: str, overshoot: float) -> None:
    def run(model, x, y, threat, generator):
        return x + threat.eps + overshoot  # inputs lie in [0.1, 0.9], so the box is not the issue

    register(name, settings=_NoSettings, reference="a test")(run)


@dataclass(frozen=True)
class _NoSettings:
    pass


def test_a_result_outside_the_ball_raises():
    _register_overshoot("too-far", 1e-3)
    try:
        x, y = _data()
        with pytest.raises(AttackLeftThreatModel, match="'too-far' left its threat model"):
            run_attack("too-far", _linear(), x, y, LINF, torch.Generator())
    finally:
        unregister("too-far")


def test_round_off_outside_the_ball_is_clamped_back_inside():
    assert 1e-7 < TOLERANCE
    _register_overshoot("round-off", 1e-7)
    try:
        x, y = _data()
        raw = x + LINF.eps + 1e-7
        assert not LINF.contains(raw, x, tol=0).all()
        x_adv = run_attack("round-off", _linear(), x, y, LINF, torch.Generator())
        assert torch.equal(x_adv, LINF.project(raw, x))
        # Inside up to the round-off of measuring the distance itself (one float32 step at 1.0).
        assert float((LINF.distance(x_adv, x) - LINF.eps).max()) <= 2 ** -23
    finally:
        unregister("round-off")


def test_a_result_inside_keeps_every_bit():
    x, y = _data()
    gen = torch.Generator().manual_seed(3)
    direct = pgd(_linear(), x, y, eps=0.1, steps=3, step_size=0.05, generator=gen)
    dispatched = run_attack("pgd", _linear(), x, y, LINF, torch.Generator().manual_seed(3), steps=3,
                            step_size=0.05)
    assert torch.equal(direct, dispatched)


def test_cw_l2_is_now_held_to_its_threat_model_and_refuses_linf():
    x, y = _data()
    threat = ThreatModel("L2", 0.5)
    x_adv = run_attack("cw-l2", _linear(), x, y, threat, torch.Generator(), steps=20, lr=0.05)
    assert threat.contains(x_adv, x, tol=0).all()
    with pytest.raises(ValueError, match="'cw-l2' supports the norms \\['L2'\\], not Linf"):
        run_attack("cw-l2", _linear(), x, y, LINF, torch.Generator())


# ---- typed settings -------------------------------------------------------------------------
def test_a_string_where_a_float_is_expected_raises_naming_the_key():
    with pytest.raises(TypeError, match="attack 'pgd': setting 'step_size' must be float, got str"):
        get_attack("pgd").parse({"step_size": "0.01"})
    with pytest.raises(TypeError, match="'steps' must be int, got float"):
        get_attack("pgd").parse({"steps": 2.5})
    with pytest.raises(TypeError, match="'early_stop' must be bool"):
        get_attack("pgd").parse({"early_stop": 1})


def test_an_int_where_a_float_is_expected_is_converted():
    settings = get_attack("cw-l2").parse({"c": 100, "steps": 10})
    assert settings.c == 100.0 and isinstance(settings.c, float)
    assert get_attack("bim").parse({"step_size": None}).step_size is None
    assert get_attack("bim").parse({"step_size": 1}).step_size == 1.0


def test_an_unknown_setting_raises_naming_the_key_and_the_attack():
    with pytest.raises(ValueError, match="attack 'fgsm': unknown setting\\(s\\) \\['steps'\\]"):
        run_attack("fgsm", _linear(), *_data(), LINF, torch.Generator(), steps=10)


def test_settings_are_frozen_dataclasses():
    with pytest.raises(TypeError, match="frozen dataclass"):
        register("mutable", settings=dict, reference="")(random_sign)
    assert "mutable" not in attack_names()


def test_settings_defaults_are_the_attack_functions_defaults():
    functions = {"fgsm": fgsm, "bim": bim, "pgd": pgd, "cw-l2": cw_l2, "recon-pgd": reconstruction_pgd,
                 "latent-pgd": latent_pgd, "detector-pgd": detector_pgd, "orthogonal-pgd": orthogonal_pgd,
                 "apgd-ce": autoattack, "apgd-t": autoattack, "fab-t": autoattack, "square": autoattack}
    assert set(functions) <= set(attack_names())
    for name, fn in functions.items():
        signature = {**inspect.signature(pgd).parameters, **inspect.signature(fn).parameters}
        for field in dataclasses.fields(get_attack(name).settings):
            assert field.default == signature[field.name].default, (name, field.name)


def test_the_cli_passes_each_attack_the_options_it_always_did():
    from aeshield.cli.evaluate import _attack_settings

    shared = {"steps": 7, "step_size": 0.02, "restarts": 3}
    before = {"pgd": shared, "recon-pgd": {"steps": 7, "step_size": 0.02},
              "latent-pgd": {"steps": 7, "step_size": 0.02}, "bim": {"steps": 7, "step_size": 0.02},
              "cw-l2": {"steps": 7}, "fgsm": {}, "apgd-ce": {}, "apgd-t": {}, "fab-t": {}, "square": {}}
    for name, params in before.items():
        assert _attack_settings(name, shared) == params, name
        assert list(_attack_settings(name, shared)) == list(params), name


# ---- the audit battery ----------------------------------------------------------------------
def test_the_battery_is_the_one_written_by_hand_before_the_registry():
    want = json.loads((Path(__file__).parent / "fixtures" / "audit_battery.json").read_text())
    got = json.loads(json.dumps(battery_dicts(build_battery)))
    assert got.keys() == want.keys()
    for case in want:
        assert got[case] == want[case], case


# ---- the deprecated table -------------------------------------------------------------------
def test_the_deprecated_attack_table_still_works():
    import aeshield.eval as ev

    with pytest.warns(DeprecationWarning):
        table = ev.ATTACKS
    assert "pgd" in table and table["pgd"] is get_attack("pgd").run
    with pytest.warns(DeprecationWarning):
        ev.register_attack("legacy", lambda model, x, y, threat, gen, **kw: x.clone())
    try:
        x, y = _data()
        assert torch.equal(run_attack("legacy", _linear(), x, y, LINF, torch.Generator(), anything=1), x)
    finally:
        del table["legacy"]
    assert "legacy" not in attack_names()
