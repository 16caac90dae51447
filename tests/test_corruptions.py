"""Corruption benchmark: padding round trip, seeding, the content-keyed cache, accuracy cells."""

import numpy as np
import pytest
import torch
from torch import nn

from aeshield.eval import corruptions as C

pytest.importorskip("imagecorruptions")


def _grey(n=3, size=28, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def test_names_match_the_library():
    import imagecorruptions as ic

    assert list(C.COMMON_CORRUPTIONS) == ic.get_corruption_names("common")
    assert list(C.EXTRA_CORRUPTIONS) == ic.get_corruption_names("validation")
    assert len(C.COMMON_CORRUPTIONS) * len(C.SEVERITIES) == 75


def test_pad_then_crop_is_the_identity_and_pads_with_zeros():
    x = _grey()
    padded, box = C.pad_to_min(x)
    assert padded.shape == (3, 32, 32, 1)
    assert box == (2, 2, 28, 28)
    assert padded[:, :2].max() == 0 and padded[:, -2:].max() == 0 and padded[:, :, :2].max() == 0
    assert np.array_equal(C.crop_back(padded, box), x)
    big = np.zeros((2, 32, 32, 3), np.uint8)
    same, box = C.pad_to_min(big)
    assert same.shape == big.shape and box == (0, 0, 32, 32)


def test_uint8_round_trip_of_tensors():
    x = torch.randint(0, 256, (2, 3, 32, 32)).float() / 255
    assert torch.equal(C.from_uint8(C.to_uint8(x)), x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        C.to_uint8(x * 2)


def test_grey_28px_images_keep_shape_and_change():
    x = _grey()
    out = C.corrupt_array(x, "gaussian_noise", 3)
    assert out.shape == x.shape and out.dtype == np.uint8
    assert not np.array_equal(out, x)
    # contrast shrinks pixels toward the image mean: a deterministic, visible change
    low = C.corrupt_array(x, "contrast", 5)
    assert low.std() < x.std()


def test_colour_images_keep_shape():
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for name in ("impulse_noise", "saturate"):
        assert C.corrupt_array(x, name, 2).shape == x.shape


def test_seeded_per_image_and_global_rng_untouched():
    x = _grey(4)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = C.corrupt_array(x, "impulse_noise", 2, seed=0)
    assert np.array_equal(np.random.get_state()[1], before)
    assert np.array_equal(a, C.corrupt_array(x, "impulse_noise", 2, seed=0))
    assert not np.array_equal(a, C.corrupt_array(x, "impulse_noise", 2, seed=1))
    # an image's corruption does not depend on the rest of the batch
    assert np.array_equal(C.corrupt_array(x[:2], "impulse_noise", 2, seed=0), a[:2])


def test_bad_names_and_severities_are_refused():
    with pytest.raises(ValueError, match="gaussian_noise"):
        C.corrupt_array(_grey(), "fire", 1)
    with pytest.raises(ValueError, match="severity"):
        C.corrupt_array(_grey(), "fog", 6)


def test_cache_is_keyed_by_content(tmp_path):
    cache = C.CorruptionCache(tmp_path)
    x = torch.from_numpy(_grey()).permute(0, 3, 1, 2).float() / 255
    first = cache.corrupted(x, "shot_noise", 1)
    assert (cache.generated, cache.reused) == (1, 0)
    assert first.shape == x.shape and 0 <= first.min() and first.max() <= 1
    assert len(list(tmp_path.glob("*.npy"))) == 1

    again = C.CorruptionCache(tmp_path)  # a second run: read back, nothing generated
    assert torch.equal(again.corrupted(x, "shot_noise", 1), first)
    assert (again.generated, again.reused) == (0, 1)

    changed = x.clone()
    changed[0, 0, 5, 5] = 1.0 - changed[0, 0, 5, 5]
    again.corrupted(changed, "shot_noise", 1)
    assert again.generated == 1
    again.corrupted(x, "shot_noise", 2)
    again.corrupted(x, "shot_noise", 1, seed=7)
    assert again.generated == 3
    assert len(list(tmp_path.glob("*.npy"))) == 4


def test_corrupt_cache_file_is_regenerated(tmp_path):
    cache = C.CorruptionCache(tmp_path)
    x = torch.rand(2, 3, 32, 32)
    good = cache.corrupted(x, "contrast", 1)
    (path,) = tmp_path.glob("*.npy")
    path.write_bytes(b"not an npy file")
    again = C.CorruptionCache(tmp_path)
    assert torch.equal(again.corrupted(x, "contrast", 1), good)
    assert again.generated == 1


class _MeanBrightness(nn.Module):
    """Class 1 if the image is bright, else 0: contrast at high severity moves it."""

    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], 1)


def test_corruption_accuracy_cells_and_means(tmp_path):
    x = torch.cat([torch.full((3, 1, 28, 28), 0.9), torch.full((3, 1, 28, 28), 0.1)])
    y = torch.tensor([1, 1, 1, 0, 0, 0])
    result = C.corruption_accuracy(_MeanBrightness(), x, y, corruptions=["brightness", "speckle_noise"],
                                   severities=[1, 5], cache=C.CorruptionCache(tmp_path))
    assert result.clean.correct == 6
    assert set(result.cells) == {("brightness", 1), ("brightness", 5),
                                 ("speckle_noise", 1), ("speckle_noise", 5)}
    assert all(a.n == 6 for a in result.cells.values())
    # brightness at severity 5 lifts the dark images over the threshold
    assert result.cells[("brightness", 5)].correct < 6
    d = result.to_dict()
    assert d["mean_common_cells"] == 2 and d["mean_extra_cells"] == 2
    assert d["mean_common"]["n"] == 12 and not d["mean_common_is_full_75"]
    assert C.CorruptionResult.from_dict(d).cells == result.cells


@pytest.mark.parametrize("target,source", [("corruption-mnist", "aaa-ensemble-mnist"),
                                           ("corruption-fmnist", "aaa-fmnist"),
                                           ("corruption-cifar10", "aaa-cifar10")])
@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_corruption_targets_reuse_their_sources_artifacts(target, source, profile):
    from aeshield.experiments.config import load_config

    corr, src = load_config(target, profile), load_config(source, profile)
    assert corr.dataset == src.dataset
    for name, spec in corr.classifiers.items():
        assert src.classifiers[name] == spec
    assert corr.adversarial_training == src.adversarial_training
    for name, spec in corr.shields.items():
        assert src.shields[name] == spec
    (figure,) = [f for f in corr.figures if f["kind"] == "corruptions"]
    assert figure.get("file")
