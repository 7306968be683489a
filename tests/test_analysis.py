"""Posterior to ArviZ on the toolkit's models: groups, dims and shapes, values against the guide
and hand-written exact formulas, ArviZ's functions unchanged on the result, netCDF, model
comparison of mixtures by LOO, deterministic sites and autoguides, and the posterior-analysis
example."""

import json
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from test_evaluation import (D, Q, gmm_data, gmm_log_joint, hmm_data, np_hmm_log_likelihood,
                             ppca_data, ppca_fit, ppca_ml_params)

from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.guides import regression as regression_guide
from vi_toolkit.recipes import fit_gmm
from vi_toolkit.recipes import fit_hmm
from vi_toolkit.models import conjugate, regression
from vi_toolkit.models.gmm import GaussianMixture
from vi_toolkit.models.hmm import HiddenMarkovModel
from vi_toolkit import data_plate, fit, plots
from vi_toolkit.analysis import to_inference_data
from vi_toolkit.scripts import save_figure

az = pytest.importorskip("arviz")
warnings.filterwarnings("ignore", message="Shape validation failed")  # one chain of iid draws

GROUPS = {"posterior", "posterior_predictive", "log_likelihood", "sample_stats", "observed_data"}


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
    assert set(idata.groups()) == GROUPS
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
    for fn, name in ((plots.posterior_densities, "posterior"), (plots.posterior_predictive, "ppc")):
        path = save_figure(fn(idata), tmp_path, name)
        assert path == str(tmp_path / f"{name}.png") and (tmp_path / f"{name}.png").stat().st_size > 0


def test_regression_coefficients_get_named_dims():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=gen)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + torch.randn(40, generator=gen)
    result = fit(regression.model, regression_guide.guide, (X, y), elbo="meanfield", num_steps=200,
                 lr=0.1, progress=False, seed=0)
    idata = to_inference_data(result, (X, y), num_samples=100)
    assert idata.posterior["w"].dims == ("chain", "draw", "w_dim_0")
    assert idata.posterior["w"].shape == (1, 100, 3)
    assert idata.log_likelihood["y"].shape == (1, 100, 40)
    assert np.isfinite(az.loo(idata).elpd_loo)


def test_ppca_local_latents_and_their_conditional_likelihood(tmp_path):
    """PPCA (models/ppca.py) with the encoder at the exact posterior: z_i per draw and point, and
    log p(x_i | z_is) = log N(x_i | W z_is + mu, s^2 I) recomputed by hand from the draws."""
    x = ppca_data(30)
    params = ppca_ml_params(x)
    idata = to_inference_data(ppca_fit(x, params), x, num_samples=50, seed=0, path=tmp_path / "ppca.nc")
    assert set(idata.groups()) == GROUPS
    assert idata.posterior["z"].dims == ("chain", "draw", "data", "z_dim_0")
    assert idata.posterior["z"].shape == (1, 50, 30, Q)
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "data", "x_dim_0")
    assert idata.posterior_predictive["x"].shape == (1, 50, 30, D)
    z = idata.posterior["z"].values[0]
    W, mu, sigma = (params[k].numpy() for k in ("W", "mu", "sigma"))
    resid = (x.numpy() - z @ W.T - mu) / sigma
    expected = -0.5 * (resid**2).sum(-1) - D * (np.log(sigma) + 0.5 * np.log(2 * np.pi))
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], expected, rtol=1e-4, atol=1e-4)
    assert np.isfinite(az.loo(idata).elpd_loo)
    assert az.from_netcdf(tmp_path / "ppca.nc").posterior["z"].shape == (1, 50, 30, Q)


def test_mixture_assignments_are_drawn_from_their_exact_posterior(tmp_path):
    """models/gmm.py with a MAP guide: the assignments are summed out of the pointwise
    log-likelihood exactly and drawn from p(z_i | x_i, theta_hat); the data include points
    between two components, whose assignment is uncertain."""
    x = gmm_data(40)
    mixture = GaussianMixture(3, 2)
    result, guide = fit_gmm(mixture, x)
    theta = guide.point_estimate(result)
    between = torch.stack([torch.full((5,), 3.0), torch.linspace(-1.1, -0.7, 5)], -1)
    x = torch.cat([x, between])
    joint = gmm_log_joint(x, theta)
    responsibilities = joint.softmax(-1).numpy()
    assert ((responsibilities > 0.1) & (responsibilities < 0.9)).any(-1).sum() >= 3  # points
    S = 2000
    idata = to_inference_data(result, x, num_samples=S, seed=0, path=tmp_path / "gmm.nc")
    assert set(idata.groups()) == GROUPS
    assert idata.posterior["locs"].dims == ("chain", "draw", "components", "locs_dim_0")
    assert idata.posterior["locs"].shape == (1, S, 3, 2)
    assert idata.posterior["weights"].shape == (1, S, 3)
    np.testing.assert_allclose(idata.posterior["locs"].values[0, 0], theta["locs"].numpy())
    assert idata.posterior["z"].dims == ("chain", "draw", "data")
    exact = torch.logsumexp(joint, -1).numpy()
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "data")
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], np.broadcast_to(exact, (S, 45)),
                               atol=1e-4)
    z = idata.posterior["z"].values[0]  # (draws, data)
    frequencies = np.stack([(z == k).mean(0) for k in range(3)], -1)
    assert np.abs(frequencies - responsibilities).max() < 0.05  # 2000 draws: sd <= 0.011
    assert idata.posterior_predictive["x"].shape == (1, S, 45, 2)
    assert idata.observed_data["x"].dims == ("data", "x_dim_0")
    # a point mass: every draw the same, so PSIS-LOO is the plug-in log-likelihood
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert az.loo(idata).elpd_loo == pytest.approx(float(exact.sum()), abs=1e-2)
    assert az.from_netcdf(tmp_path / "gmm.nc").posterior["z"].shape == (1, S, 45)


def test_hmm_pointwise_likelihood_is_per_sequence_with_states_summed_out(tmp_path):
    """models/hmm.py: one log-likelihood per sequence, the states summed out by the forward
    algorithm, against the numpy forward algorithm."""
    sequences, lengths = hmm_data(20)
    result, guide = fit_hmm(HiddenMarkovModel(3, "gaussian"), sequences, lengths)
    theta = guide.point_estimate(result)
    idata = to_inference_data(result, (sequences, lengths), num_samples=30, seed=0,
                              path=tmp_path / "hmm.nc")
    assert set(idata.groups()) == GROUPS
    assert list(idata.log_likelihood.data_vars) == ["x"]
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "data")
    reference = np_hmm_log_likelihood(sequences, lengths, theta)
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0],
                               np.broadcast_to(reference, (30, 20)), atol=1e-3, rtol=1e-5)
    assert idata.posterior["transition"].dims == ("chain", "draw", "states", "transition_dim_0")
    assert idata.posterior["transition"].shape == (1, 30, 3, 3)
    T = sequences.shape[1]
    assert idata.observed_data["x"].shape == (20, T)  # the single emission dimension dropped
    assert idata.posterior_predictive["x"].shape == (1, 30, 20, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert az.loo(idata).elpd_loo == pytest.approx(float(reference.sum()), abs=1e-2)


def test_loo_ranks_the_true_number_of_mixture_components_first():
    """Mixtures of K = 1..5 components (models/gmm.py, mean-field guide) on data from three."""
    x = gmm_data(150)
    fits = {}
    for K in range(1, 6):
        result, _ = fit_gmm(GaussianMixture(K, 2), x, guide="meanfield", num_steps=150)
        fits[f"K={K}"] = to_inference_data(result, x, num_samples=200, seed=0,
                                           posterior_predictive=False)
    table = az.compare(fits)
    best = table.index[0]
    assert best in ("K=2", "K=3", "K=4")
    row = table.loc["K=3"]
    assert best == "K=3" or row["elpd_diff"] <= row["dse"]
    too_few = table.loc["K=2"]
    assert too_few["elpd_diff"] > too_few["dse"] + row["elpd_diff"]  # K=2 is clearly worse
    assert table.index[-1] == "K=1"


def test_posterior_analysis_example_quick(tmp_path, load_main, keep_threads, capsys):
    metrics = load_main("examples/posterior_analysis.py")(["--quick", "--out", str(tmp_path),
                                                          "--device", "cpu"])
    for name in ("gmm_k3.nc", "vae_test16.nc", "gmm_posterior.png", "gmm_ppc.png", "gmm_elbo.png",
                 "gmm_loo_compare.png", "sbc_conjugate.png", "vae_khat.png", "vae_elbo.png",
                 "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f) == json.loads(json.dumps(metrics, default=float))
    g = metrics["gmm"]
    assert abs(g["chosen_K"] - g["true_K"]) <= 1
    assert abs(g["map_heldout_exact"] - g["map_heldout_iwae"]) < 1e-3  # MAP: IWAE is exact
    assert g["true_params_heldout"] - 0.1 < g["map_heldout_exact"] < g["true_params_heldout"] + 0.1
    assert az.from_netcdf(tmp_path / "gmm_k3.nc").posterior["locs"].shape[-2:] == (3, 2)
    assert "K chosen by LOO" in capsys.readouterr().out


def located_model(x, num_data=None):
    """mu ~ N(0, 10^2), z_i ~ N(0, 1), loc_i = mu + z_i (deterministic), x_i ~ N(loc_i, 1)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with data_plate(x, num_data):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        loc = pyro.deterministic("loc", mu + z)  # Pyro's default event_dim: every dim of the value
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


@pytest.mark.parametrize("guide", [AutoNormal, AutoMultivariateNormal])
def test_posterior_holds_the_models_sites_with_deterministic_ones_per_draw_and_point(guide):
    """Issue 12, items 2 and 3: a deterministic site inside the data plate comes out as
    (chain, draw, data) and equals mu + z draw by draw, the observed site that uses it is redrawn
    around it, and the posterior holds the model's sites only, no autoguide internals."""
    x = 2.0 + torch.randn(10, generator=torch.Generator().manual_seed(0))
    result = fit(located_model, guide(located_model), x, num_steps=100, lr=0.05, progress=False, seed=0)
    idata = to_inference_data(result, x, num_samples=300, chunk_size=100, seed=0)
    assert set(idata.posterior.data_vars) == {"mu", "z", "loc"}
    assert set(az.summary(idata).index) == {"mu", *(f"{s}[{i}]" for s in ("z", "loc") for i in range(10))}
    post = idata.posterior
    assert post["loc"].dims == ("chain", "draw", "data") and post["loc"].shape == (1, 300, 10)
    np.testing.assert_allclose(post["loc"].values, post["mu"].values[..., None] + post["z"].values,
                               rtol=1e-5, atol=1e-5)
    rep = idata.posterior_predictive["x"]
    assert rep.shape == (1, 300, 10)
    assert abs(float((rep - post["loc"]).std()) - 1) < 0.1  # x_rep ~ N(loc, 1) at each draw
