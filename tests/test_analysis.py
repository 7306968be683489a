"""Posterior to ArviZ: groups, dims and shapes, values against the guide and the exact model,
ArviZ's functions unchanged on the result, netCDF, and model comparison of mixtures by LOO."""

import warnings

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from test_evaluation import (LATENT, fixed_result, gmm_data, gmm_joint, gmm_model, hmm_forward,
                             hmm_model, linear_data, linear_guide, linear_model, no_latents)

from examples.posterior_analysis import bayesian_gmm
from guides import conjugate as conjugate_guide
from guides import regression as regression_guide
from models import conjugate, regression
from vi_toolkit import fit, plots
from vi_toolkit.analysis import to_inference_data

az = pytest.importorskip("arviz")
warnings.filterwarnings("ignore", message="Shape validation failed")


@pytest.fixture(scope="module")
def conjugate_fit():
    x = 3.0 + torch.randn(50, generator=torch.Generator().manual_seed(0))
    result = fit(conjugate.model, conjugate_guide.guide, x, elbo="meanfield", num_particles=4,
                 num_steps=400, lr=0.1, progress=False, seed=0)
    return result, x


def test_conjugate_inference_data_groups_dims_and_values(conjugate_fit, tmp_path):
    result, x = conjugate_fit
    idata = to_inference_data(result, x, num_samples=400, chunk_size=150, seed=0,
                              path=tmp_path / "conjugate.nc")
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "log_likelihood",
                                   "sample_stats", "observed_data"}
    assert idata.posterior["mu"].dims == ("chain", "draw") and idata.posterior["mu"].shape == (1, 400)
    for group in ("posterior_predictive", "log_likelihood"):
        assert getattr(idata, group)["x"].dims == ("chain", "draw", "data")
        assert getattr(idata, group)["x"].shape == (1, 400, 50)
    assert idata.observed_data["x"].dims == ("data",)
    np.testing.assert_allclose(idata.observed_data["x"].values, x.numpy())
    # the draws are the guide's q(mu) = N(m, s^2)
    p = result.params
    mu = idata.posterior["mu"].values.ravel()
    assert abs(mu.mean() - float(p["mu_loc"])) < 4 * float(p["mu_scale"]) / 20
    assert abs(mu.std() / float(p["mu_scale"]) - 1) < 0.15
    # pointwise log-likelihood, recomputed from the draws; x_rep ~ N(mu_s, 1)
    expected = dist.Normal(torch.as_tensor(mu)[:, None], 1.0).log_prob(x).numpy()
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], expected, rtol=1e-5, atol=1e-5)
    resid = idata.posterior_predictive["x"].values[0] - mu[:, None]
    assert abs(resid.std() - 1) < 0.05
    lp = expected.sum(1) + dist.Normal(0.0, 10.0).log_prob(torch.as_tensor(mu)).numpy()
    np.testing.assert_allclose(idata.sample_stats["lp"].values[0], lp, rtol=1e-4)
    # ArviZ, unchanged
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo) and (loo.pareto_k.values < 0.7).all()
    assert "mu" in az.summary(idata).index
    back = az.from_netcdf(tmp_path / "conjugate.nc")
    np.testing.assert_allclose(back.posterior["mu"].values, idata.posterior["mu"].values)
    for fn, name in ((plots.posterior_densities, "posterior.png"),
                     (plots.posterior_predictive, "ppc.png")):
        assert fn(idata, tmp_path / name) == tmp_path / name and (tmp_path / name).stat().st_size > 0


def test_regression_and_local_latents_get_named_dims():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=gen)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + torch.randn(40, generator=gen)
    result = fit(regression.model, regression_guide.guide, (X, y), elbo="meanfield", num_steps=200,
                 lr=0.1, progress=False, seed=0)
    idata = to_inference_data(result, (X, y), num_samples=100)
    assert idata.posterior["w"].dims == ("chain", "draw", "w_dim_0")
    assert idata.posterior["w"].shape == (1, 100, 3)
    assert idata.log_likelihood["y"].shape == (1, 100, 40)
    x = linear_data(30)
    result = fit(linear_model, linear_guide, x, num_steps=20, progress=False, seed=0)
    idata = to_inference_data(result, x, num_samples=50, posterior_predictive=False)
    assert idata.posterior["z"].dims == ("chain", "draw", "data", "z_dim_0")
    assert idata.posterior["z"].shape == (1, 50, 30, LATENT)
    assert idata.log_likelihood["x"].shape == (1, 50, 30)  # the pixels' event dim summed
    assert "posterior_predictive" not in idata.groups()


def test_enumerated_assignments_are_drawn_from_their_exact_posterior():
    x = gmm_data(40)
    idata = to_inference_data(fixed_result(gmm_model, no_latents), x, num_samples=2000, seed=0)
    exact = torch.logsumexp(gmm_joint(x), -1).numpy()
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], np.broadcast_to(exact, (2000, 40)),
                               atol=1e-4)
    z = idata.posterior["z"].values[0]  # (draws, data)
    responsibilities = gmm_joint(x).softmax(-1).numpy()
    frequencies = np.stack([(z == k).mean(0) for k in range(3)], -1)
    assert np.abs(frequencies - responsibilities).max() < 0.05  # 2000 draws: sd <= 0.011
    assert idata.posterior_predictive["x"].shape == (1, 2000, 40)


def test_hmm_pointwise_likelihood_is_per_sequence_with_states_summed_out():
    y = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
    idata = to_inference_data(fixed_result(hmm_model, no_latents), y, num_samples=20)
    assert list(idata.log_likelihood.data_vars) == ["joint"]
    np.testing.assert_allclose(idata.log_likelihood["joint"].values[0],
                               np.broadcast_to(hmm_forward(y).numpy(), (20, 12)), atol=1e-4)
    assert idata.posterior["s_0"].shape == (1, 20, 12)


def test_loo_ranks_the_true_number_of_mixture_components_first():
    gen = torch.Generator().manual_seed(0)
    truth = torch.tensor([-4.0, 0.0, 4.0])
    x = truth[torch.randint(3, (150,), generator=gen)] + torch.randn(150, generator=gen)
    fits = {}
    for K in range(1, 6):
        model, guide = bayesian_gmm(K)
        result = fit(model, guide, x, num_steps=100, lr=0.1, num_particles=2, progress=False, seed=0)
        fits[f"K={K}"] = to_inference_data(result, x, num_samples=200, seed=0,
                                           posterior_predictive=False)
        assert fits[f"K={K}"].posterior["locs"].dims == ("chain", "draw", "components")
    table = az.compare(fits)
    best = table.index[0]
    assert best in ("K=2", "K=3", "K=4")
    row = table.loc["K=3"]
    assert best == "K=3" or row["elpd_diff"] <= row["dse"]
    assert table.index[-1] == "K=1"  # one component is far worse
