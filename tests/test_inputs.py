"""Bad input: every case is a ValueError that names the problem, raised before any work."""

import pytest
import torch

from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.guides import regression as regression_guide
from vi_toolkit.models import conjugate, regression
from vi_toolkit import fit

x = torch.randn(50)


def _fit(data, model=conjugate.model, guide=conjugate_guide.guide, **kwargs):
    return fit(model, guide, data, num_steps=2, progress=False, **kwargs)


@pytest.mark.parametrize("data, match", [
    (torch.tensor([1.0, float("nan"), 2.0]), r"data has 1 NaN or infinite value\(s\), the first at index \(1,\)"),
    (torch.tensor([1.0, 2.0, float("inf")]), r"data has 1 NaN or infinite"),
    (torch.zeros(0), r"data is empty"),
    (torch.tensor(1.0), r"data is a scalar"),
    (torch.arange(10), r"data has integer dtype torch.int64"),
    ({}, r"data is an empty dict"),
    ("x.csv", r"data must be a tensor or numpy array, got str"),
])
def test_bad_data(data, match):
    with pytest.raises(ValueError, match=match):
        _fit(data)


def test_mismatched_leading_dimensions_name_both_tensors():
    X, y = torch.randn(10, 3), torch.randn(9)
    with pytest.raises(ValueError, match=r"leading \(data-point\) dimension, got \{'data\[0\]': 10, 'data\[1\]': 9\}"):
        _fit((X, y), regression.model, regression_guide.guide)
    with pytest.raises(ValueError, match=r"data\['y'\] has 1 NaN"):
        _fit({"X": X, "y": torch.tensor([float("nan")] * 1 + [0.0] * 9)},
             regression.model, regression_guide.guide)


def test_val_data_must_match_the_data():
    with pytest.raises(ValueError, match=r"val_data\[1\] has per-point shape \(2,\)"):
        _fit((torch.randn(10, 3), torch.randn(10)), regression.model, regression_guide.guide,
             val_data=(torch.randn(5, 3), torch.randn(5, 2)))


@pytest.mark.parametrize("kwargs, match", [
    ({"elbo": "elbow"}, r"unknown elbo 'elbow': use one of auto, trace, meanfield, enum, iwae"),
    ({"batch_size": 0}, r"batch_size must be an integer between 1 and the number of data points \(50\), got 0"),
    ({"batch_size": 51}, r"got 51"),
    ({"device": "tpu"}, r"unknown device 'tpu'"),
    ({"device": "gpu0"}, r"unknown device 'gpu0'"),
    ({"num_particles": 0}, r"num_particles must be a positive integer"),
    ({"patience": 3}, r"patience \(early stopping\) needs val_data"),
    ({"lr_schedule": "linear"}, r"unknown lr_schedule 'linear'"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _fit(x, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu():
    with pytest.raises(ValueError, match=r"device='cuda' was asked for but no CUDA GPU is available"):
        _fit(x, device="cuda")


def test_minibatching_needs_the_data_plate_convention():
    import pyro
    import pyro.distributions as dist

    def no_num_data(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        conjugate_guide.guide(x)

    with pytest.raises(ValueError, match="needs a model that takes the keyword num_data"):
        _fit(x, no_num_data, guide, batch_size=10)
    _fit(x, no_num_data, guide)  # full batch needs no num_data

    def ignores_num_data(x, num_data=None):
        no_num_data(x)

    with pytest.raises(ValueError, match="no plate in the model has size num_data=50"):
        _fit(x, ignores_num_data, conjugate_guide.guide, batch_size=10)


def test_a_model_that_fails_on_the_data_names_which_side_failed():
    with pytest.raises(ValueError, match=r"the model failed: .* \(on the first batch of data: \(50, 2\) float32\)"):
        _fit(torch.randn(50, 2), regression.model, conjugate_guide.guide)
