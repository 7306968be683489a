"""Guides for ``vi_toolkit.models.gmm`` on the global parameters theta = (w, mu, sigma, L).

The assignments z_i are summed out by the enum ELBO, so neither guide has local sites.

* ``MAPGuide``: point masses q(theta) = delta(theta - theta_hat); the ELBO is then
  log p(x | theta_hat) + log p(theta_hat), maximised at the MAP estimate.
* ``MeanFieldGuide``: q(w) = Dir(c), q(mu_k) = N(m_k, diag s_k^2),
  q(sigma_kd) = LogNormal(a_kd, b_kd^2) and, for full covariances, L_k = T(u_k) with
  u_k ~ N(l_k, diag r_k^2) in R^{D(D-1)/2} and T the correlation-Cholesky transform.

Both start from :func:`kmeans_init` (the best of ``n_init`` k-means runs from k-means++
seedings, by within-cluster sum of squares), so a fit does not depend on a lucky draw;
:func:`fit_gmm` adds restarts from different seedings, keeping the best ELBO, and
:func:`select_K` fits K = 1..Kmax and scores each on held-out data.
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints
from torch.distributions.transforms import CorrCholeskyTransform

from vi_toolkit.models.gmm import GaussianMixture
from vi_toolkit.fit import fit


def _kmeans_pp(x, K, generator):
    """k-means++ seeding: each centre drawn with probability proportional to D(x)^2."""
    centres = [x[torch.randint(len(x), (1,), generator=generator)].squeeze(0)]
    for _ in range(1, K):
        d2 = torch.cdist(x, torch.stack(centres)).min(-1).values ** 2
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / len(x))
        centres.append(x[torch.multinomial(p, 1, generator=generator)].squeeze(0))
    return torch.stack(centres)


def _lloyd(x, centres, iterations):
    """Lloyd's iterations from ``centres`` until the labels stop changing: (centres, labels).

    Each iteration assigns every point to its nearest centre and moves each centre to
    the mean of its points (an empty cluster keeps its centre), all in one pass.
    """
    labels = torch.cdist(x, centres).argmin(-1)
    for _ in range(iterations):
        counts = torch.bincount(labels, minlength=len(centres)).unsqueeze(-1)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        new = torch.cdist(x, centres).argmin(-1)
        if torch.equal(new, labels):
            break
        labels = new
    return centres, labels


def kmeans_init(x, K, *, seed=0, n_init=5, iterations=20, max_points=20_000):
    """Initial ``params`` for ``vi_toolkit.models.gmm`` from k-means: weights, locs, scales (and L = I).

    The centres are the best of ``n_init`` runs of k-means++ seeding and up to
    ``iterations`` Lloyd steps (lowest within-cluster sum of squares), run on a random
    subset of ``max_points`` points when there are more (the centres of a large data set
    are estimated as well from a subset, at a fraction of the cost); every point is then
    assigned once, and the weights and scales (each cluster's standard deviations,
    floored at 1e-3 of the data's) come from all of them.
    """
    generator = torch.Generator().manual_seed(seed)
    x = x.detach().cpu().to(torch.get_default_dtype())
    subset = x if len(x) <= max_points else x[torch.randperm(len(x), generator=generator)[:max_points]]
    best = None
    for _ in range(n_init):
        centres, labels = _lloyd(subset, _kmeans_pp(subset, K, generator), iterations)
        inertia = ((subset - centres[labels]) ** 2).sum()
        if best is None or inertia < best[0]:
            best = (inertia, centres)
    centres = best[1]
    labels = torch.cdist(x, centres).argmin(-1)
    counts = torch.bincount(labels, minlength=K).to(x.dtype).unsqueeze(-1)
    variances = torch.zeros_like(centres).index_add_(0, labels, (x - centres[labels]) ** 2)
    floor = 1e-3 * x.std(0).clamp_min(1e-12)
    scales = torch.where(counts > 1, (variances / counts.clamp_min(1)).sqrt(), x.std(0)).clamp_min(floor)
    D = x.shape[-1]
    return {"weights": (counts.squeeze(-1) + 1) / (counts + 1).sum(), "locs": centres, "scales": scales,
            "corr_cholesky": torch.eye(D).expand(K, D, D).clone()}


def _initial(guide, x, name):
    """``guide.init[name]`` like ``x``; if ``guide.init`` is None, :func:`kmeans_init` on ``x``
    first (computed once and kept). Guides pass it to ``pyro.param`` in a lambda, so that
    it runs only when the parameter is created."""
    if guide.init is None:
        guide.init = kmeans_init(x, guide.mixture.K)
    return guide.init[name].to(x)


class MAPGuide:
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


class MeanFieldGuide:
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


# the MAP objective is deterministic: L-BFGS converges in tens of steps where Adam takes
# hundreds; the mean-field ELBO is a Monte Carlo estimate, so Adam
FIT_DEFAULTS = {"map": {"optimizer": "lbfgs", "lr": 1.0, "num_steps": 50, "tol_rel_obj": 1e-7},
                "meanfield": {"optimizer": "adam", "lr": 0.05, "num_steps": 800}}


def fit_gmm(mixture, x, *, guide="map", restarts=1, seed=0, val_x=None, **options):
    """Fit ``mixture`` to ``x`` from ``restarts`` k-means++ initialisations; keep the best ELBO.

    Returns ``(result, guide)``; ``guide.point_estimate(result)`` gives theta_hat. Other
    keyword ``options`` go to :func:`vi_toolkit.fit` (defaults: ``FIT_DEFAULTS[guide]``).
    """
    mixture.check(x)
    if val_x is not None:
        mixture.check(val_x, "val_x")
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {sorted(GUIDES)}, got {guide!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive integer, got {restarts!r}")
    options = {"progress": False, **FIT_DEFAULTS[guide], **options}
    best = None
    for r in range(restarts):
        g = GUIDES[guide](mixture, kmeans_init(x, mixture.K, seed=seed + r))
        result = fit(mixture.model, g, x, val_data=val_x, seed=seed + r, **options)
        if best is None or result.elbo > best[0].elbo:
            best = (result, g)
    return best


def select_K(x, val_x, Kmax, *, covariance="diag", **options):
    """Fit K = 1..Kmax; per K the training ELBO and the held-out log-likelihood per point.

    Returns a dict of lists ``K``, ``elbo``, ``heldout_loglik`` (exact, at theta_hat) and
    ``heldout_se`` (its standard error over the held-out points), ``fits`` (the
    ``(mixture, result, guide)`` of each K) and ``chosen_K``: the smallest K whose held-out
    log-likelihood is within one standard error of the best (the one-SE rule: a larger
    K must beat it by more than the noise of the held-out estimate).
    """
    if not isinstance(Kmax, int) or Kmax < 1:
        raise ValueError(f"Kmax must be an integer >= 1, got {Kmax!r}")
    curve = {"K": [], "elbo": [], "heldout_loglik": [], "heldout_se": [], "fits": []}
    for K in range(1, Kmax + 1):
        mixture = GaussianMixture(K, x.shape[-1], covariance)
        result, guide = fit_gmm(mixture, x, **options)
        heldout = mixture.log_likelihood(val_x, guide.point_estimate(result))
        curve["K"].append(K)
        curve["elbo"].append(result.elbo)
        curve["heldout_loglik"].append(float(heldout.mean()))
        curve["heldout_se"].append(float(heldout.std() / len(heldout) ** 0.5))
        curve["fits"].append((mixture, result, guide))
    best = max(range(Kmax), key=lambda i: curve["heldout_loglik"][i])
    threshold = curve["heldout_loglik"][best] - curve["heldout_se"][best]
    curve["chosen_K"] = next(K for K, ll in zip(curve["K"], curve["heldout_loglik"]) if ll >= threshold)
    return curve
