import os
import pytest
import torch

from aeshield.models import MODELS, create_model, list_models
from aeshield.models.io import CheckpointError, load_weights, save_weights
from aeshield.models.vae import ConditionalVAE

SMALL = [n for n in MODELS if n not in {"cifar-d", "cifar-e"}]


@pytest.mark.parametrize("name", SMALL)
def test_zoo_model_shapes_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(name)
    spec = MODELS[name]
    shape = (1, 28, 28) if spec.dataset in ("mnist", "fashion-mnist") else (3, 32, 32)
    x = torch.rand(2, *shape)
    if isinstance(model, ConditionalVAE):  # PuVAE's VAE reconstructs x conditioned on a class
        out = model(x, torch.tensor([0, 1]), sample=True)[0]
    else:
        out = model(x)
    if spec.kind == "classifier":
        assert out.shape == (2, 10)
    else:
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.isnan(out).any()
    out.float().pow(2).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar-d", "cifar-e"])
def test_paper_size_cifar_models(name):
    model = create_model(name)
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and not torch.isnan(out).any()


def test_registry_lists_and_rejects_unknown():
    assert "mnist-a" in list_models("mnist-*")
    assert set(list_models(kind="autoencoder")) >= {"conv-ae", "unet"}
    with pytest.raises(KeyError, match="known models"):
        create_model("mnist-z")


def test_save_load_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = create_model("mnist-b").eval()
    path = save_weights(model, tmp_path / "b", architecture="mnist-b", dataset="mnist",
                        clean_accuracy=0.5)
    loaded, side = load_weights(path, architecture="mnist-b", dataset="mnist")
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert side["clean_accuracy"] == 0.5 and side["architecture"] == "mnist-b"
    # Readable as the umask allows, like the sidecar (not the 0600 of a temporary file).
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask == path.with_suffix(".json").stat().st_mode & 0o777


def test_the_same_weights_saved_twice_are_the_same_bytes_and_dotted_names_keep_their_name(tmp_path):
    # Records are keyed by the SHA-256 of weight files: a re-save of unchanged weights must
    # not change it (safetensors writes its metadata in hash order, which varies by process).
    model = create_model("conv-ae-small")
    blobs = set()
    for i in range(6):
        path = save_weights(model, tmp_path / f"s{i}", architecture="conv-ae-small", dataset="mnist")
        blobs.add(path.read_bytes())
    assert len(blobs) == 1
    # Re-saving unchanged weights over a file leaves the file alone.
    target = tmp_path / "s0.safetensors"
    before = target.stat().st_mtime_ns
    save_weights(model, target, architecture="conv-ae-small", dataset="mnist")
    assert target.stat().st_mtime_ns == before
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_weights(model, target, architecture="conv-ae-small", dataset="mnist")
    assert target.read_bytes() not in blobs
    a = save_weights(model, tmp_path / "lam0.15", architecture="conv-ae-small", dataset="mnist")
    b = save_weights(model, tmp_path / "lam0.4", architecture="conv-ae-small", dataset="mnist")
    assert a.name == "lam0.15.safetensors" and b.name == "lam0.4.safetensors" and a != b
    loaded, _ = load_weights(a)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model.eval()(x), loaded(x))


def test_load_refuses_wrong_architecture_dataset_and_damage(tmp_path):
    path = save_weights(create_model("mnist-c"), tmp_path / "c", architecture="mnist-c",
                        dataset="mnist")
    with pytest.raises(CheckpointError, match="holds a 'mnist-c' model"):
        load_weights(path, architecture="mnist-a")
    with pytest.raises(CheckpointError, match="trained on 'mnist'"):
        load_weights(path, dataset="fashion-mnist")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="damaged"):
        load_weights(path)
    with pytest.raises(FileNotFoundError, match="a shipped name"):
        load_weights(tmp_path / "nothing.safetensors")
