"""Fitted posteriors against closed forms: the conjugate Normal model and linear regression."""

import pytest
import torch

from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.guides import regression as regression_guide
from vi_toolkit.models import conjugate, regression
from vi_toolkit import fit

SETTINGS = dict(elbo="meanfield", lr=0.2, lr_schedule="exponential", num_particles=8,
                progress=False, seed=3)


@pytest.fixture(scope="module")
def normal_data():
    gen = torch.Generator().manual_seed(0)
    return 3.0 + torch.randn(200, generator=gen)


@pytest.mark.parametrize("batch", [None, 20], ids=["full-batch", "minibatch"])
def test_conjugate_posterior_matches_closed_form(normal_data, batch):
    mean, sd = conjugate.posterior(normal_data)
    steps = {"num_steps": 2000} if batch is None else {"num_epochs": 200}
    result = fit(conjugate.model, conjugate_guide.guide, normal_data, batch_size=batch,
                 **steps, **SETTINGS)
    p = result.params
    assert abs(p["mu_loc"] - mean) < 0.02 * abs(mean)
    assert abs(p["mu_scale"] - sd) < 0.02 * sd


def test_regression_posterior_mean_and_covariance_match_closed_form():
    gen = torch.Generator().manual_seed(1)
    N, D = 100, 3
    Z = torch.randn(N, D, generator=gen)
    X = Z.clone()
    X[:, 1] = 0.8 * Z[:, 0] + 0.6 * Z[:, 1]  # correlated inputs: a non-diagonal posterior
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + torch.randn(N, generator=gen)
    mean, cov = regression.posterior(X, y)
    result = fit(regression.model, regression_guide.guide, (X, y), num_steps=3000,
                 **{**SETTINGS, "lr": 0.05})
    L = result.params["w_scale_tril"]
    fitted_cov = L @ L.T
    sd = cov.diagonal().sqrt()
    assert torch.allclose(result.params["w_loc"], mean, atol=0.1 * sd.min())
    assert torch.allclose(fitted_cov.diagonal().sqrt(), sd, rtol=0.05)
    corr = lambda c: c[0, 1] / (c[0, 0] * c[1, 1]).sqrt()  # noqa: E731
    assert corr(cov) < -0.5  # the test is about a correlated posterior
    assert abs(corr(fitted_cov) - corr(cov)) < 0.05
