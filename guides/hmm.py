"""MAP guide for ``vi_toolkit.models.hmm``: point masses on theta = (pi, A, emission parameters).

The hidden states are summed out inside the model (forward algorithm), so the ELBO
with q(theta) = delta(theta - theta_hat) is log p(x | theta_hat) + log p(theta_hat),
maximised at the MAP estimate: the Bayesian counterpart of Baum-Welch.

Initialisation (:func:`hmm_init`): pi uniform, A = 0.5 I + 0.5/K (states persist);
Gaussian emissions from k-means on all observed steps (``vi_toolkit.guides.gmm.kmeans_init``),
categorical ones from the overall frequencies of the codes, each state's perturbed
by a seeded Dirichlet draw so that no two states start equal.
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from vi_toolkit.guides.gmm import kmeans_init
from vi_toolkit.models.hmm import length_mask
from vi_toolkit.fit import fit


def hmm_init(hmm, sequences, lengths, *, seed=0):
    """Initial ``params`` for ``hmm`` from the data (see the module docstring)."""
    hmm.check(sequences, lengths)
    K = hmm.K
    observed = sequences[length_mask(lengths, sequences.shape[1])]
    init = {"initial": torch.full((K,), 1.0 / K),
            "transition": 0.5 * torch.eye(K) + 0.5 / K}
    if hmm.emission == "gaussian":
        centres = kmeans_init(observed, K, seed=seed)
        init.update(locs=centres["locs"], scales=centres["scales"])
    else:
        gen = torch.Generator().manual_seed(seed)
        freq = torch.bincount(observed.cpu(), minlength=hmm.C).to(torch.get_default_dtype()) + 1
        freq = freq / freq.sum()
        noise = -torch.rand(K, hmm.C, generator=gen).log()  # Exp(1): normalised, a Dir(1) draw
        init["emission_probs"] = freq * (noise / noise.sum(-1, keepdim=True) + 1.0 / hmm.C)
        init["emission_probs"] /= init["emission_probs"].sum(-1, keepdim=True)
    return init


class MAPGuide:
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


def fit_hmm(hmm, sequences, lengths, *, seed=0, restarts=1, optimizer="lbfgs", lr=1.0,
            num_steps=30, tol_rel_obj=1e-7, **options):
    """MAP fit of ``hmm`` from ``restarts`` initialisations (:func:`hmm_init`); the best ELBO.

    L-BFGS suits the deterministic MAP objective; the fit stops when the ELBO changes by
    less than ``tol_rel_obj`` (relative) between steps. Returns ``(result, guide)``;
    ``guide.point_estimate(result)`` gives theta_hat. ``options`` go to :func:`vi_toolkit.fit`.
    """
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive integer, got {restarts!r}")
    options.setdefault("progress", False)
    best = None
    for r in range(restarts):
        guide = MAPGuide(hmm, hmm_init(hmm, sequences, lengths, seed=seed + r))
        result = fit(hmm.model, guide, (sequences, lengths), optimizer=optimizer, lr=lr,
                     num_steps=num_steps, tol_rel_obj=tol_rel_obj, seed=seed + r, **options)
        if best is None or result.elbo > best[0].elbo:
            best = (result, guide)
    return best
