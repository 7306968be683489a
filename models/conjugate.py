"""Normal mean with a Normal prior and known noise, the conjugate toy model.

    mu ~ N(mu0, tau0^2),    x_i | mu ~ N(mu, sigma^2),  i = 1..N

The posterior is Normal with precision 1/tau_N^2 = 1/tau0^2 + N/sigma^2 and mean
mu_N = tau_N^2 (mu0/tau0^2 + sum_i x_i / sigma^2).
"""

import pyro
import pyro.distributions as dist

from vi_toolkit.plates import data_plate


def model(x, num_data=None, *, prior_loc=0.0, prior_scale=10.0, noise=1.0):
    """p(mu) prod_i p(x_i | mu) with ``x`` of shape (N,)."""
    mu = pyro.sample("mu", dist.Normal(x.new_tensor(prior_loc), x.new_tensor(prior_scale)))
    with data_plate(x, num_data):
        pyro.sample("x", dist.Normal(mu, noise), obs=x)


def posterior(x, *, prior_loc=0.0, prior_scale=10.0, noise=1.0):
    """The exact posterior of mu given all of ``x``: (mean, standard deviation)."""
    precision = 1.0 / prior_scale**2 + x.shape[0] / noise**2
    mean = (prior_loc / prior_scale**2 + x.sum() / noise**2) / precision
    return mean, precision ** -0.5
