"""Issue 12, item 18: where a fit's parameters are after ``fit`` and what ``seed=`` covers, as the
README says: ``pyro.param`` outside the fit raises KeyError, ``result.params`` and
``result.scope()`` hold the values, the toolkit's analyses name a parameter the fit lacks, and
``seed`` fixes what the fit creates but not a network built before it."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from test_evaluation import local_model, replace

from vi_toolkit import data_plate, fit
from vi_toolkit.evaluation import evaluate


def mean_model(x, num_data=None):
    """mu ~ N(0, 10^2), x_i ~ N(mu, 1)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with data_plate(x, num_data):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def mean_guide(x, num_data=None):
    pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)), 0.1))


def test_a_fits_parameters_are_in_result_params_and_its_scope_not_in_pyros_store():
    x = 3.0 + torch.randn(50, generator=torch.Generator().manual_seed(0))
    result = fit(mean_model, mean_guide, x, num_steps=200, lr=0.1, progress=False, seed=0)
    with pytest.raises(KeyError):
        pyro.param("m")
    assert abs(float(result.params["m"]) - float(x.mean())) < 0.1
    with result.scope():
        assert torch.equal(pyro.param("m"), result.params["m"])

    def typo(x, num_data=None):  # asks for a parameter this fit does not have
        pyro.sample("mu", dist.Normal(pyro.param("mean"), 0.1))

    with pytest.raises(ValueError, match=r"'mean' is not a parameter of this fit \(\['m'\]\).*"
                                         r"read result\.params, or run code inside `with result\.scope"):
        evaluate(replace(result, guide=typo), x, num_samples=10)


class Encoder(torch.nn.Module):
    """q(z_i | x_i) = N(a x_i + b, softplus(c x_i + d)^2): weights drawn when it is built."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1, 2)

    def forward(self, x, num_data=None):
        pyro.module("encoder", self)
        loc, scale = self.net(x[:, None]).unbind(-1)
        with data_plate(x, num_data):
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(scale)))


def test_seed_fixes_what_the_fit_creates_not_a_network_built_before_it():
    x = torch.randn(30, generator=torch.Generator().manual_seed(0))

    def fitted(guide):
        return fit(local_model, guide, x, num_steps=20, lr=0.05, progress=False, seed=0)

    lazy = []
    for state in (1, 2):  # the caller's generator differs; the autoguide is built inside the fit
        torch.manual_seed(state)
        lazy.append(fitted(AutoNormal(local_model)).params)
    assert all(torch.equal(lazy[0][k], lazy[1][k]) for k in lazy[0])
    weights = {}
    for state in (1, 1, 2):
        torch.manual_seed(state)
        encoder = Encoder()  # initialised here, by the caller's generator
        with fitted(encoder).scope():  # the fitted weights
            weights.setdefault(state, []).append(encoder.net.weight.detach().clone())
    assert torch.equal(weights[1][0], weights[1][1])      # same generator state: bit-identical
    assert not torch.allclose(weights[1][0], weights[2][0])  # same seed, other network: another fit
