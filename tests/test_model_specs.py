"""Classifier specs (models/specs.py) and exported programs (models/exported.py): each form
loads the model it names, and each way of getting one wrong is one line saying what to do."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from aeshield.errors import ConfigError, WeightsError
from aeshield.models.exported import load_exported, save_exported
from aeshield.models.specs import (Normalized, load_classifier_spec, parse_normalize, probe_num_classes,
                                   state_dict_sha256)

USER_MODULE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, classes))

    def forward(self, x):
        return self.net(x)


def tiny():
    torch.manual_seed(0)
    return Tiny()


def tiny12():
    torch.manual_seed(1)
    return Tiny(12)


def not_a_module():
    return 3


def broken():
    raise RuntimeError("boom")


VALUE = 5
INSTANCE = Tiny()
'''


@pytest.fixture()
def user(tmp_path):
    (tmp_path / "specsmod_user.py").write_text(USER_MODULE)
    yield tmp_path
    sys.modules.pop("specsmod_user", None)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_a_file_factory_loads_frozen_in_eval_mode(user):
    model, info = load_classifier_spec(f"{user}/specsmod_user.py:tiny")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert info.kind == "classifier" and info.dataset is None and info.input_shape is None
    assert info.num_classes is None and info.weights_sha256 == state_dict_sha256(model)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_a_module_factory_imports_from_the_working_directory(user, monkeypatch):
    monkeypatch.chdir(user)
    model, _ = load_classifier_spec("specsmod_user:tiny12")
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 12)
    assert str(user) not in sys.path  # the working directory was on the path only for the import


def test_weights_after_the_factory_are_loaded_strictly(user):
    source, _ = load_classifier_spec(f"{user}/specsmod_user.py:tiny12")
    trained = {k: torch.randn_like(v) for k, v in source.state_dict().items()}
    save_file(trained, user / "w.safetensors")
    model, info = load_classifier_spec(f"{user}/specsmod_user.py:tiny12={user}/w.safetensors")
    assert torch.equal(model.state_dict()["net.1.weight"], trained["net.1.weight"])
    assert info.weights_sha256 == hashlib.sha256((user / "w.safetensors").read_bytes()).hexdigest()
    torch.save(trained, user / "w.pt")  # a plain state_dict, read with weights_only=True
    model, _ = load_classifier_spec(f"{user}/specsmod_user.py:tiny12={user}/w.pt")
    assert torch.equal(model.state_dict()["net.1.bias"], trained["net.1.bias"])


@pytest.mark.parametrize("change, words", [
    (lambda s: {**s, "extra.weight": torch.zeros(1)}, "unexpected keys [extra.weight]"),
    (lambda s: {k: v for k, v in s.items() if k != "net.1.bias"}, "missing keys [net.1.bias]"),
    (lambda s: {**s, "net.1.bias": torch.zeros(12)}, "other shapes (file vs model): [net.1.bias (12,) vs (10,)]"),
])
def test_weights_that_do_not_fit_name_the_keys(user, change, words):
    model, _ = load_classifier_spec(f"{user}/specsmod_user.py:tiny")
    save_file(change(model.state_dict()), user / "bad.safetensors")
    with pytest.raises(WeightsError) as err:
        load_classifier_spec(f"{user}/specsmod_user.py:tiny={user}/bad.safetensors")
    assert words in _one_line(err) and "does not fit" in str(err.value)


@pytest.mark.parametrize("spec, error, words", [
    ("no_such_module_xyz:tiny", ConfigError, "no module named 'no_such_module_xyz'"),
    ("{u}/missing.py:tiny", ConfigError, "no such file"),
    ("{u}/specsmod_user.py:tinny", ConfigError, "did you mean 'tiny'"),
    ("{u}/specsmod_user.py:VALUE", ConfigError, "not a callable"),
    ("{u}/specsmod_user.py:not_a_module", ConfigError, "returned a int, not a torch.nn.Module"),
    ("{u}/specsmod_user.py:broken", ConfigError, "RuntimeError: boom"),
    ("{u}/specsmod_user.py:tiny={u}/none.safetensors", WeightsError, "no such weights file"),
    ("{u}/specsmod_user.py:tiny={u}/w.bin", WeightsError, "must be a .safetensors"),
    ("mnist-b={u}/w.safetensors", ConfigError, "=WEIGHTS goes after a factory"),
    ("aaa-mnist", WeightsError, "is a shield, not a classifier"),
])
def test_each_wrong_spec_is_one_line(user, spec, error, words):
    (user / "w.bin").write_bytes(b"0")
    with pytest.raises(error) as err:
        load_classifier_spec(spec.format(u=user))
    assert words in _one_line(err)


def test_load_classifier_takes_every_spec(user):
    import aeshield

    model = aeshield.load_classifier(f"{user}/specsmod_user.py:tiny12")
    assert model(torch.rand(1, 1, 28, 28)).shape == (1, 12) and not model.training
    model, info = aeshield.load_classifier_spec("mnist-b", normalize="0.5,0.5")
    assert isinstance(model, Normalized) and info.dataset == "mnist"


def test_a_module_instance_can_be_named_directly(user):
    model, _ = load_classifier_spec(f"{user}/specsmod_user.py:INSTANCE")
    assert model(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_a_shipped_name_knows_its_dataset():
    model, info = load_classifier_spec("mnist-b")
    assert (info.dataset, info.input_shape, info.num_classes, info.kind) == ("mnist", (1, 28, 28), 10, "classifier")
    assert len(info.weights_sha256) == 64 and not model.training


def test_parse_normalize():
    assert parse_normalize("0.5,0.25") == ((0.5,), (0.25,))
    assert parse_normalize("0.1,0.2,0.3,1,2,3") == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    for bad in ("0.5", "a,b", "0.5,0", "0.1,0.2,-1,1", "1,nan"):
        with pytest.raises(ConfigError):
            parse_normalize(bad)


def test_normalized_feeds_the_model_normalised_images(user):
    plain, _ = load_classifier_spec(f"{user}/specsmod_user.py:tiny")
    model, info = load_classifier_spec(f"{user}/specsmod_user.py:tiny", normalize="0.5,0.25")
    assert isinstance(model, Normalized) and info.normalize == ((0.5,), (0.25,))
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(model(x), plain((x - 0.5) / 0.25))
    with pytest.raises(ConfigError, match="3 channel"):
        load_classifier_spec("mnist-b", normalize=((0.1, 0.2, 0.3), (1, 1, 1)))


def test_probe_num_classes(user):
    model, _ = load_classifier_spec(f"{user}/specsmod_user.py:tiny12")
    assert probe_num_classes(model, (1, 28, 28)) == 12
    with pytest.raises(ConfigError, match=r"cannot take images of shape \(3, 32, 32\)"):
        probe_num_classes(model, (3, 32, 32))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 26 * 26, 10)).eval()


def test_an_exported_program_round_trips(tmp_path):
    net = _net()
    path = save_exported(net, tmp_path / "net.pt2", torch.rand(1, 1, 28, 28))
    loaded = load_exported(path)
    loaded.eval()  # the exported graph module itself refuses eval(); the wrapper must not
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(loaded(x), net(x))
    model, info = load_classifier_spec(str(path))
    assert info.input_shape == (1, 28, 28) and torch.equal(model(x[:1]), net(x[:1]))


class _Marker:
    """Touches a file when unpickled: what arbitrary code in a .pt2 could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _rewrite(src, dst, replace):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, replace.get(item.filename.split("/", 1)[1], data))


def _pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("how", ["sample-inputs", "pickled-weight", "opaque-constant"])
def test_a_pt2_with_a_pickled_object_is_refused_unread(tmp_path, how):
    good = save_exported(_net(), tmp_path / "net.pt2", torch.rand(2, 1, 28, 28))
    marker = tmp_path / "ran"
    evil = _pickled({"x": _Marker(marker)})
    with zipfile.ZipFile(good) as z:
        weights = json.loads(z.read("archive/data/weights/model_weights_config.json"))
        constants = json.loads(z.read("archive/data/constants/model_constants_config.json"))
    if how == "sample-inputs":
        replace = {"data/sample_inputs/model.pt": evil}
    elif how == "pickled-weight":
        weights["config"]["0.weight"]["use_pickle"] = True
        replace = {"data/weights/model_weights_config.json": json.dumps(weights).encode(),
                   "data/weights/weight_0": evil}
    else:
        constants["config"]["c"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                    "tensor_meta": None}
        replace = {"data/constants/model_constants_config.json": json.dumps(constants).encode()}
    bad = tmp_path / "bad.pt2"
    _rewrite(good, bad, replace)
    with pytest.raises(WeightsError) as err:
        load_exported(bad)
    assert "refusing to load this .pt2" in _one_line(err)
    assert not marker.exists()
