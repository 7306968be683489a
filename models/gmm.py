"""Gaussian mixture with K components in D dimensions, the assignments summed out exactly.

    w ~ Dir(alpha 1_K)
    mu_k ~ N(0, s_mu^2 I_D)                           k = 1..K
    sigma_kd ~ LogNormal(m_sigma, s_sigma^2)          d = 1..D (standard deviations)
    L_k ~ LKJCholesky(D, eta)                         (covariance="full" only)
    Sigma_k = diag(sigma_k) L_k L_k^T diag(sigma_k)   (covariance="diag": L_k = I)
    z_i | w ~ Cat(w)                                  i = 1..N
    x_i | z_i ~ N(mu_{z_i}, Sigma_{z_i})

z_i is marked ``infer={"enumerate": "parallel"}``: the enum ELBO replaces
log p(x_i | z_i) by the exact log p(x_i | theta) = logsumexp_k (log w_k + log N(x_i | mu_k,
Sigma_k)), so a guide only needs the global parameters theta = (w, mu, sigma, L). Given
theta the responsibilities are p(z_i = k | x_i, theta) = w_k N(x_i | mu_k, Sigma_k) /
p(x_i | theta), and ``infer_discrete`` at temperature 0 gives the MAP assignments.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import infer_discrete
from pyro.ops.indexing import Vindex

from vi_toolkit.plates import data_plate
from vi_toolkit.specs import Rebuildable

COVARIANCES = ("diag", "full")


class GaussianMixture(Rebuildable):
    """The mixture's prior and likelihood; ``model(x, num_data)`` is the Pyro program.

    ``params`` below is a dict of point values of the global sites: ``weights`` (K,),
    ``locs`` (K, D), ``scales`` (K, D) and, for ``covariance="full"``, ``corr_cholesky``
    (K, D, D); guides return it from their ``point_estimate``.
    """

    def __init__(self, K, D, covariance="diag", *, concentration=1.0, loc_scale=10.0,
                 scale_loc=0.0, scale_scale=2.0, eta=1.0):
        if not isinstance(K, int) or K < 1:
            raise ValueError(f"K (the number of components) must be an integer >= 1, got {K!r}")
        if not isinstance(D, int) or D < 1:
            raise ValueError(f"D (the data dimension) must be an integer >= 1, got {D!r}")
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        self.K, self.D, self.covariance = K, D, covariance
        self.full = covariance == "full" and D > 1  # a 1x1 correlation is always 1
        self.concentration, self.loc_scale, self.eta = concentration, loc_scale, eta
        self.scale_loc, self.scale_scale = scale_loc, scale_scale

    def __repr__(self):
        return f"GaussianMixture(K={self.K}, D={self.D}, covariance={self.covariance!r})"

    def check(self, x, name="x"):
        """Raise a ValueError unless ``x`` is (N, D) data for this mixture."""
        if x.dim() != 2 or x.shape[-1] != self.D:
            raise ValueError(f"{name} must have shape (N, {self.D}) for this mixture of {self.D}-"
                             f"dimensional components, got {tuple(x.shape)}")

    def model(self, x, num_data=None):
        self.check(x)
        K, D = self.K, self.D
        weights = (pyro.sample("weights", dist.Dirichlet(x.new_full((K,), self.concentration)))
                   if K > 1 else x.new_ones(1))
        with pyro.plate("components", K, dim=-1):
            locs = pyro.sample("locs", dist.Normal(x.new_zeros(D), self.loc_scale).to_event(1))
            scales = pyro.sample("scales", dist.LogNormal(x.new_full((D,), self.scale_loc),
                                                          self.scale_scale).to_event(1))
            corr = (pyro.sample("corr_cholesky", dist.LKJCholesky(D, x.new_tensor(self.eta)))
                    if self.full else None)
        with data_plate(x, num_data, dim=-1):
            # z_i ~ Cat(pi), by its log-weights: taken once, where probs would take them per point
            z = pyro.sample("z", dist.Categorical(logits=weights.log()), infer={"enumerate": "parallel"})
            pyro.sample("x", self._component(locs, scales, corr, z), obs=x)

    def _component(self, locs, scales, corr, z=None):
        """N(mu_z, Sigma_z), or the K components N(mu_k, Sigma_k) when ``z`` is None.

        The parameters' batch dims left of the components (vectorized particles, at
        dims left of the data plate) get a data dim, so that they line up with ``z``'s.
        """
        if z is not None:
            locs = Vindex(locs.unsqueeze(-3))[..., z, :]
            scales = Vindex(scales.unsqueeze(-3))[..., z, :]
            corr = None if corr is None else Vindex(corr.unsqueeze(-4))[..., z, :, :]
        if corr is None:
            return dist.Normal(locs, scales).to_event(1)
        return dist.MultivariateNormal(locs, scale_tril=scales.unsqueeze(-1) * corr)

    # -- exact quantities for point values of the global parameters -------------------------
    def _components(self, params):
        corr = params["corr_cholesky"] if self.full else None
        return self._component(params["locs"], params["scales"], corr)

    def covariances(self, params):
        """Sigma_k (K, D, D) from ``params``."""
        component = self._components(params)
        return (component.covariance_matrix if self.full
                else torch.diag_embed(component.base_dist.scale ** 2))

    def joint_log_density(self, x, params):
        """(N, K): log w_k + log N(x_i | mu_k, Sigma_k)."""
        self.check(x)
        component = self._components(params)
        weights = params.get("weights", x.new_ones(1))
        return weights.log() + component.log_prob(x.unsqueeze(-2))

    def log_likelihood(self, x, params):
        """Exact log p(x_i | theta) per point (N,): logsumexp over the components."""
        return self.joint_log_density(x, params).logsumexp(-1)

    def responsibilities(self, x, params):
        """p(z_i = k | x_i, theta), shape (N, K); each row sums to one."""
        return self.joint_log_density(x, params).softmax(-1)

    def map_assignments(self, x, params):
        """argmax_k p(z_i = k | x_i, theta) for each point, by ``infer_discrete`` (temperature 0)."""
        self.check(x)
        sites = ("weights", "locs", "scales") + (("corr_cholesky",) if self.full else ())
        conditioned = poutine.condition(self.model, data={s: params[s] for s in sites if s in params})
        decoder = infer_discrete(conditioned, first_available_dim=-2, temperature=0)
        return poutine.trace(decoder).get_trace(x).nodes["z"]["value"]

    def simulate(self, params, n, *, generator=None):
        """Draw ``n`` points from the mixture with parameters ``params``: (x, z)."""
        weights = params.get("weights", torch.ones(1))
        z = torch.multinomial(weights, n, replacement=True, generator=generator)
        L = torch.linalg.cholesky(self.covariances(params))
        eps = torch.randn(n, self.D, generator=generator, dtype=L.dtype)
        return params["locs"][z] + (L[z] @ eps.unsqueeze(-1)).squeeze(-1), z
