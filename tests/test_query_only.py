"""Query-only classifiers (issue 28): the ``QueryOnly`` interface, gradient estimation from
queries, and AAA trained through estimated gradients or a distilled surrogate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aeshield.attacks.estimate import EstimatedGradient, estimate_gradient
from aeshield.defenses.aaa import AAAConfig, train_aaa
from aeshield.defenses.query_access import DistilledSurrogate
from aeshield.errors import ConfigError
from aeshield.models.query import QueryBudgetError, QueryGradientError, QueryOnly


def _classifier(seed: int = 1, inputs: int = 64, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 16), nn.Tanh(), nn.Linear(16, classes)).eval()


def _autoencoder(seed: int = 2, side: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(side * side, side * side), nn.Sigmoid(),
                         nn.Unflatten(1, (1, side, side)))


def _data(n: int = 64, side: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=gen), torch.randint(0, 3, (n,), generator=gen)


class _Calls(nn.Module):
    """Counts forward calls and records any gradient that reaches its parameters."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls, self.grads = inner, 0, 0
        for p in self.inner.parameters():
            p.register_hook(self._seen)

    def _seen(self, grad):
        self.grads += 1
        return grad

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_no_gradient_ever_reaches_the_wrapped_model():
    model = _Calls(_classifier())
    q = QueryOnly(model)
    assert list(q.parameters()) == [] and list(q.state_dict()) == ["queries"]
    x, y = _data(8)
    x.requires_grad_(True)
    loss = F.nll_loss(q(x).log(), y)
    with pytest.raises(QueryGradientError, match="estimate it from queries"):
        loss.backward()
    # Through a shield in front of it, too: the shield's parameters get nothing either.
    g = _autoencoder()
    with pytest.raises(QueryGradientError):
        F.nll_loss(q(g(x)).log(), y).backward()
    assert model.grads == 0 and all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in g.parameters())
    assert q.spent == 16


def test_answers_are_probabilities_rounded_or_labels_and_the_budget_is_enforced_before_running():
    model = _Calls(_classifier())
    x, _ = _data(10)
    probs = QueryOnly(model, decimals=2)(x)
    assert probs.shape == (10, 3) and torch.allclose(probs, torch.round(probs, decimals=2))
    labels = QueryOnly(model, output="label")(x)
    assert labels.dtype == torch.long and torch.equal(labels, model(x).argmax(1))
    limited = QueryOnly(model, budget=15)
    limited(x)
    calls = model.calls
    with pytest.raises(QueryBudgetError, match="10 of 15"):
        limited(x)
    assert model.calls == calls and limited.spent == 10  # refused whole, not half-answered
    with pytest.raises(ConfigError):
        QueryOnly(model, output="logits")


@pytest.mark.parametrize("method", ["nes", "spsa"])
def test_the_estimate_points_along_the_true_gradient(method):
    torch.manual_seed(0)
    w = torch.randn(12, dtype=torch.float64)
    x = torch.rand(5, 12, dtype=torch.float64)

    def f(z):  # one value per example; the estimator sees no more than its values
        return (z.pow(2) * w).sum(1)

    true = 2 * x * w
    few = estimate_gradient(f, x, samples=4, sigma=1e-3, method=method, generator=torch.Generator().manual_seed(0))
    many = estimate_gradient(f, x, samples=4000, sigma=1e-3, method=method,
                             generator=torch.Generator().manual_seed(0))
    cos = F.cosine_similarity
    assert cos(many, true).min() > 0.95
    assert cos(many, true).mean() > cos(few, true).mean()  # more queries, a better estimate


def test_estimated_gradients_through_a_query_only_classifier_match_autograd_and_are_counted():
    model = _classifier().double()
    q = QueryOnly(model)
    est = EstimatedGradient(q, samples=2000, sigma=1e-4, method="spsa")
    x, y = _data(4)
    x = x.double()
    xe = x.clone().requires_grad_(True)
    F.cross_entropy(est(xe), y, reduction="sum").backward()
    xt = x.clone().requires_grad_(True)
    F.cross_entropy(model(xt), y, reduction="sum").backward()
    assert F.cosine_similarity(xe.grad.flatten(1), xt.grad.flatten(1)).min() > 0.97
    assert q.spent == 4 * (1 + 2 * 2000)
    with pytest.raises(ConfigError, match="surrogate"):
        EstimatedGradient(QueryOnly(model, output="label"))


def test_a_query_only_classifier_needs_a_query_method():
    x, y = _data(32)
    config = AAAConfig(epochs=1, batch_size=16, attack_steps=1, warmup_steps=0)
    with pytest.raises(ConfigError, match="query_method"):
        train_aaa(_autoencoder(), [QueryOnly(_classifier())], x, y, config, progress=False)
    with pytest.raises(ConfigError, match="surrogate"):
        AAAConfig(query_method="surrogate")
    with pytest.raises(ConfigError, match="query_method"):
        AAAConfig(query_method="guess")


def test_aaa_through_estimated_gradients_trains_the_shield_and_counts_every_query(tmp_path):
    x, y = _data(32)
    classifier = _Calls(_classifier())
    before = [p.clone() for p in classifier.parameters()]
    q = QueryOnly(classifier)
    g = _autoencoder()
    start = [p.clone() for p in g.parameters()]
    config = AAAConfig(epochs=1, batch_size=16, schedule="fast", guard_drop=None, warmup_steps=0,
                       query_method="nes", query_samples=3, eps=0.1)
    result = train_aaa(g, [q], x, y, config, progress=False, checkpoint=tmp_path / "g.ckpt")
    # Per update: the FGSM estimate and the shield's (1 + 2 * 3 queries per image each).
    assert result.queries == q.spent == 32 * 2 * (1 + 2 * 3)
    assert result.history[-1]["queries"] == q.spent
    assert classifier.grads == 0 and all(torch.equal(a, b) for a, b in zip(before, classifier.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(start, g.parameters()))
    saved = torch.load(tmp_path / "g.ckpt", weights_only=True)
    assert int(saved["extra"]["query_access"]["estimator_0"]["classifier.queries"]) == q.spent


@pytest.mark.parametrize("output", ["probs", "label"])
def test_aaa_through_a_distilled_surrogate_refreshes_it_on_the_reconstructions(output):
    x, y = _data(64, side=28)
    q = QueryOnly(_classifier(inputs=784, classes=10), output=output)
    config = AAAConfig(epochs=1, batch_size=16, schedule="fast", guard_drop=None, warmup_steps=0,
                       query_method="surrogate", surrogate="mnist-c", surrogate_epochs=1, eps=0.1)
    result = train_aaa(_autoencoder(side=28), [q], x, y, config, progress=False)
    # Distillation asks about each training image once; each of the 4 steps queues its 16
    # reconstructions, answered before the next step (the last one is never asked).
    assert result.queries == q.spent == 64 + 3 * 16


def test_a_query_only_shields_details_say_what_the_classifier_answered():
    from types import SimpleNamespace

    from aeshield.defenses import aaa

    x, y = _data(32, side=28)
    config = aaa.AAAShieldConfig(architecture="conv-ae-small", training=AAAConfig(
        epochs=1, batch_size=16, schedule="fast", guard_drop=None, warmup_steps=0,
        query_method="surrogate", surrogate="mnist-c", surrogate_epochs=1, eps=0.1))
    asked = QueryOnly(_classifier(inputs=784, classes=10), output="label")
    trained = aaa.train(config, [asked], SimpleNamespace(images=x, labels=y), progress=False)
    assert trained.details["query_output"] == "label" and trained.details["queries"] == asked.spent
    white = aaa.train(config, [_classifier(inputs=784, classes=10)], SimpleNamespace(images=x, labels=y),
                      progress=False)
    assert "query_output" not in white.details and "queries" not in white.details


def test_a_surrogate_learns_the_classifier_it_queries():
    x, _ = _data(512)
    teacher = _classifier(seed=5)
    q = QueryOnly(teacher)
    student = DistilledSurrogate(q, _classifier(seed=6), lr=1e-2, seed=0)
    with torch.no_grad():
        before = float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())
    stats = student.fit(x, epochs=20, batch_size=64)
    assert q.spent == 512
    assert stats["surrogate_agreement"] > max(0.9, before)


def test_a_target_trains_a_query_only_shield_records_its_queries_and_draws_the_curve(tmp_path):
    import json

    from aeshield.experiments import Runner
    from aeshield.experiments.config import from_dict

    shield = {"method": "aaa", "autoencoder": "conv-ae-small", "against": ["C"], "attack_steps": 1,
              "epochs": 1, "train_limit": 96, "warmup_steps": 2, "val_n": 16, "batch_size": 32,
              "schedule": "fast", "guard_drop": None}
    config = from_dict({
        "name": "tiny-query", "title": "query-only check", "dataset": "mnist", "seed": 0, "n": 20,
        "batch_size": 20, "classifiers": {"C": {"model": "mnist-c", "epochs": 1, "train_limit": 300}},
        "shields": {"white": shield,
                    "asked": {**shield, "query_only": ["C"], "query_method": "surrogate", "surrogate": "mnist-c",
                              "surrogate_epochs": 1, "query_output": "label"}},
        "suites": [{"name": "linf", "threat": {"norm": "Linf", "eps": 0.3},
                    "attacks": [{"name": "pgd", "label": "PGD-2", "params": {"steps": 2, "step_size": 0.2}}]}],
        "rows": [{"label": "none", "kind": "natural"}, {"label": "white", "kind": "shield", "shield": "white"},
                 {"label": "asked", "kind": "shield", "shield": "asked"}],
        "groups": [{"label": "g", "classifiers": ["C"]}],
        "columns": [{"label": "PGD", "suites": ["linf"]}],
        "figures": [{"kind": "query-curve", "group": "g", "column": "PGD", "references": ["none", "white"]}],
    }, "quick")
    runner = Runner(config, tmp_path / "out", artifacts=tmp_path / "artifacts", use_shipped=False, progress=False)
    out = runner.run()
    sidecar = json.loads(runner.zoo.store.file_of("shield-asked").with_suffix(".json").read_text())
    # 96 training images (as split by the runner) asked once, then 2 of 3 steps' reconstructions.
    assert sidecar["query_only"] == ["C"] and sidecar["queries"] >= 96 and sidecar["query_output"] == "label"
    assert "queries" not in json.loads(runner.zoo.store.file_of("shield-white").with_suffix(".json").read_text())
    curve = (out / "query_curve.md").read_text()
    assert f"{sidecar['queries']:,}" in curve and "white (reference)" in curve
    assert (out / "query_curve.png").stat().st_size > 0


def test_the_command_line_refuses_query_settings_it_cannot_honour(tmp_path):
    from click.testing import CliRunner

    from aeshield.cli import main

    base = ["train", "shield", "--classifier", "mnist-c", "--dataset", "mnist",
            "--out", str(tmp_path / "s.safetensors")]
    result = CliRunner().invoke(main, [*base, "--query-only", "label"])
    assert result.exit_code == 2 and "--surrogate ARCHITECTURE" in result.output
    result = CliRunner().invoke(main, [*base, "--defense", "magnet", "--query-only", "probs"])
    assert result.exit_code == 2 and "settings of aaa" in result.output
    assert not list(tmp_path.iterdir())  # refused before anything was written
