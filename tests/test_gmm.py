"""Gaussian mixtures: recovery of known parameters, and agreement with an independent numpy EM."""

import numpy as np
import pytest
import torch

from vi_toolkit import DivergenceError, recipes
from vi_toolkit.initialization import kmeans_init
from vi_toolkit.recipes import fit_gmm, select_K
from vi_toolkit.models.gmm import GaussianMixture

TRUE = {"weights": torch.tensor([0.5, 0.3, 0.2]),
        "locs": torch.tensor([[-4.0, 0.0], [3.0, 3.0], [3.0, -3.0]]),
        "scales": torch.tensor([[1.0, 0.6], [0.7, 1.2], [0.8, 0.8]]),
        "corr_cholesky": torch.linalg.cholesky(torch.tensor([[[1.0, 0.5], [0.5, 1.0]],
                                                             [[1.0, -0.3], [-0.3, 1.0]],
                                                             [[1.0, 0.0], [0.0, 1.0]]]))}


# -- an independent reference: EM for a Gaussian mixture, in numpy ------------------------------
def np_log_gauss(x, mean, cov):
    """log N(x | mean, cov) for the rows of x."""
    d = x - mean
    sign, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d)
    return -0.5 * (x.shape[1] * np.log(2 * np.pi) + logdet + maha)


def np_mixture_loglik(x, w, means, covs):
    """Per point log sum_k w_k N(x | mean_k, cov_k), and the responsibilities."""
    logp = np.stack([np.log(w[k]) + np_log_gauss(x, means[k], covs[k]) for k in range(len(w))], 1)
    top = logp.max(1, keepdims=True)
    ll = top[:, 0] + np.log(np.exp(logp - top).sum(1))
    return ll, np.exp(logp - ll[:, None])


def np_em(x, K, *, diag=False, restarts=3, iterations=100, seed=0):
    """Maximum-likelihood EM from random data points as means; the best of ``restarts``."""
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        means = x[rng.choice(len(x), K, replace=False)]
        covs = np.stack([np.cov(x.T) for _ in range(K)])
        w = np.full(K, 1.0 / K)
        for _ in range(iterations):
            ll, r = np_mixture_loglik(x, w, means, covs)
            nk = r.sum(0)
            w, means = nk / len(x), (r.T @ x) / nk[:, None]
            for k in range(K):
                d = x - means[k]
                covs[k] = (r[:, k, None] * d).T @ d / nk[k] + 1e-6 * np.eye(x.shape[1])
                if diag:
                    covs[k] = np.diag(np.diag(covs[k]))
        ll = np_mixture_loglik(x, w, means, covs)[0].mean()
        if best is None or ll > best[0]:
            best = (ll, w, means, covs)
    return best[1:]


@pytest.fixture(scope="module")
def data():
    mixture = GaussianMixture(3, 2, "full")
    gen = torch.Generator().manual_seed(0)
    x, z = mixture.simulate(TRUE, 1500, generator=gen)
    x_test, z_test = mixture.simulate(TRUE, 1500, generator=gen)
    return x, x_test, z_test


def match(est_locs, true_locs):
    """For each true component, the index of the nearest estimated one (a permutation)."""
    order = torch.cdist(true_locs, est_locs).argmin(-1)
    assert sorted(order.tolist()) == list(range(len(true_locs)))
    return order


@pytest.mark.parametrize("guide", ["map", "meanfield"])
def test_full_covariance_recovers_parameters_and_matches_em(data, guide):
    x, x_test, _ = data
    mixture = GaussianMixture(3, 2, "full")
    result, g = fit_gmm(mixture, x, guide=guide, seed=0)
    est = g.point_estimate(result)
    order = match(est["locs"], TRUE["locs"])
    assert torch.allclose(est["locs"][order], TRUE["locs"], atol=0.15)
    assert torch.allclose(est["weights"][order], TRUE["weights"], atol=0.04)
    cov_est, cov_true = mixture.covariances(est)[order], mixture.covariances(TRUE)
    assert ((cov_est - cov_true).norm(dim=(-2, -1)) / cov_true.norm(dim=(-2, -1))).max() < 0.15
    w, means, covs = np_em(x.double().numpy(), 3)
    em_heldout = np_mixture_loglik(x_test.double().numpy(), w, means, covs)[0].mean()
    heldout = mixture.log_likelihood(x_test, est).mean().item()
    assert abs(heldout - em_heldout) < 0.02


def test_diagonal_map_matches_diagonal_em(data):
    x, x_test, _ = data
    mixture = GaussianMixture(3, 2, "diag")
    result, g = fit_gmm(mixture, x, guide="map", seed=1, restarts=2)
    est = g.point_estimate(result)
    w, means, covs = np_em(x.double().numpy(), 3, diag=True)
    em_heldout = np_mixture_loglik(x_test.double().numpy(), w, means, covs)[0].mean()
    assert abs(mixture.log_likelihood(x_test, est).mean().item() - em_heldout) < 0.02
    order = match(est["locs"], torch.as_tensor(means, dtype=torch.float32))
    assert np.allclose(est["scales"][order].numpy() ** 2, np.diagonal(covs, axis1=1, axis2=2), rtol=0.02)


def test_exact_log_likelihood_responsibilities_and_map_assignments(data):
    _, x_test, z_test = data
    mixture = GaussianMixture(3, 2, "full")
    covs = mixture.covariances(TRUE).double().numpy()
    ll_np, r_np = np_mixture_loglik(x_test.double().numpy(), TRUE["weights"].double().numpy(),
                                    TRUE["locs"].double().numpy(), covs)
    assert np.allclose(mixture.log_likelihood(x_test, TRUE).numpy(), ll_np, rtol=1e-5, atol=1e-5)
    resp = mixture.responsibilities(x_test, TRUE)
    assert np.allclose(resp.numpy(), r_np, atol=1e-5)
    assignments = mixture.map_assignments(x_test, TRUE)
    assert torch.equal(assignments, resp.argmax(-1))
    assert (assignments == z_test).float().mean() > 0.97  # well separated: few points ambiguous


def test_kmeans_init_is_deterministic_and_finds_the_clusters(data):
    x = data[0]
    a, b = kmeans_init(x, 3, seed=4), kmeans_init(x, 3, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    match(a["locs"], TRUE["locs"])  # one centre per true component
    assert torch.cdist(TRUE["locs"], a["locs"]).min(-1).values.max() < 0.3


def test_select_K_peaks_at_the_true_number_of_components(data):
    x, x_test, _ = data
    curve = select_K(x[:600], x_test[:600], 4, covariance="full")
    heldout = curve["heldout_loglik"]
    assert heldout[2] > heldout[1] + 0.1 > heldout[0] + 0.2  # K = 3 explains much more
    assert heldout[3] < heldout[2] + 0.01  # a fourth component does not help on new data
    assert curve["elbo"][2] > curve["elbo"][1]
    assert curve["chosen_K"] == 3



def test_a_K_whose_fit_diverges_is_named_and_left_out_of_the_choice(data, monkeypatch):
    """A diverging K (as K = 4 full covariances on 96 points of two clusters did on one CPU)
    must not end the whole curve, nor be chosen: a warning names it, its figures are NaN."""
    x, x_test, _ = data
    real_fit = recipes.fit_gmm

    def fit_or_diverge(mixture, x, **options):
        if mixture.K == 3:
            raise DivergenceError("the loss became NaN or infinite at step 4", step=4, last_elbo=None,
                                  site="model site 'scales'", result=None)
        return real_fit(mixture, x, **options)

    monkeypatch.setattr(recipes, "fit_gmm", fit_or_diverge)
    with pytest.warns(UserWarning, match=r"K = 3 diverged .*step 4"):
        curve = select_K(x[:600], x_test[:600], 4, covariance="full")
    assert curve["K"] == [1, 2, 3, 4] and list(curve["diverged"]) == [3] and curve["fits"][2] is None
    assert np.isnan(curve["heldout_loglik"][2]) and np.isnan(curve["elbo"][2])
    assert curve["chosen_K"] == 4  # the true K = 3 diverged: K = 4 explains the data best of the rest
    monkeypatch.setattr(recipes, "fit_gmm", lambda mixture, x, **options: fit_or_diverge(
        type(mixture)(3, 2, "full"), x))
    with pytest.raises(ValueError, match="every K = 1..2 diverged"), pytest.warns(UserWarning):
        select_K(x[:600], x_test[:600], 2, covariance="full")

def test_bad_input_is_a_value_error_naming_it(data):
    x = data[0]
    for K in (0, -1, 2.5):
        with pytest.raises(ValueError, match="K .*must be an integer >= 1"):
            GaussianMixture(K, 2)
    with pytest.raises(ValueError, match="covariance must be one of"):
        GaussianMixture(2, 2, "spherical")
    mixture = GaussianMixture(2, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3\) .* got \(1500, 2\)"):
        fit_gmm(mixture, x)
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        GaussianMixture(3, 2, "full").log_likelihood(torch.zeros(5, 3), TRUE)
    with pytest.raises(ValueError, match="guide must be one of"):
        fit_gmm(GaussianMixture(2, 2), x, guide="laplace")


def test_iwae_sums_out_the_assignments_exactly():
    """With point masses on theta and the assignments enumerated, every importance weight is
    p(x | theta_hat) p(theta_hat): the IWAE loss equals Pyro's enumerated ELBO, minibatch too."""
    from pyro.infer import TraceEnum_ELBO

    from vi_toolkit.guides.gmm import MAPGuide
    from vi_toolkit import make_elbo

    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(30, 2, generator=gen) - 3, torch.randn(20, 2, generator=gen) + 3])
    mixture = GaussianMixture(2, 2, "full")
    guide = MAPGuide(mixture, kmeans_init(x, 2))
    iwae = make_elbo("iwae", num_particles=4, enumerated=True)
    enum = TraceEnum_ELBO(max_plate_nesting=1)
    for batch, num_data in ((x, None), (x[::2], 50)):  # N/B = 2 scales the local terms
        loss = iwae.loss(mixture.model, guide, batch, num_data=num_data)
        assert loss == pytest.approx(enum.loss(mixture.model, guide, batch, num_data=num_data), rel=1e-5)
