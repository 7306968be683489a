"""Full-rank Gaussian guide for ``vi_toolkit.models.regression``: q(w) = N(m, L L^T)."""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints


def guide(X, y, num_data=None, **_):
    """q(w) = N(m, L L^T) with L lower triangular with a positive diagonal."""
    D = X.shape[-1]
    m = pyro.param("w_loc", X.new_zeros(D))
    L = pyro.param("w_scale_tril", 0.1 * torch.eye(D, dtype=X.dtype, device=X.device),
                   constraint=constraints.lower_cholesky)
    pyro.sample("w", dist.MultivariateNormal(m, scale_tril=L))
