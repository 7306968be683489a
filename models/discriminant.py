"""Linear discriminant analysis as a latent variable model: K Gaussian classes, one shared covariance.

    pi ~ Dir(alpha 1_K)                                 class proportions
    mu_k ~ N(0, s_mu^2 I_D)                             k = 1..K
    sigma_d ~ LogNormal(m_sigma, s_sigma^2)             d = 1..D (standard deviations)
    L ~ LKJCholesky(D, eta),  Sigma = diag(sigma) L L^T diag(sigma)     shared by every class
    z_i | pi ~ Cat(pi)                                  i = 1..N, the class of point i
    x_i | z_i ~ N(mu_{z_i}, Sigma)
    y_i = z_i, observed where m_i                       the label, and the label mask m

One program fits the three cases: supervised (every m_i true), unsupervised (none) and
semi-supervised (some). z_i is enumerated (``infer={"enumerate": "parallel"}``) at every
point, and the label is an observation of it, y_i | z_i ~ Cat(onehot(z_i)) (log-density 0
if y_i = z_i, -inf otherwise), masked by m_i. Summing z_i out gives each point's exact term

    labelled:    log p(x_i, y_i | theta) = log pi_{y_i} + log N(x_i | mu_{y_i}, Sigma)
    unlabelled:  log p(x_i | theta) = logsumexp_k (log pi_k + log N(x_i | mu_k, Sigma))

so a guide needs only the global theta = (pi, mu, sigma, L). (Pyro's ``obs_mask`` would
split z into ``z_observed``, ``z_unobserved`` and a deterministic ``z`` and drop ``infer``;
observing the label keeps a single enumerated z and a mask on a site that is not enumerated.)

Given theta the class posterior is linear in x (the discriminant functions):

    p(z_i = k | x_i, theta) = softmax_k(w_k^T x_i + b_k),
    w_k = Sigma^-1 mu_k,  b_k = log pi_k - mu_k^T Sigma^-1 mu_k / 2

(Hastie, Tibshirani & Friedman, The Elements of Statistical Learning, 2009, 4.3). With every
label observed and flat priors the MAP estimate is the maximum-likelihood one of
scikit-learn's ``LinearDiscriminantAnalysis``: pi the class frequencies, mu_k the class means
and Sigma the pooled within-class covariance 1/N sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T.
With none it is a Gaussian mixture with a tied covariance (EM: ``GaussianMixture(
covariance_type="tied")``), and with some, the semi-supervised mixture of Nigam et al.
(2000, Machine Learning 39), where the unlabelled points sharpen the class densities.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import is_validation_enabled
from pyro.ops.indexing import Vindex

from vi_toolkit.plates import data_plate
from vi_toolkit.specs import Rebuildable


def label_data(x: torch.Tensor, y: torch.Tensor | None = None,
               labelled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The data ``(x, y, labelled)`` of :meth:`LinearDiscriminant.model` from points and labels.

    Args:
        x: (N, D) points.
        y: (N,) integer class labels, -1 where unknown (the convention of
            ``sklearn.semi_supervised``); None: no labels (unsupervised).
        labelled: (N,) boolean mask of the observed labels; None: ``y >= 0``.

    Returns:
        ``(x, y, labelled)`` with the unknown entries of ``y`` set to 0 (any valid code; the
        mask hides them).

    Raises:
        ValueError: if ``y`` or ``labelled`` has the wrong shape or dtype, or a label marked
            observed is negative.
    """
    n = x.shape[0]
    if y is None:
        if labelled is not None and bool(labelled.any()):
            raise ValueError("labelled marks observed labels but y is None")
        return x, torch.zeros(n, dtype=torch.long, device=x.device), torch.zeros(
            n, dtype=torch.bool, device=x.device)
    y = torch.as_tensor(y, device=x.device)
    if y.shape != (n,) or y.is_floating_point():
        raise ValueError(f"y must be ({n},) integer labels, one per point of x, got shape "
                         f"{tuple(y.shape)} and dtype {y.dtype}")
    if labelled is None:
        labelled = y >= 0
    labelled = torch.as_tensor(labelled, device=x.device)
    if labelled.shape != (n,) or labelled.dtype != torch.bool:
        raise ValueError(f"labelled must be a ({n},) boolean mask, got shape "
                         f"{tuple(labelled.shape)} and dtype {labelled.dtype}")
    if bool((labelled & (y < 0)).any()):
        i = int((labelled & (y < 0)).nonzero()[0])
        raise ValueError(f"y[{i}] = {int(y[i])} is marked labelled; labels are 0..K-1")
    return x, torch.where(labelled, y, torch.zeros_like(y)).long(), labelled


class LinearDiscriminant(Rebuildable):
    """LDA with ``K`` classes in ``D`` dimensions; ``model(x, y, labelled, num_data)`` is the program.

    ``params`` below is a dict of point values of the global sites: ``weights`` (K,),
    ``locs`` (K, D), ``scales`` (D,) and, for D > 1, ``corr_cholesky`` (D, D); guides
    return it from their ``point_estimate``.
    """

    def __init__(self, K: int, D: int, *, concentration: float = 1.0, loc_scale: float = 10.0,
                 scale_loc: float = 0.0, scale_scale: float = 2.0, eta: float = 1.0):
        """Declare the model and its priors.

        Args:
            K: the number of classes (>= 2).
            D: the data dimension (>= 1).
            concentration, loc_scale, scale_loc, scale_scale, eta: the priors' alpha, s_mu,
                m_sigma, s_sigma and the LKJ eta (see the module docstring).

        Raises:
            ValueError: if ``K`` or ``D`` is not an integer in range, or a prior parameter is
                not positive.
        """
        if not isinstance(K, int) or isinstance(K, bool) or K < 2:
            raise ValueError(f"K (the number of classes) must be an integer >= 2, got {K!r}")
        if not isinstance(D, int) or isinstance(D, bool) or D < 1:
            raise ValueError(f"D (the data dimension) must be an integer >= 1, got {D!r}")
        for name, value in (("concentration", concentration), ("loc_scale", loc_scale),
                            ("scale_scale", scale_scale), ("eta", eta)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        self.K, self.D, self.full = K, D, D > 1  # a 1x1 correlation is always 1
        self.concentration, self.loc_scale, self.eta = concentration, loc_scale, eta
        self.scale_loc, self.scale_scale = scale_loc, scale_scale

    def __repr__(self):
        return f"LinearDiscriminant(K={self.K}, D={self.D})"

    def check(self, x: torch.Tensor, y: torch.Tensor | None = None, labelled: torch.Tensor | None = None,
              name: str = "x") -> None:
        """Check data against the model.

        Args:
            x: (N, D) points.
            y, labelled: (N,) integer labels and their (N,) boolean mask, or None to check ``x`` alone.
            name: what to call ``x`` in the message.

        Raises:
            ValueError: naming the argument, for a wrong shape or dtype, or a labelled ``y``
                outside 0..K-1.
        """
        if x.dim() != 2 or x.shape[-1] != self.D:
            raise ValueError(f"{name} must have shape (N, {self.D}) for {self!r}, got {tuple(x.shape)}")
        if y is None:
            return
        n = x.shape[0]
        if y.shape != (n,) or y.is_floating_point():
            raise ValueError(f"y must be ({n},) integer labels, got shape {tuple(y.shape)} and "
                             f"dtype {y.dtype} (build the data with label_data)")
        if labelled is None or labelled.shape != (n,) or labelled.dtype != torch.bool:
            raise ValueError(f"labelled must be a ({n},) boolean mask of the observed labels "
                             "(build the data with label_data)")
        bad = labelled & ((y < 0) | (y >= self.K))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"y[{i}] = {int(y[i])} is marked labelled but the classes are "
                             f"0..{self.K - 1}")

    def model(self, x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor,
              num_data: int | None = None) -> None:
        """The Pyro program p(x, y_observed, z, theta) of the module docstring."""
        if is_validation_enabled():  # the label checks read values back from the device
            self.check(x, y, labelled)
        K, D = self.K, self.D
        weights = pyro.sample("weights", dist.Dirichlet(x.new_full((K,), self.concentration)))
        with pyro.plate("classes", K, dim=-1):
            locs = pyro.sample("locs", dist.Normal(x.new_zeros(D), self.loc_scale).to_event(1))
        scales = pyro.sample("scales", dist.LogNormal(x.new_full((D,), self.scale_loc),
                                                      self.scale_scale).to_event(1))
        corr = (pyro.sample("corr_cholesky", dist.LKJCholesky(D, x.new_tensor(self.eta)))
                if self.full else None)
        with data_plate(x, num_data, dim=-1):
            # z_i ~ Cat(pi), by its log-weights: taken once, where probs would take them per point
            z = pyro.sample("z", dist.Categorical(logits=weights.log()), infer={"enumerate": "parallel"})
            pyro.sample("x", self._class_density(locs, scales, corr, z), obs=x)
            with poutine.mask(mask=labelled):
                label = torch.nn.functional.one_hot(z, K).to(x.dtype).log()  # 0 at z, -inf elsewhere
                pyro.sample("y", dist.Categorical(logits=label), obs=y)

    @staticmethod
    def _class_density(locs, scales, corr, z=None):
        """N(mu_z, Sigma), or the K class densities N(mu_k, Sigma) when ``z`` is None.

        The locations' batch dims left of the classes (vectorized particles, left of the data
        plate) get a data dim, so that they line up with ``z``'s; the shared scales and
        correlation lie in no plate, so their batch dims line up already.
        """
        if z is not None:
            locs = Vindex(locs.unsqueeze(-3))[..., z, :]
        if corr is None:
            return dist.Normal(locs, scales).to_event(1)
        return dist.MultivariateNormal(locs, scale_tril=scales.unsqueeze(-1) * corr)

    # -- exact quantities for point values of the global parameters -------------------------
    def covariance(self, params: dict) -> torch.Tensor:
        """The shared covariance Sigma (D, D) from ``params``."""
        scale_tril = params["scales"].unsqueeze(-1) * params["corr_cholesky"] if self.full else \
            torch.diag(params["scales"])
        return scale_tril @ scale_tril.T

    def joint_log_density(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """(N, K): log pi_k + log N(x_i | mu_k, Sigma)."""
        self.check(x)
        density = self._class_density(params["locs"], params["scales"], params.get("corr_cholesky"))
        return params["weights"].log() + density.log_prob(x.unsqueeze(-2))

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor,
                       params: dict) -> torch.Tensor:
        """Exact log-likelihood of each point, (N,), the classes summed out where not labelled.

        Args:
            x, y, labelled: the data, as :func:`label_data` builds it (``label_data(x)`` for
                log p(x_i | theta) of every point).
            params: point values of theta.

        Returns:
            log p(x_i, y_i | theta) where ``labelled``, else log p(x_i | theta).
        """
        self.check(x, y, labelled)
        joint = self.joint_log_density(x, params)
        return torch.where(labelled, joint.gather(-1, y.unsqueeze(-1)).squeeze(-1), joint.logsumexp(-1))

    def linear_discriminants(self, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w, b)``: the coefficients (K, D) and intercepts (K,) of the discriminant functions.

        w_k = Sigma^-1 mu_k and b_k = log pi_k - mu_k^T Sigma^-1 mu_k / 2, so that
        p(z = k | x, theta) = softmax_k(w_k^T x + b_k) (scikit-learn's ``coef_`` and
        ``intercept_`` for K > 2).
        """
        locs = params["locs"]
        w = torch.linalg.solve(self.covariance(params), locs.T).T
        return w, params["weights"].log() - 0.5 * (w * locs).sum(-1)

    def predict_proba(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """p(z_i = k | x_i, theta), shape (N, K); each row sums to one."""
        self.check(x)
        w, b = self.linear_discriminants(params)
        return (x @ w.T + b).softmax(-1)

    def predict(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """The most probable class of each point, (N,)."""
        return self.predict_proba(x, params).argmax(-1)

    def simulate(self, params: dict, n: int, *,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` points from the model with parameters ``params``: ``(x, z)``."""
        z = torch.multinomial(params["weights"], n, replacement=True, generator=generator)
        L = torch.linalg.cholesky(self.covariance(params))
        eps = torch.randn(n, self.D, generator=generator, dtype=L.dtype)
        return params["locs"][z] + eps @ L.T, z
