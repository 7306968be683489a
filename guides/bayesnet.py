"""MAP guide for ``vi_toolkit.models.bayesnet``: a point mass on every conditional probability table.

The latent nodes are summed out by the enum ELBO, so with q(theta) = delta(theta - theta_hat)
the ELBO is log p(x_O | theta_hat) + log p(theta_hat), maximised at the MAP estimate (EM's
fixed point, the Dirichlet priors adding alpha - 1 pseudo-counts).

It starts from :func:`vi_toolkit.initialization.bayesnet_init`;
:func:`vi_toolkit.recipes.fit_bayesnet` fits it by full-batch L-BFGS and keeps the best of
``restarts`` initialisations: with latent nodes the likelihood has several local maxima, as for EM.
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from vi_toolkit.initialization import bayesnet_init
from vi_toolkit.models.bayesnet import CPT_PREFIX, BayesianNetwork
from vi_toolkit.specs import Rebuildable


class MAPGuide(Rebuildable):
    """q(theta) = delta(theta - theta_hat) for a ``BayesianNetwork``.

    ``init`` holds the initial CPTs (:func:`bayesnet_init`'s); None: ``bayesnet_init(net)``.
    """

    def __init__(self, net: BayesianNetwork, init: dict | None = None):
        self.net = net
        self.init = bayesnet_init(net) if init is None else init

    def __call__(self, num_data: int | None = None, **evidence: torch.Tensor) -> None:
        like = evidence[self.net.observed[0]]
        for node in self.net.nodes:
            site = CPT_PREFIX + node.name
            cpt = pyro.param(f"{site}_map",
                             lambda: self.init[node.name].to(device=like.device, dtype=torch.get_default_dtype()),
                             constraint=constraints.simplex)
            pyro.sample(site, dist.Delta(cpt, event_dim=cpt.dim()))

    def point_estimate(self, result) -> dict:
        """theta_hat of a fit of this guide: ``{name: CPT}`` for ``vi_toolkit.models.bayesnet``."""
        return {node.name: result.params[f"{CPT_PREFIX}{node.name}_map"] for node in self.net.nodes}
