"""Fitting recipes for the classic models: restarts, model selection, sensible defaults.

* :func:`fit_gmm`: a Gaussian mixture (``vi_toolkit.models.gmm``) from ``restarts`` k-means++
  initialisations (:func:`vi_toolkit.initialization.kmeans_init`), keeping the best ELBO; the
  MAP guide by L-BFGS (the objective is deterministic), the mean-field guide by Adam;
* :func:`select_K`: K = 1..Kmax, each scored on held-out data, K chosen by the one-SE rule;
* :func:`fit_hmm`: an HMM (``vi_toolkit.models.hmm``) by MAP from ``restarts``
  initialisations (:func:`vi_toolkit.initialization.hmm_init`), L-BFGS to a relative tolerance.
"""

from .engine import fit
from .guides.gmm import GUIDES
from .guides.hmm import MAPGuide as HMMMAPGuide
from .initialization import hmm_init, kmeans_init
from .models.gmm import GaussianMixture

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
        guide = HMMMAPGuide(hmm, hmm_init(hmm, sequences, lengths, seed=seed + r))
        result = fit(hmm.model, guide, (sequences, lengths), optimizer=optimizer, lr=lr,
                     num_steps=num_steps, tol_rel_obj=tol_rel_obj, seed=seed + r, **options)
        if best is None or result.elbo > best[0].elbo:
            best = (result, guide)
    return best
