"""MAP guide for ``vi_toolkit.models.bayesnet``: a point mass on every conditional probability table.

The latent nodes are summed out by the enum ELBO, so with q(theta) = delta(theta - theta_hat)
the ELBO is log p(x_O | theta_hat) + log p(theta_hat), maximised at the MAP estimate (EM's
fixed point, the Dirichlet priors adding alpha - 1 pseudo-counts).

Initialisation (:func:`bayesnet_init`): every CPT row is the mean of the uniform
distribution and a seeded Dir(1) draw, so that no two states of a latent node start equal
(equal states would be a saddle point the gradient never leaves). :func:`fit_bayesnet` fits
by full-batch L-BFGS and keeps the best of ``restarts`` initialisations: with latent nodes
the likelihood has several local maxima, as for EM.
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from vi_toolkit import FitResult, fit
from vi_toolkit.models.bayesnet import CPT_PREFIX, BayesianNetwork
from vi_toolkit.specs import Rebuildable


def bayesnet_init(net: BayesianNetwork, *, seed: int = 0) -> dict:
    """Initial CPTs ``{name: CPT}`` for ``net`` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    init = {}
    for node in net.nodes:
        shape = net.cpt_shape(node.name)
        draw = -torch.rand(shape, generator=generator).log()  # Exp(1); normalised, a Dir(1) draw
        init[node.name] = 0.5 * (draw / draw.sum(-1, keepdim=True) + 1.0 / node.cardinality)
    return init


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

    def point_estimate(self, result: FitResult) -> dict:
        """theta_hat of a fit of this guide: ``{name: CPT}`` for ``vi_toolkit.models.bayesnet``."""
        return {node.name: result.params[f"{CPT_PREFIX}{node.name}_map"] for node in self.net.nodes}


# the MAP objective is deterministic and smooth: full-batch L-BFGS, whose every step (up to 20
# line-searched iterations) is worth a convergence check (log_every=1: 4 to 6 steps, not 20)
FIT_DEFAULTS = {"optimizer": "lbfgs", "lr": 1.0, "num_steps": 100, "tol_rel_obj": 1e-8, "progress": False,
                "options": {"log_every": 1}}


def fit_bayesnet(net: BayesianNetwork, data: dict, *, restarts: int = 1, seed: int = 0,
                 val_data: dict | None = None, **options) -> tuple[FitResult, MAPGuide]:
    """Fit ``net``'s CPTs by MAP to ``data`` (the observed nodes); keep the best of ``restarts`` fits.

    Args:
        net: the network.
        data: ``{name: (N,) integer tensor}`` for exactly the observed nodes.
        restarts: fits from the initialisations ``bayesnet_init(net, seed=seed + r)``.
        seed: the first seed (of the initialisation and of the fit).
        val_data: held-out data of the same structure.
        **options: passed to :func:`vi_toolkit.fit` (defaults: ``FIT_DEFAULTS``).

    Returns:
        ``(result, guide)``; ``guide.point_estimate(result)`` gives the CPTs.

    Raises:
        ValueError: naming the node, if the data do not fit ``net``; or if ``restarts`` is not
            a positive integer.
    """
    net.check(data)
    if val_data is not None:
        net.check(val_data)
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive integer, got {restarts!r}")
    options = {**FIT_DEFAULTS, **options}
    best = None
    for r in range(restarts):
        guide = MAPGuide(net, bayesnet_init(net, seed=seed + r))
        result = fit(net.model, guide, data, val_data=val_data, seed=seed + r, **options)
        if best is None or result.elbo > best[0].elbo:
            best = (result, guide)
    return best
