"""MAP guide for ``vi_toolkit.models.hmm``: point masses on theta = (pi, A, emission parameters).

The hidden states are summed out inside the model (forward algorithm), so the ELBO
with q(theta) = delta(theta - theta_hat) is log p(x | theta_hat) + log p(theta_hat),
maximised at the MAP estimate: the Bayesian counterpart of Baum-Welch.

Initialisation (:func:`hmm_init`): pi uniform, A = 0.5 I + 0.5/K (states persist);
Gaussian emissions from k-means on all observed steps (:func:`vi_toolkit.initialization.kmeans_init`),
categorical ones from the overall frequencies of the codes, each state's perturbed
by a seeded Dirichlet draw so that no two states start equal.
"""

import pyro
import pyro.distributions as dist
from torch.distributions import constraints

from vi_toolkit.initialization import hmm_init
from vi_toolkit.specs import Rebuildable


class MAPGuide(Rebuildable):
    """q(theta) = delta(theta - theta_hat) for a ``vi_toolkit.models.hmm.HiddenMarkovModel``.

    ``init`` holds the initial ``params`` (:func:`hmm_init`'s); None: :func:`hmm_init` on the
    data of the first call that creates the parameters (a fit's first batch).
    """

    SITES = {"initial": (constraints.simplex, 1), "transition": (constraints.simplex, 1),
             "locs": (constraints.real, 1), "scales": (constraints.positive, 1),
             "emission_probs": (constraints.simplex, 1)}

    def __init__(self, hmm, init=None):
        self.hmm, self.init = hmm, init

    def _point(self, site, sequences, lengths):
        constraint, event_dim = self.SITES[site]

        def initial():  # only when the parameter is created
            if self.init is None:
                self.init = hmm_init(self.hmm, sequences, lengths)
            return self.init[site].to(self.hmm._like(sequences))

        value = pyro.param(f"{site}_map", initial, constraint=constraint)
        return pyro.sample(site, dist.Delta(value, event_dim=event_dim))

    def __call__(self, sequences, lengths, num_data=None):
        self._point("initial", sequences, lengths)
        emission = ("locs", "scales") if self.hmm.emission == "gaussian" else ("emission_probs",)
        with pyro.plate("states", self.hmm.K, dim=-1):
            for site in ("transition",) + emission:
                self._point(site, sequences, lengths)

    def point_estimate(self, result):
        """theta_hat of a fit of this guide, as ``params`` for ``vi_toolkit.models.hmm``."""
        return {site: value for site in self.SITES
                if (value := result.params.get(f"{site}_map")) is not None}
