"""The fold input gradient of thin convolutions (``models.fast_conv``): the same first and second
derivatives as PyTorch's convolution, used only where it pays, and used by the attacks' and the
training loop's gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aeshield.attacks.gradient import input_gradient, logit_objective
from aeshield.models import create_model
from aeshield.models.fast_conv import _Conv2dFoldGrad, _pair, fast_input_gradients

FOLD = "_Conv2dFoldGradBackward"


@pytest.mark.parametrize("stride, padding, dilation, size", [
    ((1, 1), (0, 0), (1, 1), (7, 7)),
    ((2, 2), (1, 1), (1, 1), (9, 9)),
    ((2, 1), (2, 1), (2, 1), (10, 8)),  # uneven, and a size the stride does not divide
    ((2,), (1,), (1,), (9, 9)),  # one-element tuples, which conv2d takes for both sides
])
def test_first_and_second_derivatives_match_the_convolution(stride, padding, dilation, size):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, *size, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)

    def conv(x, w, b):
        return _Conv2dFoldGrad.apply(x, w, b, _pair(stride), _pair(padding), _pair(dilation))

    assert torch.autograd.gradcheck(conv, (x, w, b))
    assert torch.autograd.gradgradcheck(conv, (x, w, b))
    out = conv(x, w, b)
    ref = F.conv2d(x, w, b, stride, padding, dilation)
    assert torch.equal(out, ref)  # the forward is PyTorch's own
    g = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    ours = torch.autograd.grad(out, (x, w, b), g)
    theirs = torch.autograd.grad(ref, (x, w, b), g)
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_only_thin_convolutions_whose_input_needs_a_gradient_take_the_fold():
    thin, wide = nn.Conv2d(1, 4, 3), nn.Conv2d(8, 4, 3)
    x1 = torch.rand(2, 1, 6, 6, requires_grad=True)
    x8 = torch.rand(2, 8, 6, 6, requires_grad=True)
    with fast_input_gradients():
        assert type(thin(x1).grad_fn).__name__ == FOLD
        assert type(wide(x8).grad_fn).__name__ != FOLD  # oneDNN is faster there
        assert type(thin(x1.detach()).grad_fn).__name__ != FOLD  # no input gradient to speed up
        with torch.no_grad():
            assert thin(x1).grad_fn is None
    assert type(thin(x1).grad_fn).__name__ != FOLD  # outside the block, PyTorch's convolution
    with fast_input_gradients(nn.Sequential(wide)):  # given a model without a thin convolution
        assert type(thin(x1).grad_fn).__name__ != FOLD
    with fast_input_gradients(nn.Sequential(wide, thin)):
        assert type(thin(x1).grad_fn).__name__ == FOLD


def test_under_bfloat16_autocast_the_fold_steps_aside_and_the_input_gradient_still_flows():
    # The fold multiplied float32 weights by autocast's bfloat16 output gradient and raised a
    # dtype error: mixed-precision training (``LoopConfig.precision``) would have crashed.
    conv = nn.Conv2d(1, 4, 3)
    x = torch.rand(2, 1, 6, 6, requires_grad=True)
    with fast_input_gradients(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
        assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__ != FOLD
        (grad,) = torch.autograd.grad(out.float().sum(), x)
    assert grad.dtype == torch.float32 and grad.shape == x.shape and bool(grad.abs().sum() > 0)


def test_a_classifier_input_gradient_and_its_double_backward_are_unchanged():
    torch.manual_seed(0)
    model = create_model("mnist-b").double().eval()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 5, 9])

    def penalty():  # DBP's kind of loss: the input gradient's norm, differentiated again
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), list(model.parameters()))

    with fast_input_gradients():
        ours = penalty()
    theirs = penalty()
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)


class _Recorder(nn.Module):
    """A one-channel classifier that notes the backward node of its first convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
        self.nodes: list[str] = []
        self.net[0].register_forward_hook(lambda m, i, o: self.nodes.append(type(o.grad_fn).__name__))

    def forward(self, x):
        return self.net(x)


def test_the_attacks_and_the_training_loop_use_it():
    from aeshield.defenses.aaa import AAAConfig, train_aaa

    torch.manual_seed(0)
    classifier = _Recorder().eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    input_gradient(classifier, x, y, logit_objective("ce"))
    assert classifier.nodes == [FOLD]

    classifier.nodes.clear()
    shield = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, padding=1), nn.Sigmoid())
    config = AAAConfig(eps=0.1, step_size=0.05, attack_steps=1, epochs=1, batch_size=8, lr=0.01,
                       warmup_steps=0, val_attack_steps=1)
    train_aaa(shield, [classifier.requires_grad_(False)], x, y, config, progress=False)
    # every forward that records a graph (the inner attack's and the shield's loss) took the
    # fold; the others are the no-grad accuracy checks
    assert classifier.nodes.count(FOLD) >= 4
    assert set(classifier.nodes) <= {FOLD, "NoneType"}, classifier.nodes
