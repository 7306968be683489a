"""Mean-field Normal guide for ``vi_toolkit.models.conjugate``: q(mu) = N(m, s^2)."""

import pyro
import pyro.distributions as dist
from torch.distributions import constraints


def guide(x, num_data=None, **_):
    """q(mu) = N(m, s^2), with m and s > 0 learned."""
    m = pyro.param("mu_loc", x.new_tensor(0.0))
    s = pyro.param("mu_scale", x.new_tensor(1.0), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(m, s))
