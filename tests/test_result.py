"""The posterior a user keeps: sampling, summaries, predictive draws, owned state, save/load."""

import json
import os
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from vi_toolkit import data_plate, fit, load
from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.guides.gmm import MAPGuide
from vi_toolkit.guides.vae import GaussianEncoder
from vi_toolkit.models import conjugate, regression
from vi_toolkit.models.gmm import GaussianMixture
from vi_toolkit.models.vae import DeepLatentGaussian

QUIET = dict(progress=False, seed=0)


@pytest.fixture(scope="module")
def x():
    return 3.0 + torch.randn(200, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def regression_data():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(100, 2, generator=gen)
    return X, X @ torch.tensor([1.0, -2.0]) + torch.randn(100, generator=gen)


@pytest.fixture(scope="module")
def conjugate_fit(x):
    return fit(conjugate.model, conjugate_guide.guide, x, elbo="meanfield", lr=0.2, lr_schedule="exponential",
               num_particles=8, num_steps=1500, **QUIET)


def test_samples_follow_the_fitted_guide(conjugate_fit, x):
    loc, scale = conjugate_fit.params["mu_loc"], conjugate_fit.params["mu_scale"]
    draws = conjugate_fit.sample(20000, x)
    assert set(draws) == {"mu"} and draws["mu"].shape == (20000,)
    assert abs(draws["mu"].mean() - loc) < 4 * scale / 20000 ** 0.5
    assert abs(draws["mu"].std() / scale - 1) < 0.03
    exact_mean, exact_sd = conjugate.posterior(x)
    assert abs(draws["mu"].mean() - exact_mean) < 0.1 * exact_sd + 4 * scale / 20000 ** 0.5
    assert abs(draws["mu"].std() / exact_sd - 1) < 0.05


def test_predictive_draws_the_observed_sites_anew(conjugate_fit, x):
    draws = conjugate_fit.predictive(500, x)
    assert draws["x"].shape == (500, 200) and draws["mu"].shape == (500,)
    assert not torch.equal(draws["x"][0], x)  # redrawn, not the data
    # x_rep ~ N(mu, 1) given mu: the residuals are unit normal
    residual = draws["x"] - draws["mu"].unsqueeze(-1)
    assert abs(residual.std() - 1.0) < 0.02
    assert set(conjugate_fit.predictive(3, x, return_sites=["x"])) == {"x"}
    with pytest.raises(ValueError, match="no sample site.*'y'"):
        conjugate_fit.predictive(3, x, return_sites=["y"])


def test_median_and_quantiles_come_from_an_autoguide_and_are_refused_otherwise(conjugate_fit, x,
                                                                                   regression_data):
    X, y = regression_data
    guide = AutoNormal(regression.model)
    result = fit(regression.model, guide, (X, y), lr=0.05, num_steps=1500, **QUIET)
    loc = result.params["AutoNormal.locs.w"]
    scale = result.params["AutoNormal.scales.w"]
    torch.testing.assert_close(result.median(X, y)["w"], loc)
    q = result.quantiles([0.1, 0.5, 0.9], X, y)["w"]
    torch.testing.assert_close(q[1], loc)
    torch.testing.assert_close(q[2], loc + scale * dist.Normal(0.0, 1.0).icdf(torch.tensor(0.9)))
    with pytest.raises(ValueError, match="defines no median"):
        conjugate_fit.median(x)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        result.quantiles([0.5, 1.5], X, y)


def test_a_result_keeps_its_own_weights_when_a_second_fit_trains_the_same_module():
    torch.manual_seed(0)
    images = torch.bernoulli(torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(2)))
    model, guide = DeepLatentGaussian((1, 4, 4), 2, hidden=(8,)), GaussianEncoder((1, 4, 4), 2, hidden=(8,))
    first = fit(model, guide, images, batch_size=16, num_epochs=2, lr=1e-2, **QUIET)
    before = first.evaluate(images, num_samples=20, seed=0)
    weights = {k: v.clone() for k, v in first.params.items()}
    fit(model, guide, images, batch_size=16, num_epochs=3, lr=1e-1, **QUIET)  # trains the same modules
    after = first.evaluate(images, num_samples=20, seed=0)
    assert after == before
    for name, value in first.params.items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)


SCRIPT = """
import json, sys, torch
import vi_toolkit
result = vi_toolkit.load(sys.argv[1])
args = torch.load(sys.argv[2], weights_only=True)
print(json.dumps({"params": {k: v.tolist() for k, v in result.params.items()},
                  "elbo": result.evaluate(args, num_samples=50, seed=0)["elbo"],
                  "stopped": result.stopped}))
"""


def _in_a_new_process(path, data, tmp_path):
    torch.save(data, tmp_path / "data.pt")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(tmp_path / "data.pt")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fits():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    blobs = torch.cat([torch.randn(60, 2, generator=gen) + c for c in (torch.tensor([-4.0, 0.0]),
                                                                         torch.tensor([4.0, 0.0]))])
    mixture = GaussianMixture(2, 2)
    images = torch.bernoulli(torch.rand(40, 1, 4, 4, generator=gen))
    X = torch.randn(50, 2, generator=gen)
    y = X @ torch.tensor([0.5, 1.0]) + torch.randn(50, generator=gen)
    return {
        "functions": (conjugate.model, conjugate_guide.guide, 3 + torch.randn(30, generator=gen),
                      dict(num_steps=200, lr=0.05)),
        "classes with a nested spec": (mixture.model, MAPGuide(mixture), blobs,
                                       dict(optimizer="lbfgs", lr=1.0, num_steps=10)),
        "nn.Modules": (DeepLatentGaussian((1, 4, 4), 2, hidden=(8,)), GaussianEncoder((1, 4, 4), 2, hidden=(8,)),
                       images, dict(num_steps=20, lr=1e-2)),
        "an autoguide": (regression.model, AutoNormal(regression.model), (X, y), dict(num_steps=200, lr=0.05)),
    }


@pytest.mark.parametrize("case", list(_fits()))
def test_a_saved_fit_loads_in_a_new_process_with_the_same_parameters_and_evaluation(case, tmp_path):
    model, guide, data, settings = _fits()[case]
    result = fit(model, guide, data, **settings, **QUIET)
    assert result.save(tmp_path / "fit.pt") == []  # nothing needs to be passed back by hand
    loaded = _in_a_new_process(tmp_path / "fit.pt", data, tmp_path)
    assert loaded["stopped"] == result.stopped
    for name, value in result.params.items():
        torch.testing.assert_close(torch.tensor(loaded["params"][name]), value)
    assert loaded["elbo"] == pytest.approx(result.evaluate(data, num_samples=50, seed=0)["elbo"], rel=1e-5)


def test_a_closure_is_saved_with_a_note_and_loaded_when_passed_back(tmp_path, x):
    prior_scale = 10.0

    def model(x, num_data=None):
        mu = pyro.sample("mu", dist.Normal(0.0, prior_scale))
        with data_plate(x, num_data):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    result = fit(model, conjugate_guide.guide, x, num_steps=50, lr=0.05, **QUIET)
    notes = result.save(tmp_path / "fit.pt")
    assert len(notes) == 1 and "model" in notes[0] and "closure" in notes[0]
    with pytest.raises(ValueError, match="pass model=... to vi_toolkit.load"):
        load(tmp_path / "fit.pt")
    loaded = load(tmp_path / "fit.pt", model=model, device="cpu")
    torch.testing.assert_close(loaded.params["mu_loc"], result.params["mu_loc"])


def test_load_refuses_a_checkpoint_and_a_file_that_is_not_one(tmp_path, x):
    path = tmp_path / "ckpt.pt"
    fit(conjugate.model, conjugate_guide.guide, x, num_steps=5, checkpoint=path, **QUIET)
    with pytest.raises(ValueError, match="is a checkpoint, not a saved fit"):
        load(path)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        load(tmp_path / "junk.pt")


def test_the_result_text_points_to_params_after_the_fit(conjugate_fit):
    assert "mu_loc" in conjugate_fit.params
    with pytest.raises(KeyError):
        pyro.param("mu_loc")  # each fit has a store of its own: result.params holds them
    with conjugate_fit.scope():
        assert torch.equal(pyro.param("mu_loc").detach(), conjugate_fit.params["mu_loc"])


def test_wheel_installs_only_the_vi_toolkit_package(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path), root], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import zipfile

    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        names = archive.namelist()
    assert {t for t in tops if not t.endswith(".dist-info")} == {"vi_toolkit"}
    assert "vi_toolkit/models/gmm.py" in names and "vi_toolkit/guides/vae.py" in names


def test_the_toolkit_imports_beside_a_project_that_has_its_own_models_module(tmp_path):
    (tmp_path / "models.py").write_text("NAME = 'the project own models'\n")
    (tmp_path / "guides").mkdir()
    (tmp_path / "guides" / "__init__.py").write_text("NAME = 'the project own guides'\n")
    code = ("import models, guides, vi_toolkit\n"
            "from vi_toolkit.models.gmm import GaussianMixture\n"
            "from vi_toolkit.guides.gmm import MAPGuide\n"
            "print(models.NAME, '|', guides.NAME, '|', vi_toolkit.__version__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    own_models, own_guides, version = (part.strip() for part in out.stdout.split("|"))
    assert own_models == "the project own models" and own_guides == "the project own guides"
    from importlib.metadata import version as installed

    assert version == installed("vi-toolkit")
