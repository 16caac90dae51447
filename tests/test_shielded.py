import pytest
import torch

from aeshield import Shielded, ThreatModel
from aeshield.defenses import InputError
from aeshield.models import ConvAutoencoder
from conftest import tiny_mlp


@pytest.fixture
def shielded():
    return Shielded(ConvAutoencoder().eval(), tiny_mlp().eval())


@pytest.mark.parametrize("bad,message", [
    (torch.rand(1, 28, 28), "batch of shape"),
    (torch.rand(2, 3, 28, 28), "expected images of shape"),
    ((torch.rand(2, 1, 28, 28) * 255).to(torch.uint8), "float images"),
    (torch.rand(2, 1, 28, 28) * 255, "pixel values must lie in"),
    (torch.full((2, 1, 28, 28), float("nan")), "NaN"),
])
def test_bad_inputs_raise_clear_errors(shielded, bad, message):
    with pytest.raises(InputError, match=message):
        shielded.predict(bad)


def test_predict_gives_labels(shielded):
    labels = shielded.predict(torch.rand(5, 1, 28, 28))
    assert labels.shape == (5,) and labels.dtype == torch.long


def test_shielded_passes_gradients_to_input_and_every_parameter(shielded):
    x = torch.rand(3, 1, 28, 28, requires_grad=True)
    shielded.train()
    shielded(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in shielded.parameters())


def test_threat_model_projection():
    x = torch.rand(4, 1, 8, 8)
    far = torch.rand(4, 1, 8, 8) * 3 - 1
    for norm, eps in (("Linf", 0.1), ("L2", 0.5)):
        t = ThreatModel(norm, eps)
        p = t.project(far, x)
        assert t.contains(p, x).all()
        assert torch.equal(t.project(x, x), x)
    with pytest.raises(ValueError, match="unknown norm"):
        ThreatModel("L7", 0.1)
    with pytest.raises(ValueError, match="eps must be"):
        ThreatModel("Linf", -1)
