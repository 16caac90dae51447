"""The experiments layer: typed YAML values, the artifact store, analyses without a runner,
and no import cycle inside ``aeshield.experiments``."""

import dataclasses
import ast
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from aeshield.experiments.config import from_dict, load_config, read_yaml
from aeshield.store import ArtifactStore

TINY_YAML = """
name: typed
title: typed values
dataset: mnist
n: 8
classifiers:
  C: {model: mnist-c, epochs: 1, lr: LR}
shields:
  s: {method: aaa, autoencoder: conv-ae-small, against: [C], lam: LAM, eps: 0.3}
suites:
  - {name: linf, threat: {norm: Linf, eps: 0.3}, attacks: [{name: pgd, params: {steps: 1}}]}
rows: [{label: natural}]
groups: [{label: g, classifiers: [C]}]
columns: [{label: clean, value: clean}]
"""


def _config(lam: str = "1e-2", lr: str = "0.001"):
    return from_dict(read_yaml(TINY_YAML.replace("LAM", lam).replace("LR", lr)), "quick")


def test_an_exponent_without_a_dot_loads_as_a_float():
    config = _config(lam="1e-2", lr="1E-3")
    assert config.shields["s"].lam == 0.01 and isinstance(config.shields["s"].lam, float)
    assert config.classifiers["C"].lr == 0.001
    assert read_yaml("a: 1e3\nb: '1e3'\nc: 12\nd: 0.5") == {"a": 1000.0, "b": "1e3", "c": 12, "d": 0.5}


def test_a_string_for_a_float_field_is_refused_naming_target_key_and_type():
    with pytest.raises(ValueError, match=r"typed: shields\.s\.lam: expected float, got 'a lot'"):
        _config(lam="'a lot'")
    with pytest.raises(ValueError, match=r"typed: classifiers\.C\.lr: expected float, got '1e-3'"):
        _config(lr="'1e-3'")  # quoted: a string on purpose


def test_other_mismatches_are_refused_and_an_int_for_a_float_keeps_its_hash():
    with pytest.raises(ValueError, match=r"typed: n: expected int, got 8.5"):
        from_dict({**read_yaml(TINY_YAML.replace("LAM", "0.01").replace("LR", "0.001")), "n": 8.5}, "quick")
    with pytest.raises(ValueError, match=r"shields\.s\.against: expected a list of str"):
        from_dict(read_yaml(TINY_YAML.replace("LAM", "0.01").replace("LR", "0.001")
                            .replace("against: [C]", "against: C")), "quick")
    # An int is a float: it stays an int, so specs written `lam: 1` hash as they always did.
    assert _config(lam="1").shields["s"].lam == 1 and type(_config(lam="1").shields["s"].lam) is int


def test_every_shipped_config_reads_the_same_with_the_typed_loader():
    import yaml

    from aeshield.experiments.config import config_dir, list_targets

    for target in list_targets():
        text = (config_dir() / f"{target}.yaml").read_text()
        assert read_yaml(text) == yaml.safe_load(text), target
        load_config(target, "quick")


def test_store_keys_paths_and_finds_the_shipped_copy_first(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr("aeshield.models.io.shipped_dir", lambda: shipped)
    store = ArtifactStore(tmp_path / "cache", data_hash="d" * 64)
    path, key = store.path("classifier", {"model": "x"})
    assert path == tmp_path / "cache" / f"classifier-{key}.safetensors"
    assert key == ArtifactStore(tmp_path / "other", "d" * 64).key("classifier", {"model": "x"})
    assert key != ArtifactStore(tmp_path / "cache", "e" * 64).key("classifier", {"model": "x"})
    assert store.find(path, key) is None
    model = nn.Linear(2, 2)
    store.save_weights(model, path, architecture="mnist-c", dataset="mnist")
    store.stamp(path, key)
    assert store.find(path, key) == path
    (shipped / "named.json").write_text(json.dumps({"spec_hash": key}))
    assert store.find(path, key) == shipped / "named.safetensors"
    assert ArtifactStore(tmp_path / "cache", "d" * 64, use_shipped=False).find(path, key) == path
    store.remember("C", model, path)
    assert store.loaded("C") is model and store.file_of("C") == path
    assert store.sources["C"]["origin"] == "trained (cache)" and len(store.weight_hashes(["C", "D"])["C"]) == 16


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports, at any depth of the file (lazy included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            name = f"{base}.{node.module}" if node.module else base
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
    return found


def test_the_analyses_and_the_runner_modules_form_no_import_cycle():
    root = Path(__import__("aeshield.experiments").experiments.__file__).parent
    ours = ["config", "smoke", "selection", "record_cache", "zoo", "parallel", "runner", "analyses"]
    modules = {}
    for path in list(root.glob("*.py")) + list((root / "analyses").glob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        name = ".".join(["aeshield", "experiments", *parts])
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        modules[name] = {m for m in _imports(path, package) if m.startswith("aeshield.experiments")}
    graph = {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()
             if m.count(".") >= 2 and m.split(".")[2] in ours}
    # Depth-first search for a cycle among the modules above.
    state: dict[str, int] = {}

    def visit(m, trail):
        state[m] = 1
        for d in graph.get(m, ()):
            assert state.get(d) != 1, f"import cycle: {' -> '.join(trail + [m, d])}"
            if d not in state:
                visit(d, trail + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_old_analysis_modules_still_import_with_a_deprecation_warning():
    import importlib
    import sys

    for name in ("puvae_analyses", "s2s_dbp_analyses", "corruption_analyses", "report"):
        sys.modules.pop(f"aeshield.experiments.{name}", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(f"aeshield.experiments.{name}")
        assert any(issubclass(w.category, DeprecationWarning) for w in caught), name
        assert all(callable(getattr(module, n)) or isinstance(getattr(module, n), (str, tuple))
                   for n in module.__all__)


def test_an_analysis_runs_from_its_inputs_alone_and_returns_a_typed_result(tmp_path):
    from aeshield.experiments.analyses import AnalysisContext, get_analysis
    from aeshield.experiments.analyses.figures import figure6  # noqa: F401 (the registry's entry)
    from aeshield.experiments.analyses.tables import PairedDifference, table_cells
    from aeshield.experiments.record_cache import RecordCache

    assert get_analysis("puvae-sweep").__module__.endswith("analyses.curves")
    with pytest.raises(ValueError, match="unknown figure kind"):
        get_analysis("nope")
    config = _config()
    assert table_cells(config, []) == []
    assert PairedDifference(0.1, (0.0, 0.2), 10).format() == "+10.0 [+0.0, +20.0]"
    records = RecordCache(tmp_path / "records", "h", {"target": "t"})
    calls = []
    first = records.get("r", {"a": 1}, lambda: calls.append(1) or {"x": torch.tensor(1.0).item()})
    again = records.get("r", {"a": 1}, lambda: calls.append(1) or {"x": 2.0})
    assert first == again and first["x"] == 1.0 and first["target"] == "t" and calls == [1]
    assert records.get("r", {"a": 2}, lambda: {"x": 2.0})["x"] == 2.0
    assert AnalysisContext.__dataclass_fields__.keys() >= {"config", "data", "zoo", "records", "out"}


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def test_a_spec_field_that_feeds_a_defense_config_agrees_with_it_in_type_and_default():
    """YAML keys are validated against the defense configs: a spec field named like a config
    field (which ``from_spec`` copies into it) has the config's type and default, so a
    hyperparameter means one thing whether it is set in YAML, on the CLI or in Python."""
    import typing

    from aeshield.defenses import aaa, dbp, magnet, puvae
    from aeshield.defenses.adversarial_training import AdversarialTrainingConfig
    from aeshield.experiments.config import AdvTrainSpec
    from aeshield.experiments.methods import get_method

    pairs = [(get_method("aaa").spec, aaa.AAAConfig), (get_method("puvae").spec, puvae.PuVAEConfig),
             (get_method("puvae").spec, puvae.PuVAETrainConfig), (get_method("magnet").spec, magnet.MagNetConfig),
             (get_method("magnet").spec, magnet.MagNetTrainConfig), (get_method("dbp").spec, dbp.DBPShieldConfig),
             (get_method("dbp").spec, dbp.DBPConfig), (AdvTrainSpec, AdversarialTrainingConfig)]
    shared = 0
    for spec, config in pairs:
        spec_fields = {f.name: f for f in dataclasses.fields(spec)}
        spec_types, config_types = typing.get_type_hints(spec), typing.get_type_hints(config)
        for f in dataclasses.fields(config):
            if f.name in spec_fields and f.name != "seed":  # a spec's seed overrides the target's
                shared += 1
                assert spec_types[f.name] == config_types[f.name], (spec.__name__, f.name)
                assert _default(spec_fields[f.name]) == _default(f), (spec.__name__, f.name)
    assert shared >= 30


def test_every_key_a_shipped_target_hashes_is_the_one_it_had_before_fields_were_added():
    """Artifact keys, records' model specs and shield cards of every target and profile (smoke
    included) are those computed at 87088e0, before the training schedules' fields existed: a
    field added at its default must not orphan a trained artifact or a committed record."""
    from config_keys import keys

    expected = json.loads((Path(__file__).parent / "fixtures" / "config_keys.json").read_text())
    got = keys()
    # A target added since has keys of its own; every key the fixture holds must still exist.
    targets = {k.split("/")[0] for k in expected}
    assert {k for k in got if k.split("/")[0] in targets} == set(expected)
    changed = sorted(k for k in expected if got[k] != expected[k])
    assert not changed, changed[:10]


def test_a_suite_limited_to_rows_evaluates_only_those_and_refuses_an_unknown_label():
    data = read_yaml(TINY_YAML.replace("LAM", "0.01").replace("LR", "0.001"))
    data["rows"] = [{"label": "natural"}, {"label": "shielded", "kind": "shield", "shield": "s"}]
    data["suites"].append({"name": "audit", "threat": {"norm": "Linf", "eps": 0.3}, "audit": "quick",
                           "rows": ["shielded"]})
    config = from_dict(data, "quick")
    audit = next(s for s in config.suites if s.name == "audit")
    natural, shielded = config.rows
    assert audit.applies_to(shielded, "C") and not audit.applies_to(natural, "C")
    assert config.suites[0].applies_to(natural, "C")  # no `rows`: every row
    data["suites"][-1]["rows"] = ["shieldd"]
    with pytest.raises(ValueError, match=r"suite 'audit' names unknown rows \['shieldd'\]"):
        from_dict(data, "quick")
