import numpy as np
import pytest
import torch

from aeshield.defenses.gmm import GaussianMixtureClassifier, LatentGMMClassifier, Softened, fit_gmm


def _random_gmm(c=3, k=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    gmm = GaussianMixtureClassifier(c, k, d).double()
    a = torch.randn(c, k, d, d, generator=g, dtype=torch.float64)
    gmm.covariances.copy_(a @ a.transpose(-1, -2) + 0.5 * torch.eye(d, dtype=torch.float64))
    gmm.means.copy_(torch.randn(c, k, d, generator=g, dtype=torch.float64) * 3)
    w = torch.rand(c, k, generator=g, dtype=torch.float64) + 0.1
    gmm.weights.copy_(w / w.sum(1, keepdim=True))
    return gmm


def test_class_densities_match_sklearn_score_samples():
    mixture = pytest.importorskip("sklearn.mixture")
    gmm = _random_gmm()
    z = torch.randn(50, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    ours = gmm.class_log_density(z)
    for c in range(3):
        ref = mixture.GaussianMixture(n_components=2, covariance_type="full")
        ref.weights_ = gmm.weights[c].numpy()
        ref.means_ = gmm.means[c].numpy()
        ref.covariances_ = gmm.covariances[c].numpy()
        ref.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(ref.covariances_))
        np.testing.assert_allclose(ours[:, c].numpy(), ref.score_samples(z.numpy()), rtol=1e-8, atol=1e-8)


def test_em_recovers_separated_classes_and_is_differentiable():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    y = torch.arange(3).repeat_interleave(200)
    z = centres[y] + torch.randn(600, 2, generator=g)
    gmm = GaussianMixtureClassifier(3, 2, 2).fit(z, y, iterations=50)
    assert (gmm(z).argmax(1) == y).float().mean() > 0.98
    model = LatentGMMClassifier(torch.nn.Flatten(), gmm, in_shape=(2,))
    x = z[:5].clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x), y[:5]).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    soft = Softened(model, 10.0)
    assert torch.equal(soft(z).argmax(1), model(z).argmax(1))


def test_em_increases_likelihood_over_its_initialisation():
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(300, 2, generator=g) - 4, torch.randn(300, 2, generator=g) + 4])
    w, mu, cov = fit_gmm(z, 2, iterations=50, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(w, torch.tensor([0.5, 0.5]), atol=0.05)
    assert torch.allclose(mu.sort(0).values[:, 0], torch.tensor([-4.0, 4.0]), atol=0.3)


def test_fit_refuses_classes_with_too_few_examples():
    gmm = GaussianMixtureClassifier(2, 3, 2)
    with pytest.raises(ValueError, match="at least 3 examples"):
        gmm.fit(torch.randn(4, 2), torch.tensor([0, 0, 0, 1]))
