"""Probabilistic PCA: the ELBO reaches Tipping & Bishop's L_max, checked against numpy."""

import numpy as np
import pytest
import torch

from vi_toolkit.guides.ppca import LinearEncoder, PointwiseGuide
from vi_toolkit.models.ppca import PPCA
from vi_toolkit import fit

D, Q, N = 5, 2, 500


# -- independent references in numpy ----------------------------------------------------------
def np_gauss_loglik(x, mean, cov):
    d = x - mean
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (x.shape[1] * np.log(2 * np.pi) + logdet + np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d))


def np_ppca_ml(x, q):
    """Maximum likelihood by eigen-decomposition; L_max as the log-density of the data at it."""
    mu = x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(x.T, bias=True))
    evals, evecs = evals[::-1], evecs[:, ::-1]
    s2 = evals[q:].mean()
    W = evecs[:, :q] * np.sqrt(evals[:q] - s2)
    return W, mu, s2, np_gauss_loglik(x, mu, W @ W.T + s2 * np.eye(x.shape[1])).mean()


def np_elbo(x, W, mu, s2, means, cov):
    """Exact ELBO per point for q(z_i) = N(means_i, cov_i): E_q log p(x|z) - KL(q || N(0, I))."""
    q = W.shape[1]
    cov = np.broadcast_to(cov, (len(x), q, q))
    resid = x - means @ W.T - mu
    trace_wsw = np.einsum("ij,njk,ik->n", W, cov, W)
    expected_loglik = -0.5 * (x.shape[1] * np.log(2 * np.pi * s2) + ((resid ** 2).sum(1) + trace_wsw) / s2)
    kl = 0.5 * (np.trace(cov, axis1=1, axis2=2) + (means ** 2).sum(1) - q - np.linalg.slogdet(cov)[1])
    return (expected_loglik - kl).mean()


@pytest.fixture(scope="module")
def x():
    gen = torch.Generator().manual_seed(0)
    W = 2 * torch.randn(D, Q, generator=gen)
    return torch.randn(N, Q, generator=gen) @ W.T + 1.0 + 0.5 * torch.randn(N, D, generator=gen)


def fitted(result):
    p = {k: v.double().numpy() for k, v in PPCA.params(result).items()}
    return p["W"], p["mu"], p["sigma"] ** 2


def test_closed_form_matches_numpy(x):
    params, L_max = PPCA(D, Q).closed_form(x)
    W, mu, s2, L_np = np_ppca_ml(x.double().numpy(), Q)
    assert abs(L_max - L_np) < 1e-4 * abs(L_np)
    assert np.isclose(float(params["sigma"]) ** 2, s2, rtol=1e-4)
    assert np.allclose((params["W"] @ params["W"].T).numpy(), W @ W.T, atol=1e-3)
    assert np.allclose(PPCA(D, Q).log_likelihood(x, params).mean().item(), L_np, rtol=1e-5)


def test_amortized_linear_encoder_reaches_L_max(x):
    ppca = PPCA(D, Q)
    result = fit(ppca.model, LinearEncoder(ppca), x, lr=0.05, num_steps=2000, num_particles=16,
                 lr_schedule="cosine", seed=0, progress=False)
    W, mu, s2 = fitted(result)
    W_ml, _, s2_ml, L_max = np_ppca_ml(x.double().numpy(), Q)
    means, cov = (t.double().numpy() for t in LinearEncoder.encode(result, x))
    elbo = np_elbo(x.double().numpy(), W, mu, s2, means, cov)
    assert elbo <= L_max + 1e-4  # a lower bound
    assert L_max - elbo < 0.01
    assert np.isclose(s2, s2_ml, rtol=0.01)
    C, C_ml = W @ W.T, W_ml @ W_ml.T
    assert np.linalg.norm(C - C_ml) < 0.02 * np.linalg.norm(C_ml)
    # the encoder is the exact posterior: mean M^-1 W^T (x - mu), covariance s2 M^-1
    M = W.T @ W + s2 * np.eye(Q)
    assert np.allclose(cov, s2 * np.linalg.inv(M), atol=2e-3)
    assert np.allclose(means, np.linalg.solve(M, W.T @ (x.double().numpy() - mu).T).T, atol=0.02)


def test_pointwise_guide_with_minibatches_and_an_index(x):
    ppca = PPCA(D, Q)
    result = fit(ppca.model, PointwiseGuide(ppca, N), (x, torch.arange(N)), lr=0.05, batch_size=250,
                 num_epochs=1000, lr_schedule="cosine", seed=0, progress=False)
    W, mu, s2 = fitted(result)
    L_max = np_ppca_ml(x.double().numpy(), Q)[3]
    p = result.params
    elbo = np_elbo(x.double().numpy(), W, mu, s2, p["z_loc"].double().numpy(),
                   np.stack([np.diag(s ** 2) for s in p["z_scale"].double().numpy()]))
    assert elbo <= L_max + 1e-4
    assert L_max - elbo < 0.05  # the diagonal family costs little: the optimum orthogonalises W
    ll = np_gauss_loglik(x.double().numpy(), mu, W @ W.T + s2 * np.eye(D)).mean()
    assert L_max - ll < 0.02


def test_bad_input_is_a_value_error_naming_it(x):
    with pytest.raises(ValueError, match=r"q \(the latent dimension\) must be an integer in 1..4"):
        PPCA(5, 5)
    ppca = PPCA(4, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 4\) for this PPCA model, got \(500, 5\)"):
        fit(ppca.model, LinearEncoder(ppca), x, num_steps=2, progress=False)
    params, _ = PPCA(D, Q).closed_form(x)
    with pytest.raises(ValueError, match=r"shape \(N, 5\)"):
        PPCA(D, Q).log_likelihood(x[:, :3], params)
