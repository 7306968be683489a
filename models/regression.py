"""Bayesian linear regression with a Gaussian prior and known noise.

    w ~ N(0, alpha^-1 I_D),    y_i | x_i, w ~ N(x_i^T w, sigma^2)

The posterior is N(m_N, S_N) with S_N^-1 = alpha I + X^T X / sigma^2 and
m_N = S_N X^T y / sigma^2 (Bishop, PRML eq. 3.53-3.54).
"""

import pyro
import pyro.distributions as dist
import torch

from vi_toolkit.plates import data_plate


def model(X, y, num_data=None, *, prior_precision=1.0, noise=1.0):
    """p(w) prod_i p(y_i | x_i, w) with ``X`` of shape (N, D) and ``y`` of shape (N,)."""
    D = X.shape[-1]
    w = pyro.sample("w", dist.Normal(X.new_zeros(D), prior_precision ** -0.5).to_event(1))
    with data_plate(X, num_data):
        pyro.sample("y", dist.Normal((X * w).sum(-1), noise), obs=y)


def posterior(X, y, *, prior_precision=1.0, noise=1.0):
    """The exact posterior of w given all the data: (mean, covariance)."""
    D = X.shape[-1]
    precision = prior_precision * torch.eye(D, dtype=X.dtype) + X.T @ X / noise**2
    cov = torch.linalg.inv(precision)
    return cov @ X.T @ y / noise**2, cov
