"""Held-out evaluation against exact answers: IWAE vs the exact log-likelihood, exact marginals
of mixtures and HMMs, inference gaps against closed-form KL divergences, checkpoints."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from vi_toolkit import data_plate, fit
from vi_toolkit.evaluation import (evaluate, inference_gaps, load_fit, log_likelihood_per_point,
                                   pointwise_estimates)
from vi_toolkit.fit import FitResult

# ---- a linear-Gaussian (PPCA-like) model with an amortized guide: log p(x) is exact -------------
D, LATENT, NOISE = 6, 2, 0.5
W_INIT = torch.randn(D, LATENT, generator=torch.Generator().manual_seed(1))


def linear_model(x, num_data=None):
    """z_i ~ N(0, I_2), x_i | z_i ~ N(W z_i, 0.5^2 I_6): x_i ~ N(0, W W^T + 0.25 I) exactly."""
    W = pyro.param("W", W_INIT.clone())
    with data_plate(x, num_data):
        z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T, NOISE).to_event(1), obs=x)


def linear_guide(x, num_data=None):
    """Amortized diagonal Gaussian q(z_i | x_i) = N(A x_i, diag exp(2 s)): a linear encoder."""
    A = pyro.param("A", torch.zeros(LATENT, D))
    log_scale = pyro.param("log_scale", torch.zeros(LATENT))
    with data_plate(x, num_data):
        pyro.sample("z", dist.Normal(x @ A.T, log_scale.exp()).to_event(1))


def linear_data(n=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(D, LATENT, generator=gen)
    return torch.randn(n, LATENT, generator=gen) @ W.T + NOISE * torch.randn(n, D, generator=gen)


def linear_exact(params, x):
    """Exact log p(x_i), the exact posterior p(z_i | x_i) and the encoder's q(z_i | x_i)."""
    W = params["W"]
    log_px = dist.MultivariateNormal(torch.zeros(D), W @ W.T + NOISE**2 * torch.eye(D)).log_prob(x)
    precision = torch.eye(LATENT) + W.T @ W / NOISE**2
    cov = torch.linalg.inv(precision)
    posterior = dist.MultivariateNormal(x @ (cov @ W.T).T / NOISE**2, cov)
    encoder = dist.MultivariateNormal(x @ params["A"].T, torch.diag((2 * params["log_scale"]).exp()))
    return log_px, posterior, encoder


@pytest.fixture(scope="module")
def linear_fit():
    x = linear_data()
    result = fit(linear_model, linear_guide, x, num_steps=200, lr=0.05, progress=False, seed=0)
    return result, x


# ---- a Gaussian mixture and an HMM with enumerated discrete latents and fixed parameters --------
WEIGHTS, LOCS = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([-3.0, 0.0, 3.0])


def gmm_model(x, num_data=None):
    """z_i ~ Cat(pi), x_i | z_i ~ N(mu_{z_i}, 1), z_i summed out by enumeration."""
    with data_plate(x, num_data):
        z = pyro.sample("z", dist.Categorical(WEIGHTS), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(LOCS[z], 1.0), obs=x)


def gmm_sampled_model(x, num_data=None):
    """The same mixture with z_i sampled by the guide instead of enumerated."""
    with data_plate(x, num_data):
        z = pyro.sample("z", dist.Categorical(WEIGHTS))
        pyro.sample("x", dist.Normal(LOCS[z], 1.0), obs=x)


def gmm_exact_posterior_guide(x, num_data=None):
    """q(z_i | x_i) = p(z_i | x_i), the responsibilities."""
    with data_plate(x, num_data):
        pyro.sample("z", dist.Categorical(logits=gmm_joint(x)))


def no_latents(*args, **kwargs):
    """The exact posterior when the model has no latent left to infer."""


def gmm_joint(x):
    return WEIGHTS.log() + dist.Normal(LOCS, 1.0).log_prob(x[:, None])


def gmm_data(n=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return LOCS[torch.multinomial(WEIGHTS, n, True, generator=gen)] + torch.randn(n, generator=gen)


T_STEPS, TRANSITION, EMISSION_LOCS = 6, torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([-1.0, 1.0])


def hmm_model(y, num_data=None):
    """s_0 ~ Cat(1/2, 1/2), s_t | s_{t-1} ~ Cat(A[s_{t-1}]), y_t | s_t ~ N(m_{s_t}, 1), per sequence."""
    with data_plate(y, num_data):
        state = None
        for t in pyro.markov(range(T_STEPS)):
            probs = torch.full((2,), 0.5) if state is None else TRANSITION[state]
            state = pyro.sample(f"s_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample(f"y_{t}", dist.Normal(EMISSION_LOCS[state], 1.0), obs=y[:, t])


def hmm_forward(y):
    """log p(y_{1:T}) of each sequence by the forward algorithm."""
    emission = dist.Normal(EMISSION_LOCS, 1.0).log_prob(y[..., None])  # (N, T, 2)
    alpha = math.log(0.5) + emission[:, 0]
    for t in range(1, T_STEPS):
        alpha = torch.logsumexp(alpha[:, :, None] + TRANSITION.log(), 1) + emission[:, t]
    return torch.logsumexp(alpha, -1)


def fixed_result(model, guide):
    """A FitResult for a model and guide without parameters (nothing to fit)."""
    return FitResult(model, guide, {}, {}, {"params": {}, "constraints": {}}, torch.device("cpu"),
                     "fixed")


# ---- tests -------------------------------------------------------------------------------------
def test_iwae_rises_with_k_towards_the_exact_log_likelihood(linear_fit):
    result, x = linear_fit
    log_px, posterior, encoder = linear_exact(result.params, x)
    exact = float(log_px.mean())
    exact_elbo = float((log_px - kl_divergence(encoder, posterior)).mean())
    bounds = {k: evaluate(result, x, num_samples=k, chunk_size=128, seed=k)["iwae"]
              for k in (1, 10, 100, 1000)}
    assert bounds[1] < bounds[10] < bounds[100] <= bounds[1000] + 1e-3
    assert exact_elbo < exact - 0.02  # the diagonal guide leaves a visible gap to close
    assert exact - bounds[1000] < 0.1 * (exact - exact_elbo)
    assert bounds[1000] < exact + 0.01


def test_heldout_elbo_matches_the_closed_form_per_point(linear_fit):
    result, x = linear_fit
    log_px, posterior, encoder = linear_exact(result.params, x)
    exact_elbo = log_px - kl_divergence(encoder, posterior)
    est = pointwise_estimates(result, x, num_samples=4000, batch_size=64, chunk_size=1000, seed=0)
    assert est["elbo"].shape == (x.shape[0],)
    assert (est["elbo"] - exact_elbo).abs().max() < 0.05
    assert (est["log_likelihood"] - log_px).abs().max() < 0.05
    assert (est["log_likelihood"] >= est["elbo"] - 1e-4).all()  # Jensen, sample by sample


def test_chunks_and_batches_give_the_same_estimate(linear_fit):
    result, x = linear_fit
    one = log_likelihood_per_point(result, x, num_samples=1000, batch_size=200, chunk_size=1000, seed=1)
    many = log_likelihood_per_point(result, x, num_samples=1000, batch_size=64, chunk_size=77, seed=2)
    exact = linear_exact(result.params, x)[0]
    assert (one - many).abs().mean() < 0.02  # Monte Carlo error only
    assert (many - exact).abs().mean() < 0.02


def test_mixture_marginal_equals_the_importance_estimate_with_the_exact_posterior():
    x = gmm_data()
    exact = torch.logsumexp(gmm_joint(x), -1)
    enumerated = pointwise_estimates(fixed_result(gmm_model, no_latents), x, num_samples=5,
                                     batch_size=25)
    sampled = pointwise_estimates(fixed_result(gmm_sampled_model, gmm_exact_posterior_guide), x,
                                  num_samples=50, chunk_size=20, batch_size=25)
    for est in (enumerated, sampled):  # log w = log p(x_i) for every draw: no variance
        torch.testing.assert_close(est["log_likelihood"], exact, atol=1e-4, rtol=0)
        torch.testing.assert_close(est["elbo"], exact, atol=1e-4, rtol=0)


def test_hmm_marginal_equals_the_forward_algorithm():
    y = torch.randn(30, T_STEPS, generator=torch.Generator().manual_seed(3))
    est = pointwise_estimates(fixed_result(hmm_model, no_latents), y, num_samples=3, batch_size=8)
    torch.testing.assert_close(est["log_likelihood"], hmm_forward(y), atol=1e-4, rtol=0)


def test_evaluate_reports_the_exact_marginal_beside_the_estimate(linear_fit):
    result, x = linear_fit

    def exact(x):
        return linear_exact(result.params, x)[0]

    report = evaluate(result, x[:50], num_samples=500, exact=exact, seed=0)
    assert report["num_data"] == 50 and report["elbo"] < report["iwae"]
    assert 0 <= report["exact_minus_iwae"] < 0.02
    assert report["exact_minus_iwae"] == pytest.approx(report["exact"] - report["iwae"])


def test_inference_gaps_match_the_closed_form_kl_divergences(linear_fit):
    result, x = linear_fit
    x = x[:40]
    params = result.params
    log_px, posterior, encoder = linear_exact(params, x)
    # the best diagonal Gaussian for a Gaussian posterior N(m, S): mean m, variances 1/diag(S^-1)
    best = dist.MultivariateNormal(posterior.loc, torch.diag_embed(1 / torch.diagonal(
        posterior.precision_matrix, dim1=-2, dim2=-1)))
    approximation = kl_divergence(best, posterior)
    amortization = kl_divergence(encoder, posterior) - approximation
    report = inference_gaps(result, x, refine_steps=300, elbo_samples=2000, seed=0,
                            exact=lambda x: linear_exact(params, x)[0])
    assert report["exact"]
    assert abs(report["approximation_gap"] - float(approximation.mean())) < 0.01
    assert abs(report["amortization_gap"] - float(amortization.mean())) < 0.01
    assert report["inference_gap"] == pytest.approx(report["approximation_gap"]
                                                    + report["amortization_gap"], abs=1e-5)
    iwae = inference_gaps(result, x, refine_steps=30, elbo_samples=500, num_samples=2000, seed=0)
    assert not iwae["exact"] and abs(iwae["log_px"] - float(log_px.mean())) < 0.02


def test_load_fit_restores_a_checkpoint(tmp_path, linear_fit):
    x = linear_data(100, seed=5)
    path = tmp_path / "fit.pt"
    result = fit(linear_model, linear_guide, x, num_steps=50, lr=0.05, progress=False, seed=0,
                 checkpoint=path)
    loaded = load_fit(linear_model, linear_guide, x[:3], path, device="cpu")
    for name, value in result.params.items():
        torch.testing.assert_close(loaded.params[name], value)
    assert loaded.history["elbo"] == result.history["elbo"]
    with pytest.raises(ValueError, match="does not match"):
        load_fit(gmm_sampled_model, gmm_exact_posterior_guide, x[:3, 0], path, device="cpu")


def test_bad_input_is_a_clear_value_error(linear_fit):
    result, x = linear_fit
    with pytest.raises(ValueError, match="num_samples"):
        evaluate(result, x, num_samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate(result, x, chunk_size=-1)
    with pytest.raises(ValueError, match="result must be a FitResult"):
        evaluate(linear_model, x)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(result, torch.full((3, D), float("nan")))
    with pytest.raises(ValueError, match="site must name"):
        inference_gaps(result, x[:5], site="w", refine_steps=1)
    with pytest.raises(ValueError, match="lr"):
        inference_gaps(result, x[:5], lr=0.0)


def test_cli_evaluates_a_checkpoint(tmp_path, capsys):
    from guides import conjugate as conjugate_guide
    from models import conjugate
    from vi_toolkit.cli import main
    from vi_toolkit.evaluation import evaluate_checkpoint

    x = 3.0 + torch.randn(40, generator=torch.Generator().manual_seed(0))
    fit(conjugate.model, conjugate_guide.guide, x, elbo="meanfield", num_steps=200, lr=0.1,
        progress=False, seed=0, checkpoint=tmp_path / "fit.pt")
    torch.save(x, tmp_path / "x.pt")
    argv = ["evaluate", str(tmp_path / "fit.pt"), "--model", "models.conjugate:model",
            "--guide", "guides.conjugate:guide", "--model-kwargs", '{"prior_scale": 10.0}',
            "--data", str(tmp_path / "x.pt"), "--num-samples", "300", "--khat-samples", "500",
            "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = evaluate_checkpoint(tmp_path / "fit.pt", conjugate.model, conjugate_guide.guide, x,
                                 num_samples=300, khat_samples=500, device="cpu", seed=0)
    assert f"{report['iwae']:.6g}" in out and f"{report['elbo']:.6g}" in out
    assert "PSIS k-hat (joint)" in out and report["reading"] == "good"
    # the predictive density of a new point under q(mu) ~ N(x_bar, 1/N): N(x_bar, 1 + 1/N)
    mean, sd = conjugate.posterior(x)
    exact = dist.Normal(mean, (1 + sd**2) ** 0.5).log_prob(x).mean()
    assert abs(report["iwae"] - float(exact)) < 0.01
    assert main(argv[:3] + ["no_such_module:model"] + argv[4:]) == 2
    assert "cannot import 'no_such_module'" in capsys.readouterr().err
