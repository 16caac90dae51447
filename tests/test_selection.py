"""Choosing a shield on validation images: the rule, the config checks, and the runner's use."""

import json
import logging

import pytest

from aeshield.eval import EvalRecord
from aeshield.experiments import Runner, load_config
from aeshield.experiments.config import from_dict
from aeshield.experiments.selection import choose

from test_runner import TINY


def test_choose_takes_the_most_robust_candidate_within_the_allowed_clean_drop():
    candidates = {"a": {"clean": 0.90, "robust": 0.50}, "b": {"clean": 0.86, "robust": 0.60},
                  "c": {"clean": 0.80, "robust": 0.70}}
    # c is the most robust but costs 12 points; b costs 6, exactly the bound.
    assert choose(candidates, undefended_clean=0.92, max_clean_drop=0.06) == "b"
    assert choose(candidates, undefended_clean=0.92, max_clean_drop=0.12) == "c"
    assert choose(candidates, undefended_clean=0.92, max_clean_drop=0.05) == "a"


def test_choose_falls_back_to_the_cleanest_when_no_candidate_qualifies():
    candidates = {"a": {"clean": 0.70, "robust": 0.50}, "b": {"clean": 0.75, "robust": 0.10}}
    assert choose(candidates, undefended_clean=0.99, max_clean_drop=0.06) == "b"


def test_choose_breaks_a_robustness_tie_by_clean_accuracy():
    candidates = {"a": {"clean": 0.88, "robust": 0.5}, "b": {"clean": 0.90, "robust": 0.5}}
    assert choose(candidates, undefended_clean=0.9, max_clean_drop=0.06) == "b"


def _with_selection(drop: float = 0.5) -> dict:
    config = json.loads(json.dumps(TINY))
    config["shields"]["s2"] = {**config["shields"]["s"], "loss": "mse"}
    config["selections"] = {"pick": {
        "among": ["s", "s2"], "classifier": "C", "threat": {"norm": "Linf", "eps": 0.3},
        "attack": {"name": "pgd", "params": {"steps": 2, "step_size": 0.1}},
        "max_clean_drop": drop, "n": 30}}
    config["rows"] = [{"label": "natural", "kind": "natural"},
                      {"label": "chosen", "kind": "shield", "select": "pick"}]
    return config


def test_config_rejects_a_select_row_that_names_no_selection_or_also_names_a_shield():
    bad = _with_selection()
    bad["rows"][1]["select"] = "nope"
    with pytest.raises(ValueError, match="unknown selection"):
        from_dict(bad, "quick")
    bad = _with_selection()
    bad["rows"][1]["shield"] = "s"
    with pytest.raises(ValueError, match="not with it"):
        from_dict(bad, "quick")
    bad = _with_selection()
    bad["selections"]["pick"]["among"] = ["s", "ghost"]
    with pytest.raises(ValueError, match="unknown shields"):
        from_dict(bad, "quick")
    bad = _with_selection(drop=6)
    with pytest.raises(ValueError, match="fraction"):
        from_dict(bad, "quick")


def test_the_workers_train_a_selections_candidates_before_it_is_resolved(tmp_path, monkeypatch):
    from aeshield.experiments.parallel import plan

    runner = Runner(from_dict(_with_selection(), "quick"), tmp_path / "out",
                    artifacts=tmp_path / "artifacts", use_shipped=False, progress=False)
    tasks = {t.key: t for t in plan(runner, before_selections=True)}
    assert set(tasks) == {"classifier:C", "shield:s", "shield:s2"}  # training only, no cell
    assert tasks["shield:s2"].deps == ("classifier:C",)
    # Nothing before the selections when none of them waits for training ...
    plain = Runner(from_dict(json.loads(json.dumps(TINY)), "quick"), tmp_path / "out2",
                   artifacts=tmp_path / "artifacts", use_shipped=False, progress=False)
    assert plan(plain, before_selections=True) == []
    assert "shield:s" in {t.key for t in plan(plain)}
    # ... or when every candidate and classifier is already trained, or only one is missing
    # (the runner's own process trains it on all its threads).
    monkeypatch.setattr(runner.store, "find", lambda *args: tmp_path)
    assert plan(runner, before_selections=True) == []
    missing = runner.shield_artifact("s2")[0]
    monkeypatch.setattr(runner.store, "find", lambda path, *args: None if path == missing else tmp_path)
    assert plan(runner, before_selections=True) == []
    assert [t.key for t in plan(runner)][0] == "shield:s2"


def test_a_select_row_is_measured_on_the_shield_its_validation_records_choose(tmp_path, caplog):
    config = from_dict(_with_selection(), "quick")
    runner = Runner(config, tmp_path / "out", artifacts=tmp_path / "artifacts", use_shipped=False,
                    progress=False)
    with caplog.at_level(logging.INFO, logger="aeshield.experiments.parallel"):
        out = runner.run(jobs=2)
    # The workers' first batch is the training the selection waits for (C, s, s2), not cells.
    batches = [r.getMessage() for r in caplog.records if "worker process(es)" in r.getMessage()]
    assert batches[0].startswith("3 task(s) on 2 worker") and len(batches) == 2
    records = out / "records"
    val = runner.val.subset(30, seed=config.selections["pick"].seed)
    # ... which no shield trained on.
    assert not set(val.indices.tolist()) & set(runner.train.indices.tolist())
    measured = {}
    for name in ("s", "s2"):
        rec = json.loads((records / f"selection-pick-{name}.json").read_text())
        # Validation images, never the test images the table reports.
        assert rec["spec"]["split"] == "val" and rec["clean"]["n"] == len(val) == 30
        measured[name] = {"clean": rec["clean"]["accuracy"], "robust": rec["robust"]["accuracy"]}
    reference = json.loads((records / "selection-pick-undefended.json").read_text())
    expected = choose(measured, reference["clean"]["accuracy"], 0.5)
    row = next(r for r in runner.config.rows if r.label == "chosen")
    assert row.shield == expected
    cell = EvalRecord.load(records / "chosen__C__linf.json")
    assert cell.extra["weights"] == runner.weight_hashes([f"shield-{expected}", "C"])
    assert "| yes |" in (out / "selection_pick.md").read_text()


def test_aaa_fmnist_headline_row_selects_lambda_on_validation_images():
    config = load_config("aaa-fmnist", "quick")
    sel = config.selections["lambda"]
    assert sel.among == ("xent+mse", "xent+mse-lam0.15", "xent+mse-lam0.4", "xent+mse-lam0.15-2x",
                         "xent+mse-lam0.15-4x")
    assert sel.max_clean_drop == pytest.approx(0.06)
    assert [r.select for r in config.rows].count("lambda") == 1


def test_a_selected_row_that_a_listed_row_already_shows_reuses_its_records(tmp_path):
    data = _with_selection()
    data["rows"] += [{"label": "listed s", "kind": "shield", "shield": "s"},
                     {"label": "listed s2", "kind": "shield", "shield": "s2"}]
    runner = Runner(from_dict(data, "quick"), tmp_path / "out", artifacts=tmp_path / "artifacts",
                    use_shipped=False, progress=False)
    out = runner.run()
    source = runner.row_aliases["chosen"]
    assert source == f"listed {next(r.shield for r in runner.config.rows if r.label == 'chosen')}"
    assert not list((out / "records").glob("chosen__*.json"))  # nothing attacked twice
    cells = json.loads((out / "table.json").read_text())["cells"]
    strip = [{k: v for k, v in c.items() if k != "row"} for c in cells]
    assert [s for s, c in zip(strip, cells) if c["row"] == "chosen"] == \
        [s for s, c in zip(strip, cells) if c["row"] == source]
    assert f'row "chosen" is row "{source}"' in (out / "table.md").read_text()


def test_a_ship_entry_that_selects_ships_the_chosen_shield_with_the_selection_in_its_card(
        tmp_path, monkeypatch):
    from aeshield.defenses.cards import read_card
    from aeshield.errors import ConfigError
    from aeshield.models.io import read_sidecar

    bad = _with_selection()
    bad["ship"] = {"x": {"select": "nope"}}
    with pytest.raises(ConfigError, match="unknown selection 'nope'"):
        from_dict(bad, "quick")
    data = _with_selection()
    data["ship"] = {"tiny-s": {"shield": "s"}, "tiny-chosen": {"select": "pick"}}
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr("aeshield.experiments.runner.shipped_dir", lambda: shipped)
    monkeypatch.setattr("aeshield.models.io.shipped_dir", lambda: shipped)
    runner = Runner(from_dict(data, "quick"), tmp_path / "out", artifacts=tmp_path / "artifacts",
                    use_shipped=False, progress=False)
    runner.run()
    runner.ship()
    chosen = next(r.shield for r in runner.config.rows if r.select == "pick")
    card = read_card(read_sidecar(shipped / "tiny-chosen.safetensors"))
    assert card.selection["name"] == "pick" and card.selection["chosen"] == chosen
    assert card.selection["report"] == "selection_pick.md" and "30 validation images" in card.selection["rule"]
    assert read_card(read_sidecar(shipped / "tiny-s.safetensors")).selection is None
    if chosen == "s":  # the same shield under two names: the same bytes
        assert (shipped / "tiny-s.safetensors").read_bytes() == (shipped / "tiny-chosen.safetensors").read_bytes()
