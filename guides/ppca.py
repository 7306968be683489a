"""Guides for ``vi_toolkit.models.ppca``: an amortized linear encoder and per-point mean-field factors.

* ``LinearEncoder``: q(z_i | x_i) = N(A x_i + c, L L^T), A (q x D), c, and L lower
  triangular shared by all points: the linear auto-encoder's encoder with a noise
  model. The exact posterior N(M^-1 W^T (x_i - mu), sigma^2 M^-1) is of this form, so the
  ELBO's maximum is the maximum of log p(x).
* ``PointwiseGuide``: q(z_i) = N(m_i, diag s_i^2), parameters per data point, chosen
  by the index tensor that comes with the data: ``fit(..., data=(x, torch.arange(N)))``.
  Its ELBO is below log p(x) unless the posterior covariance sigma^2 M^-1 is diagonal
  (W with orthogonal columns), which the maximum of the ELBO then selects.
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from vi_toolkit.models.ppca import PPCA
from vi_toolkit.plates import data_plate
from vi_toolkit.specs import Rebuildable


class LinearEncoder(Rebuildable):
    """q(z_i | x_i) = N(A x_i + c, L L^T) for a ``vi_toolkit.models.ppca.PPCA`` model."""

    def __init__(self, ppca):
        self.ppca = ppca

    def __call__(self, x, index=None, num_data=None):
        self.ppca.check(x)
        D, q = self.ppca.D, self.ppca.q
        A = pyro.param("encoder_A", x.new_zeros(q, D))
        c = pyro.param("encoder_c", x.new_zeros(q))
        L = pyro.param("encoder_scale_tril", torch.eye(q, dtype=x.dtype, device=x.device),
                       constraint=constraints.lower_cholesky)
        with data_plate(x, num_data):
            pyro.sample("z", dist.MultivariateNormal(x @ A.T + c, scale_tril=L))

    @staticmethod
    def point_estimate(result):
        """The fitted ``W``, ``mu``, ``sigma``: ``params`` for ``vi_toolkit.models.ppca`` (PPCA's global
        quantities are parameters, not latents), as the other classic guides' ``point_estimate``."""
        return PPCA.params(result)

    @staticmethod
    def encode(result, x):
        """The fitted encoder's means A x + c and covariance L L^T."""
        p = result.params
        return x @ p["encoder_A"].T + p["encoder_c"], p["encoder_scale_tril"] @ p["encoder_scale_tril"].T


class PointwiseGuide(Rebuildable):
    """q(z_i) = N(m_i, diag s_i^2) for each of ``num_points`` points of a ``vi_toolkit.models.ppca.PPCA``."""

    def __init__(self, ppca, num_points, *, init_scale=0.1):
        self.ppca, self.num_points, self.init_scale = ppca, num_points, init_scale

    def __call__(self, x, index, num_data=None):
        self.ppca.check(x)
        shape = (self.num_points, self.ppca.q)
        m = pyro.param("z_loc", x.new_zeros(shape))
        s = pyro.param("z_scale", x.new_full(shape, self.init_scale),
                       constraint=constraints.positive)
        with data_plate(x, num_data):
            pyro.sample("z", dist.Normal(m[index], s[index]).to_event(1))

    point_estimate = staticmethod(LinearEncoder.point_estimate)
