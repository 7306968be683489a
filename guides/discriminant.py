"""MAP guide for ``vi_toolkit.models.discriminant``: point masses on theta = (pi, mu, sigma, L).

The classes z_i are summed out by the enum ELBO (the observed labels fix them), so the
ELBO with q(theta) = delta(theta - theta_hat) is log p(x, y_observed | theta_hat) +
log p(theta_hat), maximised at the MAP estimate: with all labels observed the
closed-form LDA estimates (up to the priors' pull), with none the EM of a tied-covariance
mixture, with some its semi-supervised EM.

Initialisation (:func:`discriminant_init`): each class's location is the mean of its
labelled points; classes without labels take k-means centres
(:func:`vi_toolkit.initialization.kmeans_init`), farthest first from the locations already chosen.
Every point is then given a class (its label, or the nearest location), and the
proportions and the pooled within-class covariance come from those classes.
:func:`fit_discriminant` fits by full-batch L-BFGS, with restarts from different k-means
seedings when labels are missing.
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from vi_toolkit import FitResult, fit
from vi_toolkit.initialization import kmeans_init
from vi_toolkit.models.discriminant import LinearDiscriminant
from vi_toolkit.specs import Rebuildable


def discriminant_init(lda: LinearDiscriminant, x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor,
                      *, seed: int = 0) -> dict:
    """Initial ``params`` for ``lda`` from the data (see the module docstring).

    Args:
        lda: the model.
        x, y, labelled: the data, as ``vi_toolkit.models.discriminant.label_data`` builds it.
        seed: the k-means seed (used when some class has no labelled point).

    Returns:
        ``weights``, ``locs``, ``scales`` and ``corr_cholesky`` (the identity for D = 1 too).
    """
    lda.check(x, y, labelled)
    x = x.detach().cpu().to(torch.get_default_dtype())
    y, labelled = y.cpu(), labelled.cpu()
    K, D = lda.K, lda.D
    counts = torch.bincount(y[labelled], minlength=K)
    locs = torch.zeros(K, D).index_add_(0, y[labelled], x[labelled]) / counts.clamp_min(1).unsqueeze(-1)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        centres = kmeans_init(x, K, seed=seed)["locs"]
        chosen = locs[counts > 0]
        for k in missing:  # the centre farthest from the locations chosen so far
            far = torch.cdist(centres, chosen).min(-1).values.argmax() if len(chosen) else 0
            locs[k] = centres[far]
            chosen = torch.cat([chosen, centres[far].unsqueeze(0)])
            centres = torch.cat([centres[:far], centres[far + 1:]])
    classes = torch.where(labelled, y, torch.cdist(x, locs).argmin(-1))
    n = torch.bincount(classes, minlength=K).to(x.dtype)
    residual = x - locs[classes]
    cov = residual.T @ residual / len(x) + 1e-6 * x.var(0).clamp_min(1e-12).diag()
    scales = cov.diagonal().sqrt()
    corr = cov / (scales.unsqueeze(-1) * scales)
    return {"weights": (n + 1) / (n + 1).sum(), "locs": locs, "scales": scales,
            "corr_cholesky": torch.linalg.cholesky(corr)}


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

    def point_estimate(self, result: FitResult) -> dict:
        """theta_hat of a fit of this guide, as ``params`` for ``vi_toolkit.models.discriminant``."""
        return {site: value for site in self.SITES
                if (value := result.params.get(f"{site}_map")) is not None}


# the MAP objective is deterministic and smooth: full-batch L-BFGS, whose every step (up to 20
# line-searched iterations) is worth a convergence check (log_every=1: 4 to 6 steps, not 20)
FIT_DEFAULTS = {"optimizer": "lbfgs", "lr": 1.0, "num_steps": 100, "tol_rel_obj": 1e-8, "progress": False,
                "options": {"log_every": 1}}


def fit_discriminant(lda: LinearDiscriminant, data: tuple, *, restarts: int = 1, seed: int = 0,
                     val_data: tuple | None = None, **options) -> tuple[FitResult, MAPGuide]:
    """Fit ``lda`` by MAP to ``data = (x, y, labelled)``; keep the best ELBO of ``restarts`` fits.

    Args:
        lda: the model.
        data: ``(x, y, labelled)``, as ``vi_toolkit.models.discriminant.label_data`` builds it.
        restarts: fits from the k-means seedings ``seed``, ``seed + 1``, ...; they differ only
            where some class has no labelled point, so otherwise one fit is made.
        seed: the first seed (of k-means and of the fit).
        val_data: held-out data of the same structure.
        **options: passed to :func:`vi_toolkit.fit` (defaults: ``FIT_DEFAULTS``).

    Returns:
        ``(result, guide)``; ``guide.point_estimate(result)`` gives theta_hat.

    Raises:
        ValueError: if ``data`` or ``val_data`` is not such a tuple or does not fit ``lda``, or
            ``restarts`` is not a positive integer.
    """
    for value, name in ((data, "data"), (val_data, "val_data")):
        if value is not None and (not isinstance(value, tuple) or len(value) != 3):
            raise ValueError(f"{name} must be the tuple (x, y, labelled) of label_data")
    lda.check(*data)
    if val_data is not None:
        lda.check(*val_data, name="val_data[0]")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive integer, got {restarts!r}")
    _, y, labelled = data
    if bool(torch.bincount(y[labelled], minlength=lda.K).all()):
        restarts = 1  # the initialisation does not depend on the seed
    options = {**FIT_DEFAULTS, **options}
    best = None
    for r in range(restarts):
        guide = MAPGuide(lda, discriminant_init(lda, *data, seed=seed + r))
        result = fit(lda.model, guide, data, val_data=val_data, seed=seed + r, **options)
        if best is None or result.elbo > best[0].elbo:
            best = (result, guide)
    return best
