"""The one runner: trains what is missing, caches it, evaluates, renders from records."""

import json

import pytest
import yaml

from aeshield.eval import EvalRecord
from aeshield.eval.harness import AttackSpec
from aeshield.experiments import Runner, list_targets, load_config
from aeshield.experiments.config import from_dict

TINY = {
    "name": "tiny", "title": "tiny runner check", "dataset": "mnist", "seed": 0, "n": 40,
    "batch_size": 40,
    "classifiers": {"C": {"model": "mnist-c", "epochs": 1, "train_limit": 600}},
    "adversarial_training": {"eps": 0.3, "step_size": 0.1, "attack_steps": 1, "epochs": 1,
                             "train_limit": 200, "val_n": 20},
    "shields": {"s": {"method": "aaa", "autoencoder": "conv-ae-small", "against": ["C"],
                      "attack_steps": 1, "step_size": 0.1, "epochs": 1, "train_limit": 200,
                      "warmup_steps": 2, "val_n": 20, "batch_size": 50}},
    "suites": [{"name": "linf", "threat": {"norm": "Linf", "eps": 0.3},
                "attacks": [{"name": "pgd", "label": "PGD-3", "params": {"steps": 3, "step_size": 0.1}}]}],
    "rows": [{"label": "natural", "kind": "natural"},
             {"label": "AT", "kind": "adversarial-training"},
             {"label": "shield", "kind": "shield", "shield": "s"}],
    "groups": [{"label": "g", "classifiers": ["C"]}],
    "columns": [{"label": "clean", "value": "clean"}, {"label": "PGD", "suites": ["linf"]}],
}


@pytest.fixture
def tiny_runner(tmp_path):
    config = from_dict(json.loads(json.dumps(TINY)), "quick")
    return lambda: Runner(config, tmp_path / "out", artifacts=tmp_path / "artifacts",
                          use_shipped=False, progress=False)


def test_runner_trains_caches_and_renders_from_records(tiny_runner, tmp_path):
    out = tiny_runner().run()
    table = json.loads((out / "table.json").read_text())
    records = {p.name: EvalRecord.load(p) for p in (out / "records").glob("*.json")}
    assert len(records) == 3
    shield_record = records["shield__C__linf.json"]
    cell = [c for c in table["cells"] if c["row"] == "shield" and c["column"] == "PGD"][0]
    assert cell["correct"] == shield_record.robust.correct and cell["n"] == 40
    assert "PGD-3" in (out / "table.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["name"] == "tiny" and "versions" in manifest
    trained = {k for k in manifest["timings_seconds"] if k.startswith(("train", "adversarial"))}
    assert trained == {"train classifier C", "adversarial training C", "train shield s"}

    again = tiny_runner()
    again.run()
    assert not any(k.startswith(("train", "adversarial", "eval")) for k in again.timings)
    # A re-render keeps the seconds of the run that measured what it reused.
    kept = json.loads((out / "manifest.json").read_text())["measured_seconds"]
    assert trained <= set(kept) and kept == {k: v for k, v in manifest["timings_seconds"].items()
                                             if k != "total"}


def test_shipped_targets_resolve_both_profiles():
    assert {"aaa-mnist", "aaa-fmnist", "demo"} <= set(list_targets())
    for target in list_targets():
        for profile in ("quick", "paper"):
            config = load_config(target, profile)
            assert config.profile == profile and config.suites and config.rows


def test_config_rejects_unknown_keys_and_names(tmp_path):
    bad = json.loads(json.dumps(TINY))
    bad["classifiers"]["C"]["epochz"] = 3
    with pytest.raises(ValueError, match="unknown keys"):
        from_dict(bad, "quick")
    bad = json.loads(json.dumps(TINY))
    bad["rows"][2]["shield"] = "nope"
    with pytest.raises(ValueError, match="unknown shield"):
        from_dict(bad, "quick")
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**TINY, "profiles": {"quick": {}}}))
    with pytest.raises(ValueError, match="no profile 'paper'"):
        load_config(path, "paper")


def test_config_rejects_training_eps_that_no_linf_suite_attacks_with():
    bad = json.loads(json.dumps(TINY))
    bad["suites"][0]["threat"]["eps"] = 0.2  # shield and AT keep the 0.3 they train at
    with pytest.raises(ValueError, match="trains at L-inf eps 0.3"):
        from_dict(bad, "quick")
    bad["shields"]["s"]["eps"] = 0.2
    bad["adversarial_training"]["eps"] = 0.2
    assert from_dict(bad, "quick").shields["s"].eps == 0.2


def test_a_record_measured_on_other_weights_is_re_evaluated(tiny_runner, tmp_path):
    tiny_runner().run()
    # Same spec, other weights (as when a classifier is retrained under another torch build):
    # the natural and shield rows use C and must be measured again; the AT row need not.
    from aeshield.models.io import load_weights, save_weights

    path = next((tmp_path / "artifacts").glob("classifier-*.safetensors"))
    meta = json.loads(path.with_suffix(".json").read_text())
    model, _ = load_weights(path)
    with __import__("torch").no_grad():
        next(model.parameters()).mul_(0.5)
    save_weights(model, path, **{k: v for k, v in meta.items()
                                 if k not in ("format", "storage_dtype", "versions")})
    again = tiny_runner()
    again.run()
    evaluated = {k for k in again.timings if k.startswith("eval")}
    assert evaluated == {"eval natural / C / linf", "eval shield / C / linf"}
    record = EvalRecord.load(tmp_path / "out" / "tiny" / "quick" / "records" / "natural__C__linf.json")
    assert record.extra["weights"] == {"C": again.sources["C"]["sha256_16"]}


def test_shipped_weights_win_over_the_cached_originals_of_the_same_spec(tmp_path, monkeypatch):
    # A clean checkout has only the shipped (float16) files; a maintainer's cache also has the
    # float32 originals. Both must evaluate the shipped bytes, or the committed records are
    # stale on every other machine.
    config = from_dict(json.loads(json.dumps(TINY)), "quick")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr("aeshield.experiments.runner.shipped_dir", lambda: shipped)
    monkeypatch.setattr("aeshield.models.io.shipped_dir", lambda: shipped)
    trained = Runner(config, tmp_path / "out", artifacts=tmp_path / "artifacts", use_shipped=True,
                     progress=False)
    trained.classifier("C")
    assert trained.sources["C"]["origin"] == "trained (cache)"
    config.raw["ship"] = {"tiny-c": {"classifier": "C"}}
    trained.ship()
    fresh = Runner(config, tmp_path / "out", artifacts=tmp_path / "artifacts", use_shipped=True,
                   progress=False)
    fresh.classifier("C")
    assert fresh.sources["C"]["origin"] == "shipped" and fresh.sources["C"]["file"] == "tiny-c.safetensors"
    retrain = Runner(config, tmp_path / "out", artifacts=tmp_path / "artifacts", use_shipped=False,
                     progress=False)
    retrain.classifier("C")
    assert retrain.sources["C"]["origin"] == "trained (cache)"


def test_parallel_run_trains_each_artifact_once_and_writes_the_records_a_sequential_run_reuses(
        tmp_path):
    config = from_dict(json.loads(json.dumps(TINY)), "quick")

    def runner(out):
        return Runner(config, tmp_path / out, artifacts=tmp_path / "artifacts", use_shipped=False,
                      progress=False)

    parallel = runner("par")
    parallel.run(jobs=2)
    trained = sorted(k for k in parallel.timings if k.startswith(("train", "adversarial")))
    assert trained == ["adversarial training C", "train classifier C", "train shield s"]
    assert len([k for k in parallel.timings if k.startswith("eval")]) == 3
    # The workers' records are the ones the one-process runner looks for: nothing to redo.
    again = runner("par")
    again.run()
    assert not any(k.startswith(("train", "adversarial", "eval")) for k in again.timings)
    # And they hold what a one-process evaluation of the same weights measures.
    sequential = runner("seq")
    sequential.run()
    cells = [json.loads((tmp_path / out / "tiny" / "quick" / "table.json").read_text())["cells"]
             for out in ("par", "seq")]
    assert cells[0] == cells[1]


def test_parallel_plan_waits_for_the_artifacts_each_task_needs(tiny_runner):
    from aeshield.experiments.parallel import plan

    tasks = {t.key: t for t in plan(tiny_runner())}
    assert tasks["adversarial-training:C"].deps == ("classifier:C",)
    assert tasks["shield:s"].deps == ("classifier:C",)
    assert tasks["cell:0/C/linf"].deps == ("classifier:C",)
    assert tasks["cell:1/C/linf"].deps == ("adversarial-training:C",)
    assert set(tasks["cell:2/C/linf"].deps) == {"shield:s", "classifier:C"}


def test_parallel_plan_lets_a_shield_wait_only_for_the_classifiers_it_is_trained_against(tmp_path):
    from aeshield.experiments.parallel import plan

    data = json.loads(json.dumps(TINY))
    data["classifiers"]["T"] = {"model": "mnist-c", "epochs": 1, "train_limit": 300}  # transfer
    data["groups"] = [{"label": "native", "classifiers": ["C"]},
                      {"label": "transfer", "classifiers": ["T"]}]
    config = from_dict(data, "quick")
    runner = Runner(config, tmp_path / "out", artifacts=tmp_path / "artifacts", use_shipped=False,
                    progress=False)
    tasks = {t.key: t for t in plan(runner)}
    assert tasks["shield:s"].deps == ("classifier:C",)  # not the transfer classifier T
    assert set(tasks["cell:2/C/linf"].deps) == {"shield:s", "classifier:C"}
    assert set(tasks["cell:2/T/linf"].deps) == {"shield:s", "classifier:T"}
    assert tasks["adversarial-training:T"].deps == ("classifier:T",)


def test_a_row_measured_on_fewer_images_is_labelled_and_keeps_the_other_rows_keys(tmp_path):
    from aeshield.experiments.config import RowSpec, spec_dict

    assert spec_dict(RowSpec("x", "natural")) == {"label": "x", "kind": "natural", "shield": None}
    data = json.loads(json.dumps(TINY))
    data["rows"][2]["n"] = 20
    data["columns"].append({"label": "gain", "value": "difference", "versus": "natural"})
    config = from_dict(data, "quick")
    out = Runner(config, tmp_path / "out", artifacts=tmp_path / "artifacts", use_shipped=False,
                 progress=False).run()
    records = {p.name: EvalRecord.load(p) for p in (out / "records").glob("*.json")}
    assert records["shield__C__linf.json"].n == 20 and records["natural__C__linf.json"].n == 40
    cells = json.loads((out / "table.json").read_text())["cells"]
    assert {c["n"] for c in cells if c["row"] == "shield"} == {20}
    # Paired with the first 20 of the natural row's 40: the same images.
    gain = next(c for c in cells if c["row"] == "shield" and c["column"] == "gain")
    shield, natural = records["shield__C__linf.json"].flags(), records["natural__C__linf.json"].flags()[:20]
    assert gain["accuracy"] == pytest.approx(float(shield.float().mean() - natural.float().mean()))
    assert "shield: n = 20" in (out / "table.md").read_text()



def test_a_suite_without_attacks_measures_clean_accuracy_on_its_own_number_of_images(tmp_path):
    data = json.loads(json.dumps(TINY))
    data["suites"].append({"name": "clean-all", "threat": {"norm": "Linf", "eps": 0.3},
                           "attacks": [], "n": 100})
    data["columns"].insert(1, {"label": "clean (100)", "value": "clean", "suites": ["clean-all"]})
    data["columns"].insert(2, {"label": "cost", "value": "difference", "versus": "natural",
                               "suites": ["clean-all"]})
    runner = Runner(from_dict(data, "quick"), tmp_path / "out", artifacts=tmp_path / "artifacts",
                    use_shipped=False, progress=False)
    out = runner.run()
    records = {p.name: EvalRecord.load(p) for p in (out / "records").glob("*.json")}
    whole = records["natural__C__clean-all.json"]
    assert whole.n == 100 and records["natural__C__linf.json"].n == 40 and not whole.attacks
    # The first 40 of the 100 are the attacked subset: the same images, the same predictions.
    first = runner.test_subset(100)
    assert first.labels[:40].tolist() == runner.test_subset(40).labels.tolist()
    cells = json.loads((out / "table.json").read_text())["cells"]
    clean100 = next(c for c in cells if c["row"] == "natural" and c["column"] == "clean (100)")
    assert clean100["n"] == 100 and clean100["correct"] == whole.clean.correct
    # The cost column: the shield row's clean accuracy minus the natural row's, same images.
    shield100 = EvalRecord.load(out / "records" / "shield__C__clean-all.json").clean
    cost = next(c for c in cells if c["row"] == "shield" and c["column"] == "cost")
    assert cost["accuracy"] == pytest.approx(shield100.value - whole.clean.value)
    assert cost["ci95_low"] <= cost["accuracy"] <= cost["ci95_high"] and cost["correct"] is None
    assert not [c for c in cells if c["row"] == "natural" and c["column"] == "cost"]
    assert "no attack, clean accuracy on n = 100" in (out / "table.md").read_text()

def test_parallel_plan_puts_shielded_cells_first_when_nothing_was_measured_yet(tiny_runner):
    from aeshield.experiments.parallel import plan

    cells = sorted((t for t in plan(tiny_runner()) if t.kind == "cell"), key=lambda t: -t.cost)
    assert [t.name.split("/")[0] for t in cells] == ["2", "1", "0"]  # shield, AT, natural


def _attack_lists(node):
    """Every list of attacks in a target's suites and figure specs, as (name, params, wrap)."""
    if isinstance(node, (list, tuple)):
        items = [(a.name, a.params, a.wrap) if isinstance(a, AttackSpec) else
                 (a.get("name"), a.get("params", {}), a.get("wrap")) if isinstance(a, dict) else None
                 for a in node]
        if items and all(i is not None and i[0] for i in items):
            yield items
        for a in node:
            yield from _attack_lists(a)
    elif isinstance(node, dict):
        for v in node.values():
            yield from _attack_lists(v)


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_every_detector_aware_pgd_of_every_target_runs_next_to_orthogonal_pgd(profile):
    """Neither detector-aware attack dominates (MagNet: orthogonal PGD fools twice as many;
    PuVAE's RMSE detector: the weighted sum does better), so a cascade with one has both, at
    the same steps and wrap."""
    checked = 0
    for target in list_targets():
        cfg = load_config(target, profile)
        for attacks in _attack_lists([[*s.attacks] for s in cfg.suites] + list(cfg.figures)):
            for name, params, wrap in attacks:
                if name != "detector-pgd":
                    continue
                checked += 1
                partners = [p for n, p, w in attacks if n == "orthogonal-pgd" and w == wrap]
                assert any(p.get("steps") == params.get("steps") for p in partners), (
                    f"{target} ({profile}): detector-pgd {params} (wrap {wrap}) has no orthogonal-pgd "
                    "with the same steps in its cascade")
    assert checked >= 10


def test_config_rejects_a_difference_column_without_a_known_row_to_compare_with():
    for column, message in (({"label": "d", "value": "difference"}, "goes with"),
                            ({"label": "d", "value": "clean", "versus": "natural"}, "goes with"),
                            ({"label": "d", "value": "difference", "versus": "ghost"}, "unknown row"),
                            ({"label": "d", "value": "difference", "versus": "natural", "after": "PGD-2"},
                             "keeps only counts"),
                            ({"label": "d", "value": "accuracy"}, "must be clean")):
        data = json.loads(json.dumps(TINY))
        data["columns"].append(column)
        with pytest.raises(ValueError, match=message):
            from_dict(data, "quick")


# ---- audit suites: the audit's battery for each pipeline, as a table column ----------------

# A tiny budget whose first attack is exactly the PGD suite's below (loss, steps, step, restarts).
TINY_BUDGET = dict(pgd_steps=3, pgd_restarts=1, apgd_iters=2, square_queries=10, cw_steps=2,
                   adaptive_steps=2, eot_samples=2)


def _audit_config(budget=None):
    from dataclasses import replace

    from aeshield.eval.audit import step_size, with_budget

    data = json.loads(json.dumps(TINY))
    data.pop("adversarial_training")
    data["rows"] = [r for r in data["rows"] if r["kind"] != "adversarial-training"]
    pgd = {"loss": "ce", "steps": 3, "step_size": step_size(0.3, 3, 2.5), "restarts": 1}
    data["suites"] = [{"name": "linf", "threat": {"norm": "Linf", "eps": 0.3},
                       "attacks": [{"name": "pgd", "label": "PGD-3", "params": pgd}]},
                      {"name": "audit", "threat": {"norm": "Linf", "eps": 0.3}, "audit": "quick"}]
    data["columns"].append({"label": "audit worst case", "suites": ["audit"]})
    config = from_dict(data, "quick")
    budget = budget or with_budget("quick", **TINY_BUDGET)
    return replace(config, suites=(config.suites[0], replace(config.suites[1], audit=budget))), budget


def test_config_checks_audit_suites():
    from aeshield.errors import ConfigError

    data = json.loads(json.dumps(TINY))
    data["suites"].append({"name": "audit", "threat": {"norm": "Linf", "eps": 0.3}, "audit": "quick"})
    suite = from_dict(data, "quick").suites[-1]
    assert suite.audit == "quick" and suite.attacks == ()
    data["suites"][-1]["attacks"] = [{"name": "pgd"}]
    with pytest.raises(ConfigError, match="lists no `attacks`"):
        from_dict(data, "quick")
    data["suites"][-1] = {"name": "audit", "threat": {"norm": "Linf", "eps": 0.3}, "audit": "quik"}
    with pytest.raises(ConfigError, match="unknown audit budget 'quik'; budgets: quick, standard, paper"):
        from_dict(data, "quick")
    data["suites"][-1] = {"name": "audit", "threat": {"norm": "Linf", "eps": 0.3}}
    with pytest.raises(ConfigError, match="needs `attacks`"):
        from_dict(data, "quick")


def test_an_audit_suite_runs_the_audits_battery_and_is_never_better_than_its_pgd(tmp_path):
    from aeshield.eval.audit import build_battery

    config, budget = _audit_config()
    runner = Runner(config, tmp_path / "out", artifacts=tmp_path / "artifacts", use_shipped=False,
                    progress=False)
    out = runner.run()
    records = {p.name: EvalRecord.load(p) for p in (out / "records").glob("*.json")}
    for row in config.rows:
        model, _ = runner.pipeline(row, "C")
        battery = build_battery(model, config.suites[1].threat, budget, random=False)
        audit, pgd = records[f"{row.label}__C__audit.json"], records[f"{row.label}__C__linf.json"]
        assert [a.name for a in audit.attacks] == [a.title for a in battery]
        assert audit.extra["audit"] == {"budget": "quick", "random": False}
        # The battery's first attack is the PGD suite's, seeded alike: the cascade can only
        # fool more, example by example.
        assert audit.attacks[0].accuracy_after.correct == pgd.robust.correct
        assert not (audit.flags() & ~pgd.flags()).any()
        assert audit.robust.correct <= pgd.robust.correct
    shielded = [a.name for a in records["shield__C__audit.json"].attacks]
    assert {"bpda-pgd-ce", "transfer-classifier"} <= set(shielded)
    table = (out / "table.md").read_text()
    assert "the audit's quick battery" in table and "on n = 40 test images" in table
    assert "shield: " + ", ".join(shielded) in table
    suites = json.loads((out / "table.json").read_text())["suites"]
    assert suites[1]["audit"]["pgd_steps"] == 3 and suites[1]["n"] == 40
    # A change of budget changes the battery, so the key: the cell is measured again.
    again = Runner(_audit_config(budget.__class__(**{**budget.to_dict(), "pgd_steps": 4}))[0],
                   tmp_path / "out", artifacts=tmp_path / "artifacts", use_shipped=False, progress=False)
    again.run()
    assert sorted(k for k in again.timings if k.startswith("eval")) == [
        "eval natural / C / audit", "eval shield / C / audit"]


def test_the_audit_field_leaves_the_keys_of_the_committed_demo_pgd_records_unchanged(tmp_path):
    from pathlib import Path

    from aeshield.experiments.config import SuiteSpec, spec_dict
    from aeshield.experiments.runner import record_spec
    from aeshield.experiments.zoo import ModelZoo
    from aeshield.records import config_hash
    from aeshield.store import ArtifactStore
    from aeshield.threat import ThreatModel

    assert "audit" not in spec_dict(SuiteSpec("s", ThreatModel("Linf", 0.3), ()))
    config = load_config("demo", "quick")
    zoo = ModelZoo(config, None, ArtifactStore(tmp_path, "d" * 64))
    suite = next(s for s in config.suites if s.name == "linf")
    records = sorted((Path(__file__).parents[1] / "docs/results/demo/quick/records").glob("*__linf.json"))
    assert len(records) == 6
    for path in records:
        record = EvalRecord.load(path)
        row = next(r for r in config.rows if r.label == record.extra["row"])
        classifier = path.name.split("__")[1]
        spec = record_spec(config, zoo, row, classifier, suite, list(suite.attacks))
        assert config_hash(spec) == record.extra["spec_hash"], path.name
