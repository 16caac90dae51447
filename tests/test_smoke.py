"""Smoke runs: a profile's whole code path at a few images and steps, and nothing else changed."""

import json
from dataclasses import fields

import pytest
from click.testing import CliRunner

from aeshield.cli import main
from aeshield.experiments import list_targets, load_config, reproduce
from aeshield.experiments.smoke import CAPS, DATA_LIMIT, TRAIN_IMAGES


def _numbers(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, path + (k,))
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _numbers(v, path)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_a_smoke_config_caps_every_size_and_keeps_models_attacks_and_figures(profile):
    for target in list_targets():
        full, smoke = load_config(target, profile), load_config(target, profile, smoke=True)
        assert smoke.profile == f"{profile}-smoke" and smoke.notes.startswith("SMOKE RUN")
        assert smoke.data_limit == DATA_LIMIT and smoke.n <= CAPS["n"]
        # What runs is the same: threat models, attacks, rows, groups, columns, figure kinds.
        assert [(s.name, s.threat, [(a.name, a.label, a.wrap) for a in s.attacks]) for s in smoke.suites] == \
            [(s.name, s.threat, [(a.name, a.label, a.wrap) for a in s.attacks]) for s in full.suites]
        assert [(r.label, r.kind, r.shield) for r in smoke.rows] == [(r.label, r.kind, r.shield) for r in full.rows]
        assert (smoke.groups, smoke.columns) == (full.groups, full.columns)
        assert [f["kind"] for f in smoke.figures] == [f["kind"] for f in full.figures]
        # Every training spec keeps its architecture and method and has every size capped,
        # including the sizes it leaves at their dataclass defaults.
        specs = [(smoke.classifiers[k], full.classifiers[k]) for k in full.classifiers]
        specs += [(smoke.shields[k], full.shields[k]) for k in full.shields]
        if full.adversarial_training:
            specs.append((smoke.adversarial_training, full.adversarial_training))
        for small, big in specs:
            for f in fields(big):
                a, b = getattr(small, f.name), getattr(big, f.name)
                if f.name.startswith(("query_", "surrogate_")) and getattr(big, "query_method", None) is None:
                    assert a == b, (target, f.name)  # unused query settings stay out of the keys
                elif f.name in CAPS and isinstance(b, (int, float)) and not isinstance(b, bool):
                    assert a == min(b, CAPS[f.name]), (target, f.name)
                elif f.name in ("train_limit", "calibration_n"):
                    assert a == min(b or TRAIN_IMAGES, TRAIN_IMAGES), (target, f.name)
                else:
                    assert a == b, (target, f.name)
        # Every size the suites and figures state is capped; nothing is raised.
        stated = [*[a.to_dict() for s in smoke.suites for a in s.attacks], *smoke.figures]
        originals = dict(_numbers([*[a.to_dict() for s in full.suites for a in s.attacks], *full.figures]))
        for path, value in _numbers(stated):
            if path[-1] in CAPS:
                assert value <= CAPS[path[-1]], (target, path, value)
            assert value <= max(originals.get(path, value), value)


def test_the_paper_profile_of_aaa_mnist_runs_end_to_end_as_a_smoke_run(tmp_path):
    """The paper protocol (PGD-40 training, 50 restarts, CW 1,000 steps, its figure) has no
    other test; this one runs every piece of it, on 64 images."""
    out = reproduce("aaa-mnist", "paper", tmp_path, progress=False, smoke=True)
    assert out == tmp_path / "aaa-mnist" / "paper-smoke"
    table = json.loads((out / "table.json").read_text())
    assert table["profile"] == "paper-smoke"
    assert "SMOKE RUN" in (out / "table.md").read_text()
    assert (out / "table3_reconstructions.png").stat().st_size > 0
    config = load_config("aaa-mnist", "paper", smoke=True)
    cells = [(r, c, s) for r in config.rows for g in config.groups for c in g.classifiers
             for s in config.suites if s.applies_to(r)]
    assert len(list((out / "records").glob("*.json"))) == len(cells)
    # Its artifacts stay under the smoke run's folder: the user's cache never sees them.
    assert sorted(p.suffix for p in (tmp_path / "artifacts").iterdir()) and all(
        p.parent == tmp_path / "artifacts" for p in (tmp_path / "artifacts").iterdir())
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(w["origin"] == "trained (cache)" for w in manifest["weights"].values())


def test_a_smoke_run_cannot_ship(tmp_path):
    result = CliRunner().invoke(main, ["reproduce", "demo", "--smoke", "--ship"])
    assert result.exit_code != 0 and "cannot --ship" in result.output
    with pytest.raises(ValueError, match="cannot ship"):
        reproduce("demo", "quick", tmp_path, smoke=True, ship=True)


def test_a_smoke_run_shrinks_an_audit_suites_budget_and_keeps_its_battery():
    from aeshield.eval.audit import get_budget
    from aeshield.experiments.smoke import AUDIT_CAPS

    full, smoke = load_config("demo", "quick"), load_config("demo", "quick", smoke=True)
    (big,), (small,) = ([s for s in c.suites if s.audit is not None] for c in (full, smoke))
    assert big.audit == "quick" and small.audit.name == "quick-smoke" and small.n <= CAPS["n"]
    for key, cap in AUDIT_CAPS.items():
        assert getattr(small.audit, key) == min(getattr(get_budget("quick"), key), cap), key
    # The same attacks join the battery; only their sizes shrink.
    assert small.audit.bpda_losses == get_budget("quick").bpda_losses
