"""Probabilistic PCA (Tipping & Bishop 1999), the lecture's linear auto-encoder.

    z_i ~ N(0, I_q),    x_i | z_i ~ N(W z_i + mu, sigma^2 I_D),    i = 1..N

W (D x q), mu and sigma are parameters (maximum likelihood, type II); z_i is local.
The marginal is x_i ~ N(mu, C) with C = W W^T + sigma^2 I, and the posterior is
Gaussian, p(z_i | x_i) = N(M^-1 W^T (x_i - mu), sigma^2 M^-1), M = W^T W + sigma^2 I: a
linear encoder with a covariance shared by all points, which ``vi_toolkit.guides.ppca.LinearEncoder``
contains exactly, so its ELBO can reach max log p(x).

The maximum of the log-likelihood is in closed form (:func:`closed_form`): with S the
sample covariance, eigenvalues l_1 >= ... >= l_D and eigenvectors U_q::

    mu = mean(x),  sigma^2 = 1/(D - q) sum_{j>q} l_j,  W = U_q (diag(l_1..l_q) - sigma^2 I)^(1/2) R

for any rotation R, and::

    L_max / N = -1/2 (D log 2 pi + sum_{j<=q} log l_j + (D - q) log sigma^2 + D).
"""

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from vi_toolkit.plates import data_plate
from vi_toolkit.specs import Rebuildable


class PPCA(Rebuildable):
    """PPCA with ``D`` observed and ``q`` latent dimensions; ``model(x, index, num_data)``.

    ``index`` (the positions of the batch's points in the data set) is only read by
    per-point guides; the model ignores it. ``params`` below is a dict ``W``, ``mu``,
    ``sigma`` (the noise standard deviation).
    """

    def __init__(self, D, q):
        if not isinstance(D, int) or D < 1:
            raise ValueError(f"D (the data dimension) must be an integer >= 1, got {D!r}")
        if not isinstance(q, int) or not 1 <= q < D:
            raise ValueError(f"q (the latent dimension) must be an integer in 1..{D - 1}, got {q!r}")
        self.D, self.q = D, q

    def __repr__(self):
        return f"PPCA(D={self.D}, q={self.q})"

    def check(self, x, name="x"):
        """Raise a ValueError unless ``x`` is (N, D) data for this model."""
        if x.dim() != 2 or x.shape[-1] != self.D:
            raise ValueError(f"{name} must have shape (N, {self.D}) for this PPCA model, got "
                             f"{tuple(x.shape)}")

    def model(self, x, index=None, num_data=None):
        self.check(x)
        W = pyro.param("W", lambda: 0.1 * torch.randn(self.D, self.q, dtype=x.dtype, device=x.device))
        mu = pyro.param("mu", lambda: x.mean(0))
        sigma = pyro.param("sigma", lambda: x.std(), constraint=constraints.positive)
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.q), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + mu, sigma).to_event(1), obs=x)

    @staticmethod
    def params(result):
        """The fitted ``W``, ``mu``, ``sigma`` of a FitResult."""
        return {k: result.params[k] for k in ("W", "mu", "sigma")}

    def log_likelihood(self, x, params):
        """Exact log p(x_i) = log N(x_i | mu, W W^T + sigma^2 I) per point (N,)."""
        self.check(x)
        C = params["W"] @ params["W"].T + params["sigma"] ** 2 * torch.eye(self.D, dtype=x.dtype,
                                                                             device=x.device)
        return dist.MultivariateNormal(params["mu"], covariance_matrix=C).log_prob(x)

    def posterior(self, x, params):
        """p(z_i | x_i) = N(M^-1 W^T (x_i - mu), sigma^2 M^-1): (means (N, q), covariance (q, q))."""
        self.check(x)
        W, s2 = params["W"], params["sigma"] ** 2
        M = W.T @ W + s2 * torch.eye(self.q, dtype=W.dtype, device=W.device)
        return torch.linalg.solve(M, W.T @ (x - params["mu"]).T).T, s2 * torch.linalg.inv(M)

    def closed_form(self, x):
        """Tipping & Bishop's maximum-likelihood solution (R = I) and L_max per point.

        Returns ``params`` (``W``, ``mu``, ``sigma``) and ``L_max`` (per data point).
        """
        self.check(x)
        mu = x.mean(0)
        S = (x - mu).T @ (x - mu) / x.shape[0]
        evals, evecs = torch.linalg.eigh(S)
        evals, evecs = evals.flip(0), evecs.flip(1)
        s2 = evals[self.q:].mean()
        if not s2 > 1e-6 * evals[0].clamp_min(0):
            rank = int((evals > 1e-6 * evals[0]).sum())
            raise ValueError(f"x has (numerical) rank {rank}: its variance outside the top q={self.q} "
                             f"directions is {float(s2):.3g}, so sigma^2 = 0 and the likelihood has no "
                             f"maximum; use q < {rank} or add noise to the data")
        W = evecs[:, :self.q] * (evals[:self.q] - s2).clamp_min(0).sqrt()
        L_max = -0.5 * (self.D * math.log(2 * math.pi) + evals[:self.q].log().sum()
                        + (self.D - self.q) * s2.log() + self.D)
        return {"W": W, "mu": mu, "sigma": s2.sqrt()}, float(L_max)
