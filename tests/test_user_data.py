"""Your own data (data/user.py): a .npz file or an image folder, split into seeded train and
validation parts, each wrong input refused with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aeshield.errors import ConfigError
from aeshield.inputs import InputError
from aeshield.data.user import load_data, registered_name


@pytest.fixture()
def npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)  # NHWC uint8
    y = np.arange(20) % 4
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    return tmp_path / "mine.npz", x, y


def test_a_npz_loads_whole_as_test_and_splits_into_seeded_parts(npz):
    path, x, y = npz
    test = load_data(str(path))
    assert test.images.shape == (20, 3, 8, 8) and test.name == "mine" and test.source == str(path)
    assert torch.allclose(test.images, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    assert test.labels.tolist() == y.tolist() and test.split == "test" and len(test.sha256) == 64
    train = load_data(str(path), "train", val_fraction=0.25, seed=3)
    val = load_data(str(path), "val", val_fraction=0.25, seed=3)
    assert (len(train), len(val)) == (15, 5)
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(20))
    assert torch.equal(val.images, test.images[val.indices])
    assert load_data(str(path), "val", val_fraction=0.25, seed=3).indices.tolist() == val.indices.tolist()
    assert load_data(str(path), "val", val_fraction=0.25, seed=4).indices.tolist() != val.indices.tolist()


def _folder(root, sizes=None, modes=None, extra=None):
    """Two classes ('cat', 'ant': labels 1 and 0), three 6x5 images each."""
    for c, cls in enumerate(("cat", "ant")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            size = (sizes or {}).get((cls, i), (6, 5))
            mode = (modes or {}).get((cls, i), "L")
            value = 40 * i + c * 10
            Image.new(mode, size, value if mode == "L" else (value, 0, 255)).save(root / cls / f"{i}.png")
    for name, data in (extra or {}).items():
        (root / name).write_bytes(data)
    return root


def test_an_image_folder_labels_by_sorted_class_name(tmp_path):
    data = load_data(str(_folder(tmp_path / "imgs")))
    assert data.images.shape == (6, 1, 5, 6) and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images[1, 0, 0, 0].item() == pytest.approx(50 / 255)  # ant/1.png: 40 * 1 + 10
    assert data.name == "imgs" and len(data.sha256) == 64


def test_a_folder_with_one_colour_image_is_read_as_rgb(tmp_path):
    data = load_data(str(_folder(tmp_path / "imgs", modes={("cat", 2): "RGB"})))
    assert data.images.shape == (6, 3, 5, 6)
    grey = data.images[0]  # ant/0.png, grey, repeated on three channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert data.images[5, 2, 0, 0].item() == pytest.approx(1.0)  # cat/2.png's blue channel


@pytest.mark.parametrize("make, words", [
    (lambda r: _folder(r, sizes={("cat", 1): (7, 5)}), "cat/1.png: image is 7x5 pixels"),
    (lambda r: _folder(r, extra={"cat/notes.txt": b"hello"}), "notes.txt: not a readable image"),
    (lambda r: r.mkdir() or r, "found no subfolder"),
    (lambda r: (r / "cat").mkdir(parents=True) or r, "holds no images"),
])
def test_a_bad_folder_is_one_line_naming_the_file(tmp_path, make, words):
    root = make(tmp_path / "imgs")
    with pytest.raises(InputError) as err:
        load_data(str(root))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_labels_beyond_the_classes_are_refused(tmp_path, npz):
    with pytest.raises(InputError, match="label 3 is out of range"):
        load_data(str(npz[0]), num_classes=3)
    with pytest.raises(InputError, match="out of range"):
        load_data(str(_folder(tmp_path / "imgs")), num_classes=1)


def test_a_registered_name_loads_the_dataset():
    assert registered_name("fmnist") == "fashion-mnist" and registered_name("mine.npz") is None
    test = load_data("mnist", "test")
    assert test.name == "mnist" and test.images.shape[1:] == (1, 28, 28)


@pytest.mark.parametrize("spec, kwargs, words", [
    ("mnits", {}, "did you mean 'mnist'"),
    ("{d}/missing.npz", {}, "no such .npz file"),
    ("{d}/notes.txt", {}, "not a .npz file"),
    ("{d}/mine.npz", {"val_fraction": 1.0}, "val_fraction must be in [0, 1)"),
    ("{d}/mine.npz", {"split": "holdout"}, "split must be one of"),
    ("mnist", {"split": "all"}, "not 'all'"),
])
def test_wrong_specs_are_one_line(tmp_path, npz, spec, kwargs, words):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError) as err:
        load_data(spec.format(d=tmp_path), **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)
