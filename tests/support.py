"""Models and guides that several test files fit (pytest puts this folder on ``sys.path``).

The hierarchical model has one global and N local latents,

    mu ~ N(0, 0.5^2),   z_i | mu ~ N(mu, 1),   x_i | z_i ~ N(z_i, 1),

with the guide q(mu) = N(m, s^2), q(z_i | x_i) = N(a x_i, b^2): the smallest program whose
minibatch ELBO must scale the local terms by N/B and leave the global term alone.
:func:`globally_scaled` is the wrong estimator that scales the global term too, the
negative control of the unbiasedness tests.
"""

import functools

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from vi_toolkit import data_plate


def hierarchical_model(x: torch.Tensor, num_data: int | None = None) -> None:
    """mu ~ N(0, 0.5^2); z_i ~ N(mu, 1); x_i ~ N(z_i, 1): one global and N local latents."""
    mu = pyro.sample("mu", dist.Normal(0.0, 0.5))
    with data_plate(x, num_data):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def hierarchical_guide(x: torch.Tensor, num_data: int | None = None) -> None:
    """q(mu) = N(m, s^2), q(z_i | x_i) = N(a x_i, b^2)."""
    m = pyro.param("m", torch.tensor(0.5))
    s = pyro.param("s", torch.tensor(0.7), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(m, s))
    a = pyro.param("a", torch.tensor(0.3))
    b = pyro.param("b", torch.tensor(0.8), constraint=constraints.positive)
    with data_plate(x, num_data):
        pyro.sample("z", dist.Normal(a * x, b))


def globally_scaled(program):
    """``program`` with every term, global ones included, scaled by N/B (a biased estimator).

    Args:
        program: a model or guide ``program(x, num_data)`` with a data plate.

    Returns:
        ``scaled(x, num_data)``: ``program(x, None)`` under ``poutine.scale(num_data / len(x))``.
    """

    @functools.wraps(program)
    def scaled(x, num_data=None):
        with pyro.poutine.scale(scale=num_data / x.shape[0]):
            program(x, None)

    return scaled
