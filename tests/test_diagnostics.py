"""VI diagnostics against known answers: PSIS k-hat of an exact-family and of a too-narrow guide,
simulation-based calibration of a calibrated and of an overconfident fit, and their plots."""

import os

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from test_evaluation import ppca_data, ppca_fit, ppca_ml_params

from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.models import conjugate
from vi_toolkit import fit, plots
from vi_toolkit.diagnostics import khat_reading, psis_khat, simulation_based_calibration
from vi_toolkit.scripts import save_figure

SETTINGS = dict(num_steps=150, lr=0.2, num_particles=4)


def narrow_guide(x, num_data=None, **_):
    """q(mu) = N(m, 0.02^2): its scale is a tenth of the posterior's (about 0.2 for 20 points)."""
    m = pyro.param("mu_loc", x.new_tensor(0.0))
    pyro.sample("mu", dist.Normal(m, 0.02))


@pytest.fixture(scope="module")
def x20():
    return 3.0 + torch.randn(20, generator=torch.Generator().manual_seed(0))


def test_khat_is_good_for_the_exact_family_and_unreliable_for_a_narrow_guide(x20):
    good = fit(conjugate.model, conjugate_guide.guide, x20, elbo="meanfield", num_steps=400,
               lr=0.1, num_particles=4, progress=False, seed=0)
    report = psis_khat(good, x20, num_samples=2000, seed=0)
    assert not report["pointwise"] and report["khat"] < 0.5 and report["reading"] == "good"
    narrow = fit(conjugate.model, narrow_guide, x20, progress=False, seed=0, **SETTINGS)
    report = psis_khat(narrow, x20, num_samples=2000, seed=0)
    assert report["khat"] > 0.7 and report["reading"] == "unreliable"


def test_pointwise_khat_for_an_amortized_guide(tmp_path):
    """PPCA's linear encoder (models/ppca.py, guides/ppca.py) at a diagonal Gaussian a little wider
    than the exact posterior's marginals: good; with a tenth of that scale: unreliable."""
    x = ppca_data(60)
    params = ppca_ml_params(x)
    good = ppca_fit(x, params, diagonal=1.2)
    report = psis_khat(good, x, num_samples=1000, batch_size=25, seed=0)
    assert report["pointwise"] and report["khat_points"].shape == (60,)
    assert report["khat"] < 0.5 and report["fraction_unreliable"] < 0.1
    narrow = ppca_fit(x, params, diagonal=0.12)
    bad = psis_khat(narrow, x, num_samples=1000, seed=0)
    assert bad["khat"] > 0.7 and bad["fraction_unreliable"] > 0.5
    fig = plots.khat_histogram(np.concatenate([report["khat_points"], bad["khat_points"]]))
    assert os.path.getsize(save_figure(fig, tmp_path, "khat")) > 0


def test_khat_readings():
    assert [khat_reading(k) for k in (0.1, 0.5, 0.7, 0.71, float("nan"))] == [
        "good", "usable", "usable", "unreliable", "unreliable"]


def test_sbc_is_uniform_for_a_calibrated_fit_and_not_for_an_overconfident_one(x20, tmp_path):
    calibrated = simulation_based_calibration(
        conjugate.model, conjugate_guide.guide, x20, num_simulations=20, num_draws=99,
        fit_kwargs=dict(elbo="meanfield", **SETTINGS), seed=0)
    ranks = calibrated["ranks"]["mu"]
    assert ranks.shape == (20, 1) and ranks.min() >= 0 and ranks.max() <= 99
    assert calibrated["uniformity_pvalue"]["mu"][0] > 0.001
    assert calibrated["symmetry_pvalue"]["mu"][0] > 0.001
    overconfident = simulation_based_calibration(
        conjugate.model, narrow_guide, x20, num_simulations=20, num_draws=99, fit_kwargs=SETTINGS,
        seed=0)
    r = overconfident["ranks"]["mu"]
    # with q ten times too narrow, the truth falls outside the draws most of the time
    assert ((r == 0) | (r == 99)).mean() > 0.5
    assert overconfident["uniformity_pvalue"]["mu"][0] < 0.001
    fig = plots.sbc_ranks({"calibrated mu": ranks, "overconfident mu": r}, 99)
    assert len(fig.axes) == 2 and os.path.getsize(save_figure(fig, tmp_path, "sbc")) > 0


def test_bad_input_is_a_clear_value_error(x20):
    result = fit(conjugate.model, conjugate_guide.guide, x20, num_steps=5, progress=False, seed=0)
    with pytest.raises(ValueError, match="pointwise"):
        psis_khat(result, x20, pointwise="yes")
    with pytest.raises(ValueError, match="num_samples"):
        psis_khat(result, x20, num_samples=0)
    with pytest.raises(ValueError, match="sites"):
        simulation_based_calibration(conjugate.model, conjugate_guide.guide, x20, sites=["sigma"],
                                     num_simulations=1)
    with pytest.raises(ValueError, match="num_simulations"):
        simulation_based_calibration(conjugate.model, conjugate_guide.guide, x20, num_simulations=0)
