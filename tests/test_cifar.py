"""CIFAR-10 pieces: image-folder loader, U-Net shield, seeded augmentation, the CIFAR targets."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aeshield.data.cifar import CIFAR10_CLASSES, read_image_folder
from aeshield.data.fetch import DataError
from aeshield.experiments.config import load_config
from aeshield.models import create_model
from aeshield.train.classifier import augment_batch

STANDIN = "CIFAR-10 (JPEG q75 stand-in)"


def _write(path: Path, colour: tuple[int, int, int], size=(32, 32), fmt="PNG", **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt, **kw)


def test_image_folder_labels_follow_the_canonical_order_not_the_folder_names(tmp_path):
    # Only three classes present: labels must be their canonical positions (0, 4, 5), not the
    # folders' discovery indices (0, 1, 2).
    colours = {"dog": (200, 0, 0), "deer": (0, 200, 0), "airplane": (0, 0, 200)}
    for name, colour in colours.items():
        _write(tmp_path / "test" / name / "a.png", colour)
        _write(tmp_path / "test" / name / "B.JPG", colour, fmt="JPEG", quality=75)
    (tmp_path / "test" / "dog" / ".hidden.png").write_bytes(b"junk")
    (tmp_path / "test" / "dog" / "notes.txt").write_text("not an image")
    images, labels = read_image_folder(tmp_path, "test")
    assert images.shape == (6, 3, 32, 32) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 4, 4, 5, 5]
    for image, label in zip(images, labels):
        want = colours[CIFAR10_CLASSES[label]]
        assert np.abs(image.reshape(3, -1).mean(1) - want).max() < 3  # JPEG moves colours a little


def test_image_folder_refuses_wrong_sizes(tmp_path):
    _write(tmp_path / "train" / "cat" / "big.png", (1, 2, 3), size=(33, 32))
    with pytest.raises(DataError, match="33x32, expected 32x32"):
        read_image_folder(tmp_path, "train")


def test_standin_test_split_is_balanced_and_labelled():
    from aeshield.data import load_dataset

    try:
        test = load_dataset("cifar10", "test")
    except Exception as e:  # noqa: BLE001 - data not fetched on this machine
        pytest.skip(f"CIFAR-10 not available: {e}")
    assert test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    # dataset order is a fixed shuffle, so a prefix mixes the classes
    assert len(set(test.labels[:50].tolist())) == 10
    if "stand-in" in test.source:
        assert test.source == STANDIN


@pytest.mark.parametrize("name", ["unet", "unet-quick"])
def test_unet_preserves_shape_and_range(name):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.cat([torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32), torch.rand(2, 3, 32, 32)])
    for mode in (True, False):
        model.train(mode)
        out = model(x)
        assert out.shape == x.shape
        assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
    # the skip connections let a change of the input reach the output at full resolution
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    model(x)[0, :, 5, 5].sum().backward()
    assert x.grad[0, :, 5, 5].abs().sum() > 0


def _crops(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Every (crop, flip) of one image: (2 * (2 pad + 1)^2, C, H, W)."""
    padded = F.pad(x[None], (pad,) * 4)[0]
    _, h, w = x.shape
    crops = [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    crops = torch.stack(crops)
    return torch.cat([crops, crops.flip(-1)])


def test_augmentation_is_a_seeded_padded_crop_with_flip():
    x = torch.rand(16, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, augment_batch(x, torch.Generator().manual_seed(4)))
    flipped = 0
    for image, result in zip(x, out):
        candidates = _crops(image, 4)
        match = (candidates == result).flatten(1).all(1).nonzero().squeeze(1)
        assert match.numel() >= 1, "output is not a crop (or flipped crop) of the padded input"
        flipped += int(match[0] >= candidates.shape[0] // 2)
    assert 0 < flipped < 16  # both flipped and unflipped images occur


def test_cifar_targets_share_artifacts_and_carry_the_standin_label():
    for profile in ("quick", "paper"):
        aaa = load_config("aaa-cifar10", profile)
        corr = load_config("corruption-cifar10", profile)
        assert aaa.dataset == corr.dataset == "cifar10"
        for name, spec in corr.classifiers.items():
            assert aaa.classifiers[name] == spec, f"{profile}: classifier {name} differs"
        assert aaa.adversarial_training == corr.adversarial_training
        assert aaa.shields == corr.shields
        assert STANDIN in aaa.title and STANDIN in corr.title
        shield = aaa.shields["ensemble"]
        assert shield.against == ("D", "E", "F")
        # the paper's training attack, PGD-10 of 2/255; the quick profile's PGD-2 of 4/255 (issue 26)
        steps, step = (10, 2 / 255) if profile == "paper" else (2, 4 / 255)
        assert abs(shield.eps - 8 / 255) < 1e-9 and abs(shield.step_size - step) < 1e-9
        assert shield.attack_steps == steps
        at = aaa.adversarial_training  # the same attack for the baseline
        assert (at.eps, at.step_size, at.attack_steps) == (shield.eps, shield.step_size, steps)
        (pgd,) = aaa.suites[0].attacks
        assert pgd.params["steps"] == 20 and abs(pgd.params["step_size"] - 2 / 255) < 1e-9
        # the transfer classifier is never trained against
        assert "T" in aaa.classifiers and "T" not in shield.against
    assert load_config("aaa-cifar10", "paper").suites[0].attacks[0].params["restarts"] == 10
