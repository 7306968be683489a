"""MAP guide for ``vi_toolkit.models.discriminant``: point masses on theta = (pi, mu, sigma, L).

The classes z_i are summed out by the enum ELBO (the observed labels fix them), so the
ELBO with q(theta) = delta(theta - theta_hat) is log p(x, y_observed | theta_hat) +
log p(theta_hat), maximised at the MAP estimate: with all labels observed the
closed-form LDA estimates (up to the priors' pull), with none the EM of a tied-covariance
mixture, with some its semi-supervised EM.

It starts from :func:`vi_toolkit.initialization.discriminant_init` (labelled class means,
k-means centres for classes without labels); :func:`vi_toolkit.recipes.fit_discriminant` fits
it by full-batch L-BFGS, with restarts from different k-means seedings when labels are missing.
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from vi_toolkit.initialization import discriminant_init
from vi_toolkit.models.discriminant import LinearDiscriminant
from vi_toolkit.specs import Rebuildable


class MAPGuide(Rebuildable):
    """q(theta) = delta(theta - theta_hat) for a ``LinearDiscriminant``.

    ``init`` holds the initial ``params`` (:func:`discriminant_init`'s); None:
    :func:`discriminant_init` on the data of the first call that creates the parameters.
    """

    SITES = {"weights": (constraints.simplex, 1), "locs": (constraints.real, 1),
             "scales": (constraints.positive, 1), "corr_cholesky": (constraints.corr_cholesky, 2)}

    def __init__(self, lda: LinearDiscriminant, init: dict | None = None):
        self.lda, self.init = lda, init

    def _point(self, site, x, y, labelled):
        constraint, event_dim = self.SITES[site]

        def initial():  # only when the parameter is created
            if self.init is None:
                self.init = discriminant_init(self.lda, x, y, labelled)
            return self.init[site].to(x)

        value = pyro.param(f"{site}_map", initial, constraint=constraint)
        return pyro.sample(site, dist.Delta(value, event_dim=event_dim))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor,
                 num_data: int | None = None) -> None:
        self._point("weights", x, y, labelled)
        with pyro.plate("classes", self.lda.K, dim=-1):
            self._point("locs", x, y, labelled)
        self._point("scales", x, y, labelled)
        if self.lda.full:
            self._point("corr_cholesky", x, y, labelled)

    def point_estimate(self, result) -> dict:
        """theta_hat of a fit of this guide, as ``params`` for ``vi_toolkit.models.discriminant``."""
        return {site: value for site in self.SITES
                if (value := result.params.get(f"{site}_map")) is not None}
