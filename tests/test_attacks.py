import pytest
import torch
from torch import nn

from aeshield.attacks import BPDA, EOT, bim, cw_l2, fgsm, latent_pgd, pgd, reconstruction_pgd
from aeshield.attacks.gradient import _step, _step_project, input_gradient, logit_objective
from aeshield.defenses import Shielded
from aeshield.models import ConvAutoencoder
from aeshield.threat import ThreatModel
from conftest import tiny_mlp


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


ATTACKS = [
    ("fgsm-linf", lambda m, x, y, e: fgsm(m, x, y, eps=e), "Linf"),
    ("fgsm-l2", lambda m, x, y, e: fgsm(m, x, y, eps=e, norm="L2"), "L2"),
    ("bim-linf", lambda m, x, y, e: bim(m, x, y, eps=e, steps=5), "Linf"),
    ("pgd-linf", lambda m, x, y, e: pgd(m, x, y, eps=e, step_size=e / 4, steps=5, restarts=2), "Linf"),
    ("pgd-l2", lambda m, x, y, e: pgd(m, x, y, eps=e, norm="L2", step_size=e / 4, steps=5), "L2"),
    ("pgd-margin", lambda m, x, y, e: pgd(m, x, y, eps=e, step_size=e / 4, steps=5, loss="margin"), "Linf"),
    ("cw-l2", lambda m, x, y, e: cw_l2(m, x, y, c=10, steps=10, lr=0.05, max_l2=e), "L2"),
]


@pytest.mark.parametrize("name,attack,norm", ATTACKS, ids=[a[0] for a in ATTACKS])
@pytest.mark.parametrize("eps", [0.1, 1.0])  # 1.0: the whole pixel box, so clipping to it is tested
def test_result_stays_in_ball_and_box(name, attack, norm, eps, batch):
    x, y = batch
    model = tiny_mlp().eval()
    x_adv = attack(model, x, y, eps)
    assert x_adv.shape == x.shape
    assert ThreatModel(norm, eps).contains(x_adv, x).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("name,attack,norm", ATTACKS[:6], ids=[a[0] for a in ATTACKS[:6]])
def test_eps_zero_returns_input(name, attack, norm, batch):
    x, y = batch
    assert torch.equal(attack(tiny_mlp().eval(), x, y, 0.0), x)


def test_same_generator_seed_same_result(batch):
    x, y = batch
    model = tiny_mlp().eval()
    a = pgd(model, x, y, eps=0.3, steps=3, generator=torch.Generator().manual_seed(5))
    b = pgd(model, x, y, eps=0.3, steps=3, generator=torch.Generator().manual_seed(5))
    c = pgd(model, x, y, eps=0.3, steps=3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_and_requires_grad_restored(training, batch):
    x, y = batch
    model = tiny_mlp().train(training)
    model.body[1].weight.requires_grad_(False)  # a partly frozen model must stay so
    flags = [p.requires_grad for p in model.parameters()]
    for attack in (lambda: pgd(model, x, y, steps=2), lambda: cw_l2(model, x, y, steps=2),
                   lambda: fgsm(model, x, y)):
        attack()
        assert model.training is training
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())


def test_pgd_drives_accuracy_far_down(trained_mlp, mnist_small):
    _, test = mnist_small
    x, y = test.images[:200], test.labels[:200]
    clean = _accuracy(trained_mlp, x, y)
    adv = _accuracy(trained_mlp, pgd(trained_mlp, x, y, eps=0.3, steps=20, step_size=0.03), y)
    assert clean > 0.8
    assert adv < 0.05


def test_stronger_attack_never_raises_accuracy(trained_mlp, mnist_small):
    _, test = mnist_small
    x, y = test.images[:200], test.labels[:200]
    accs = [_accuracy(trained_mlp, pgd(trained_mlp, x, y, eps=0.08, steps=s, step_size=0.01,
                                       restarts=r), y) for s, r in [(1, 1), (10, 1), (10, 3)]]
    assert accs[0] >= accs[1] >= accs[2]


def test_restart_never_unfools(trained_mlp, mnist_small):
    """Per example: whatever one restart fools stays fooled after more restarts."""
    _, test = mnist_small
    x, y = test.images[:200], test.labels[:200]
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    one = pgd(trained_mlp, x, y, eps=0.06, steps=5, step_size=0.02, restarts=1, generator=g())
    many = pgd(trained_mlp, x, y, eps=0.06, steps=5, step_size=0.02, restarts=4, generator=g())
    with torch.no_grad():
        fooled_one = trained_mlp(one).argmax(1) != y
        fooled_many = trained_mlp(many).argmax(1) != y
    assert fooled_one.any()
    assert (fooled_many | ~fooled_one).all()


@pytest.mark.parametrize("norm,eps,step", [("Linf", 0.3, 0.01), ("Linf", 0.05, 0.02), ("L2", 1.5, 0.2),
                                            ("L2", 0.5, 0.4)])
def test_fused_step_is_step_then_project_bit_for_bit(norm, eps, step, batch):
    """The PGD loop's in-place step and projection gives the same bits as the plain composition,
    leaves its inputs alone and records no graph."""
    x0, _ = batch
    g = torch.Generator().manual_seed(1)
    x_adv = ThreatModel(norm, eps).project(x0 + 0.3 * torch.randn(x0.shape, generator=g), x0)
    grad = torch.randn(x0.shape, generator=g)
    grad[0] = 0  # a zero gradient: sign 0, norm clamped
    grad[1, 0, :5] = 0
    threat = ThreatModel(norm, eps)
    expected = threat.project(_step(x_adv, grad, step, threat.norm), x0)
    before = x_adv.clone(), grad.clone()
    got = _step_project(x_adv, grad, x0, step, threat, torch.empty_like(x_adv))
    assert torch.equal(got, expected)
    assert torch.equal(x_adv, before[0]) and torch.equal(grad, before[1])
    assert not got.requires_grad


def test_early_stop_gives_the_same_examples(trained_mlp, mnist_small):
    """Early stop (examples leave the batch once fooled, several times in a run) only saves work:
    the per-example bookkeeping gives the same result as attacking every example. (One restart:
    later restarts draw their random start for the examples left, so their draws differ.)"""
    _, test = mnist_small
    x, y = test.images[:200], test.labels[:200]
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    kw = dict(eps=0.07, steps=8, step_size=0.02, restarts=1)
    stop = pgd(trained_mlp, x, y, early_stop=True, generator=g(), **kw)
    full = pgd(trained_mlp, x, y, early_stop=False, generator=g(), **kw)
    with torch.no_grad():
        fooled = trained_mlp(stop).argmax(1) != y
    assert 0 < fooled.sum() < len(y)  # some leave early, some stay to the end
    assert torch.equal(stop, full)


def test_cw_respects_l2_budget_and_fools(trained_mlp, mnist_small):
    _, test = mnist_small
    x, y = test.images[:50], test.labels[:50]
    x_adv = cw_l2(trained_mlp, x, y, c=10, steps=100, lr=0.05, max_l2=3.0)
    assert ThreatModel("L2", 3.0).contains(x_adv, x).all()
    assert _accuracy(trained_mlp, x_adv, y) < 0.3


def test_bpda_identity_gradient():
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    quantize = lambda t: torch.round(t * 4) / 4  # noqa: E731  (zero gradient almost everywhere)
    out = BPDA(quantize)(x)
    assert torch.equal(out, quantize(x))
    weights = torch.randn_like(x)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    assert torch.allclose(grad, weights)


def test_bpda_surrogate_gradient():
    x = torch.rand(3, 1, 4, 4, requires_grad=True)
    out = BPDA(torch.sign, surrogate=lambda t: 2 * t)(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(grad, torch.full_like(x, 2.0))


class NoisyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = tiny_mlp()

    def forward(self, x):
        return self.inner((x + 0.3 * torch.randn_like(x)).clamp(0, 1))


def test_eot_reduces_gradient_variance(batch):
    x, y = batch
    torch.manual_seed(0)
    model = NoisyModel().eval()
    objective = logit_objective("ce")

    def spread(m):
        grads = torch.stack([input_gradient(m, x, y, objective)[0] for _ in range(8)])
        return grads.var(0).mean().item()

    assert spread(EOT(model, samples=16)) < 0.5 * spread(model)


def test_eot_averages_several_draws(batch):
    x, _ = batch
    calls = []

    class Counter(nn.Module):
        def forward(self, t):
            calls.append(t.shape[0])
            return torch.zeros(t.shape[0], 10)

    EOT(Counter(), samples=5)(x)
    assert calls == [5 * x.shape[0]]  # one batched pass over five draws


def test_adaptive_attacks_stay_in_ball(batch):
    x, y = batch
    model = Shielded(ConvAutoencoder().eval(), tiny_mlp().eval())
    for attack in (reconstruction_pgd, latent_pgd):
        x_adv = attack(model, x, y, eps=0.2, steps=3, step_size=0.05)
        assert ThreatModel("Linf", 0.2).contains(x_adv, x).all()


def test_attack_rejects_bad_labels(batch):
    x, y = batch
    with pytest.raises(ValueError, match="y: expected integer class labels"):
        pgd(tiny_mlp(), x, y.float())
    with pytest.raises(ValueError, match="x: expected float images"):
        pgd(tiny_mlp(), (x * 255).to(torch.uint8), y)
