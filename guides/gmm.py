"""Guides for ``vi_toolkit.models.gmm`` on the global parameters theta = (w, mu, sigma, L).

The assignments z_i are summed out by the enum ELBO, so neither guide has local sites.

* ``MAPGuide``: point masses q(theta) = delta(theta - theta_hat); the ELBO is then
  log p(x | theta_hat) + log p(theta_hat), maximised at the MAP estimate.
* ``MeanFieldGuide``: q(w) = Dir(c), q(mu_k) = N(m_k, diag s_k^2),
  q(sigma_kd) = LogNormal(a_kd, b_kd^2) and, for full covariances, L_k = T(u_k) with
  u_k ~ N(l_k, diag r_k^2) in R^{D(D-1)/2} and T the correlation-Cholesky transform.

Both start from :func:`vi_toolkit.initialization.kmeans_init` (the best of ``n_init``
k-means runs), so a fit does not depend on a lucky draw; :mod:`vi_toolkit.recipes` adds
restarts (``fit_gmm``) and the choice of K on held-out data (``select_K``).
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints
from torch.distributions.transforms import CorrCholeskyTransform

from vi_toolkit.initialization import kmeans_init
from vi_toolkit.specs import Rebuildable


def _initial(guide, x, name):
    """``guide.init[name]`` like ``x``; if ``guide.init`` is None, :func:`kmeans_init` on ``x``
    first (computed once and kept). Guides pass it to ``pyro.param`` in a lambda, so that
    it runs only when the parameter is created."""
    if guide.init is None:
        guide.init = kmeans_init(x, guide.mixture.K)
    return guide.init[name].to(x)


class MAPGuide(Rebuildable):
    """q(theta) = delta(theta - theta_hat): the MAP estimate of the mixture's parameters.

    ``init`` holds the initial ``params`` (:func:`kmeans_init`'s); None: k-means on the data
    of the first call (a fit's first batch; a checkpoint's values then replace them).
    """

    def __init__(self, mixture, init=None):
        self.mixture, self.init = mixture, init

    def __call__(self, x, num_data=None):
        m = self.mixture
        if m.K > 1:
            weights = pyro.param("weights_map", lambda: _initial(self, x, "weights"),
                                 constraint=constraints.simplex)
            pyro.sample("weights", dist.Delta(weights, event_dim=1))
        locs = pyro.param("locs_map", lambda: _initial(self, x, "locs"))
        scales = pyro.param("scales_map", lambda: _initial(self, x, "scales"),
                            constraint=constraints.positive)
        with pyro.plate("components", m.K, dim=-1):
            pyro.sample("locs", dist.Delta(locs, event_dim=1))
            pyro.sample("scales", dist.Delta(scales, event_dim=1))
            if m.full:
                corr = pyro.param("corr_cholesky_map", lambda: _initial(self, x, "corr_cholesky"),
                                  constraint=constraints.corr_cholesky)
                pyro.sample("corr_cholesky", dist.Delta(corr, event_dim=2))

    def point_estimate(self, result):
        """theta_hat of a fit of this guide, as ``params`` for ``vi_toolkit.models.gmm``."""
        p = result.params
        return {site: p[f"{site}_map"] for site in ("weights", "locs", "scales", "corr_cholesky")
                if f"{site}_map" in p}


class MeanFieldGuide(Rebuildable):
    """q(w) q(mu) q(sigma) q(L): Dirichlet, Normal, LogNormal and transformed-Normal factors.

    ``init`` as for :class:`MAPGuide`.
    """

    def __init__(self, mixture, init=None, *, init_scale=0.05):
        self.mixture, self.init, self.init_scale = mixture, init, init_scale

    def __call__(self, x, num_data=None):
        m = self.mixture
        n = x.shape[0] if num_data is None else num_data
        positive = constraints.positive
        if m.K > 1:
            c = pyro.param("weights_concentration", lambda: _initial(self, x, "weights") * n,
                           constraint=positive)
            pyro.sample("weights", dist.Dirichlet(c))
        loc_m = pyro.param("locs_loc", lambda: _initial(self, x, "locs"))
        loc_s = pyro.param("locs_scale", torch.full_like(loc_m, self.init_scale), constraint=positive)
        scale_a = pyro.param("scales_loc", lambda: _initial(self, x, "scales").log())
        scale_b = pyro.param("scales_scale", torch.full_like(scale_a, self.init_scale),
                             constraint=positive)
        with pyro.plate("components", m.K, dim=-1):
            pyro.sample("locs", dist.Normal(loc_m, loc_s).to_event(1))
            pyro.sample("scales", dist.LogNormal(scale_a, scale_b).to_event(1))
            if m.full:
                size = m.D * (m.D - 1) // 2
                corr_l = pyro.param("corr_loc", x.new_zeros(m.K, size))
                corr_r = pyro.param("corr_scale", x.new_full((m.K, size), self.init_scale),
                                    constraint=positive)
                pyro.sample("corr_cholesky", dist.TransformedDistribution(
                    dist.Normal(corr_l, corr_r).to_event(1), CorrCholeskyTransform()))

    def point_estimate(self, result):
        """E_q[w], E_q[mu], the median of q(sigma) and T(l): point values for ``vi_toolkit.models.gmm``."""
        p = result.params
        est = {"locs": p["locs_loc"], "scales": p["scales_loc"].exp()}
        if "weights_concentration" in p:
            est["weights"] = p["weights_concentration"] / p["weights_concentration"].sum()
        if "corr_loc" in p:
            est["corr_cholesky"] = CorrCholeskyTransform()(p["corr_loc"])
        return est


GUIDES = {"map": MAPGuide, "meanfield": MeanFieldGuide}
