"""The engine's seams and its answers to bad input: optimizers users bring, callbacks at every
step, loggers, and the faults that used to give a wrong number or lose work."""

import csv

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from vi_toolkit import (Callback, CSVLogger, DivergenceError, FitError, FitOptions, TensorBoardLogger,
                        data_plate, fit, make_elbo)
from vi_toolkit.data import FitData
from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.models import conjugate
from vi_toolkit.step import EagerStep, map_tensors
from vi_toolkit.strategy import SingleProcess

QUIET = dict(progress=False, seed=0)


@pytest.fixture(scope="module")
def x():
    return 3.0 + torch.randn(100, generator=torch.Generator().manual_seed(0))


def _exact(x):
    return conjugate.posterior(x)


# -- optimizers a Pyro user brings ----------------------------------------------------------------
def test_a_pyro_optim_object_fits_like_its_torch_optimizer(x):
    mean, _ = _exact(x)
    result = fit(conjugate.model, conjugate_guide.guide, x, optimizer=pyro.optim.ClippedAdam({"lr": 0.05}),
                 num_steps=1500, **QUIET)
    assert result.config["optimizer"] == "ClippedAdam"
    assert abs(result.params["mu_loc"] - mean) < 0.05


def test_per_parameter_pyro_optim_arguments_reach_each_parameter(x):
    seen = {}

    def per_param(module_name, param_name):
        seen[module_name] = param_name
        return {"lr": 0.0 if module_name == "mu_scale" else 0.05}

    result = fit(conjugate.model, conjugate_guide.guide, x, optimizer=pyro.optim.Adam(per_param),
                 num_steps=50, **QUIET)
    assert set(seen) == {"mu_loc", "mu_scale"}
    assert result.params["mu_scale"] == pytest.approx(1.0)  # the guide's initial scale, never moved


def test_an_optimizer_without_lr_runs_past_the_first_interval(x):
    rmsprop = pyro.optim.adagrad_rmsprop.AdagradRMSProp  # its rate is eta, not lr
    for optimizer in (rmsprop, pyro.optim.AdagradRMSProp({"eta": 0.5})):
        result = fit(conjugate.model, conjugate_guide.guide, x, optimizer=optimizer, batch_size=20,
                     num_epochs=3, **QUIET)
        assert result.history["lr"] == [None, None, None]
        assert np.isfinite(result.elbo)


def test_a_pyro_scheduler_steps_once_an_epoch(x):
    scheduler = pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.1}, "gamma": 0.5})
    result = fit(conjugate.model, conjugate_guide.guide, x, optimizer=scheduler, batch_size=25, num_epochs=3,
                 **QUIET)
    assert result.history["lr"] == pytest.approx([0.05, 0.025, 0.0125])


def test_a_factory_that_returns_a_pyro_optim_is_told_to_pass_the_object(x):
    with pytest.raises(ValueError, match="pass a pyro.optim object itself"):
        fit(conjugate.model, conjugate_guide.guide, x, optimizer=lambda params: None, num_steps=2, **QUIET)


def test_unknown_options_are_named():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['clipnorm'\]"):
        fit(conjugate.model, conjugate_guide.guide, torch.randn(5), options={"clipnorm": 1.0}, **QUIET)
    assert FitOptions(clip_norm=2.0).clip_norm == 2.0


# -- callbacks and loggers ---------------------------------------------------------------------------
class Clamp(Callback):
    """Projects a parameter after every update (Pyro's sparse-gamma DEF clamps its scales)."""

    def __init__(self, name, low):
        self.name, self.low, self.steps = name, low, 0

    def on_step_end(self, state):
        self.steps += 1
        with torch.no_grad():
            state.params[self.name].clamp_(min=self.low)


def test_a_callback_runs_after_every_step_and_can_project_parameters(x):
    clamp = Clamp("mu_loc", 10.0)  # an unconstrained parameter held above the posterior mean
    result = fit(conjugate.model, conjugate_guide.guide, x, lr=0.05, batch_size=30, num_epochs=3,
                 callbacks=[clamp], **QUIET)
    assert clamp.steps == 3 * 4 == len(result.history["loss"])
    assert result.params["mu_loc"] == pytest.approx(10.0)


def test_a_step_callback_can_stop_the_fit_mid_epoch_and_the_partial_epoch_is_recorded(x):
    class StopAt(Callback):
        def on_step_end(self, state):
            if state.step == 6:
                state.stop("enough")

    result = fit(conjugate.model, conjugate_guide.guide, x, batch_size=10, num_epochs=5,
                 callbacks=[StopAt()], **QUIET)
    assert result.stopped == "enough" and len(result.history["loss"]) == 6
    assert result.history["step"] == [6] and np.isfinite(result.elbo)


def test_the_csv_logger_writes_the_history(tmp_path, x):
    path = tmp_path / "log.csv"
    result = fit(conjugate.model, conjugate_guide.guide, x, lr=0.05, batch_size=25, num_epochs=4,
                 val_data=x[:20], callbacks=[CSVLogger(path)], **QUIET)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == result.history["step"]
    assert [float(r["elbo"]) for r in rows] == pytest.approx(result.history["elbo"], rel=1e-12)
    assert [float(r["val_elbo"]) for r in rows] == pytest.approx(result.history["val_elbo"], rel=1e-12)
    assert all(float(r["points_per_second"]) > 0 for r in rows)


def test_the_tensorboard_event_file_holds_the_elbo_history(tmp_path, x):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = fit(conjugate.model, conjugate_guide.guide, x, lr=0.05, batch_size=25, num_epochs=4,
                 callbacks=[TensorBoardLogger(tmp_path / "tb")], **QUIET)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    elbo = events.Scalars("elbo")
    assert [e.step for e in elbo] == result.history["step"]
    assert [e.value for e in elbo] == pytest.approx(result.history["elbo"], rel=1e-6)  # float32 on disk
    assert [e.value for e in events.Scalars("lr")] == pytest.approx(result.history["lr"], rel=1e-6)


def test_a_callback_that_raises_keeps_the_fitted_state(x):
    def broken(event):
        if event.epoch == 2:
            raise RuntimeError("plotting failed")

    with pytest.raises(FitError, match=r"callback broken.on_epoch_end failed .*plotting failed") as info:
        fit(conjugate.model, conjugate_guide.guide, x, batch_size=50, num_epochs=4, callbacks=[broken], **QUIET)
    assert len(info.value.result.history["elbo"]) == 2
    assert "mu_loc" in info.value.result.params


# -- faults that used to give a wrong number without a word --------------------------------------------
def test_a_guide_that_lacks_a_model_site_is_refused_before_any_work(x):
    def model(x, num_data=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        with data_plate(x, num_data):
            pyro.sample("x", dist.Normal(mu, tau), obs=x)

    with pytest.raises(ValueError, match="the guide does not sample the model's latent site 'tau'"):
        fit(model, conjugate_guide.guide, x, num_steps=2, **QUIET)


def test_a_guide_site_of_the_wrong_shape_is_named_with_both_shapes(x):
    def guide(x, num_data=None):
        pyro.sample("mu", dist.Normal(pyro.param("loc", torch.zeros(3)), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"guide site 'mu' has shape \(3,\), but the model's 'mu' has shape \(\)"):
        fit(conjugate.model, guide, x, num_steps=2, **QUIET)


@pytest.mark.parametrize("value", [-1.0, 0.0, "big"])
def test_a_clip_norm_that_is_not_positive_is_refused(x, value):
    with pytest.raises(ValueError, match="clip_norm must be a positive number"):
        fit(conjugate.model, conjugate_guide.guide, x, num_steps=2, options={"clip_norm": value}, **QUIET)


def test_fewer_steps_than_an_epoch_still_record_an_elbo(x):
    result = fit(conjugate.model, conjugate_guide.guide, x, batch_size=10, num_steps=5, **QUIET)
    assert len(result.history["elbo"]) == 1 and np.isfinite(result.elbo)
    assert result.history["step"] == [5]


def test_resume_refuses_a_checkpoint_written_for_other_data(tmp_path, x):
    path = tmp_path / "fit.pt"
    fit(conjugate.model, conjugate_guide.guide, x, num_steps=20, checkpoint=path, **QUIET)
    with pytest.raises(ValueError, match="settings differ .*data_fingerprint"):
        fit(conjugate.model, conjugate_guide.guide, x + 1.0, num_steps=40, checkpoint=path, resume=True, **QUIET)
    # the same data resumes
    fit(conjugate.model, conjugate_guide.guide, x.clone(), num_steps=20, checkpoint=path, resume=True, **QUIET)


def test_a_checkpoint_path_that_cannot_be_written_fails_before_any_work(tmp_path, x):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        fit(conjugate.model, conjugate_guide.guide, x, num_steps=2, checkpoint=tmp_path / "a-file" / "fit.pt",
            **QUIET)


def test_a_checkpoint_write_that_fails_later_keeps_the_state(tmp_path, x, monkeypatch):
    import vi_toolkit.callbacks as callbacks

    writes = []

    def flaky(path, state):
        writes.append(path)
        if len(writes) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(callbacks, "save_checkpoint", flaky)
    with pytest.raises(FitError, match="Checkpoint.on_epoch_end failed .*disk full") as info:
        fit(conjugate.model, conjugate_guide.guide, x, batch_size=50, num_epochs=4, checkpoint=tmp_path / "f.pt",
            **QUIET)
    assert len(info.value.result.history["elbo"]) == 2


def test_data_attached_to_an_autograd_graph_is_detached(x):
    w = torch.tensor(1.0, requires_grad=True)
    result = fit(conjugate.model, conjugate_guide.guide, x * w, lr=0.05, num_steps=30, **QUIET)
    assert np.isfinite(result.elbo)


def test_numpy_integers_are_accepted_as_counts(x):
    result = fit(conjugate.model, conjugate_guide.guide, x, batch_size=np.int64(10), num_epochs=np.int64(2),
                 val_data=x[:10], patience=np.int64(3), **QUIET)
    assert result.config["batch_size"] == 10 and len(result.history["elbo"]) == 2
    assert len(fit(conjugate.model, conjugate_guide.guide, x, num_steps=np.int32(7), **QUIET).history["loss"]) == 7


def test_a_transform_that_returns_a_tensor_is_named(x):
    def binarize(tensors):
        return tensors[0] > 3

    with pytest.raises(ValueError, match="transform binarize must return a list of 1 tensor"):
        fit(conjugate.model, conjugate_guide.guide, x, transform=binarize, num_steps=2, **QUIET)


def test_a_nan_initial_parameter_without_validation_is_a_divergence_naming_it(x):
    def guide(x, num_data=None):
        loc = pyro.param("mu_loc", torch.tensor(float("nan")))
        pyro.sample("mu", dist.Normal(loc, 1.0))

    with pytest.raises(DivergenceError, match="parameter 'mu_loc'"):
        fit(conjugate.model, guide, x, num_steps=5, options={"validate": False}, **QUIET)


def test_a_parameter_made_infinite_by_the_last_update_is_a_divergence_though_every_loss_is_finite(x):
    """The one step's loss is 1e38, finite; its SGD update takes w to -inf. The read-back checks
    the parameters as well as the losses, so the fit does not return w = -inf without a word."""
    def model(x, num_data=None):
        w = pyro.param("w", torch.tensor(1.0))
        pyro.factor("push", -w * 1e38)

    message = "the update of step 1 made a parameter NaN or infinite .its loss was finite.; offending: parameter"
    with pytest.raises(DivergenceError, match=message) as info:
        fit(model, lambda x, num_data=None: None, x, optimizer="sgd", lr=10.0, num_steps=1,
            options={"validate": False}, **QUIET)
    assert info.value.result.params["w"] == 1.0  # the state before the update
    assert info.value.site == "parameter 'w'"


def test_data_that_cannot_reach_the_device_names_both_devices():
    data = torch.empty(10, device="meta")
    with pytest.raises(ValueError, match="data is on device meta and cannot be moved to the fit's device cpu"):
        fit(conjugate.model, conjugate_guide.guide, data, device="cpu", num_steps=2, **QUIET)


def test_a_divergence_from_a_parameter_leaving_its_support_points_to_step_callbacks(x):
    def model(x, num_data=None):
        noise = pyro.param("noise", torch.tensor(5.0))  # unconstrained: one SGD step makes it < 0
        with data_plate(x, num_data):
            pyro.sample("x", dist.Normal(0.0, noise), obs=x)

    with pytest.raises(DivergenceError, match="Callback.on_step_end") as info:
        fit(model, lambda x, num_data=None: None, x, optimizer="sgd", lr=1.0, num_steps=20,
            options={"validate": False, "log_every": 1}, **QUIET)
    assert info.value.site == "model site 'x'"


# -- Pyro's own example programs, as written ---------------------------------------------------------------
def test_integer_observations_fit_a_categorical_likelihood_and_are_refused_for_a_normal_one():
    words = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(0))

    def model(words, num_data=None):
        probs = pyro.param("probs", torch.ones(5) / 5, constraint=constraints.simplex)
        with data_plate(words, num_data):
            pyro.sample("w", dist.Categorical(probs), obs=words)

    result = fit(model, lambda words, num_data=None: None, words, lr=0.05, num_steps=400, **QUIET)
    frequencies = torch.bincount(words, minlength=5) / 200.0
    torch.testing.assert_close(result.params["probs"], frequencies, atol=0.02, rtol=0)

    def normal(words, num_data=None):
        loc = pyro.param("loc", torch.tensor(0.0))
        with data_plate(words, num_data):
            pyro.sample("w", dist.Normal(loc, 1.0), obs=words)

    with pytest.raises(ValueError, match="data has integer dtype torch.int64, but the model observes it at site 'w'"):
        fit(normal, lambda words, num_data=None: None, words, num_steps=2, **QUIET)


def test_data_points_off_dimension_zero_are_named():
    counts = torch.randn(16, 40)  # 40 documents on dimension 1, as Pyro's LDA example lays them out

    def model(data, num_data=None):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("documents", 40, dim=-1):
            with pyro.plate("words", 16, dim=-2):
                pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)

    with pytest.warns(UserWarning, match="dimension 0 is plate 'words' .*nested inside plate 'documents'"):
        fit(model, lambda data, num_data=None: None, counts, num_steps=2, **QUIET)

    def no_plate_of_size_n(data, num_data=None):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("documents", 40, dim=-1):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=data.sum(0))

    with pytest.warns(UserWarning, match="dimension 0 holds 16 points, but no plate of the model has that size"):
        fit(no_plate_of_size_n, lambda data, num_data=None: None, counts, num_steps=2, **QUIET)


def test_a_model_that_subsamples_its_own_full_size_plate_can_be_minibatched(x):
    n = len(x)

    def model(x):  # no num_data: the plate carries the full size N itself
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", n, subsample_size=len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        conjugate_guide.guide(x)

    mean, sd = _exact(x)
    result = fit(model, guide, x, lr=0.02, batch_size=20, num_epochs=150, **QUIET)
    assert abs(result.params["mu_loc"] - mean) < 0.5 * sd


def test_parameters_kept_in_pyro_modules_are_reported(x):
    class Regression(PyroModule):
        def __init__(self):
            super().__init__()
            self.loc = PyroParam(torch.tensor(0.0))
            self.scale = PyroParam(torch.tensor(1.0), constraint=constraints.positive)

        def forward(self, x, num_data=None):
            with data_plate(x, num_data):
                pyro.sample("x", dist.Normal(self.loc, self.scale), obs=x)

    with pyro.settings.context(module_local_params=True):
        result = fit(Regression(), lambda x, num_data=None: None, x, lr=0.05, num_steps=800, **QUIET)
        params = result.params
    assert set(params) == {"model.loc", "model.scale"}
    assert params["model.loc"] == pytest.approx(float(x.mean()), abs=0.05)
    assert params["model.scale"] == pytest.approx(float(x.std(unbiased=False)), rel=0.05)


def test_a_callback_that_wraps_the_model_leaves_the_result_with_the_users_networks():
    from vi_toolkit.guides.vae import GaussianEncoder
    from vi_toolkit.models.vae import DeepLatentGaussian
    from vi_toolkit.schedules import KLAnnealing

    torch.manual_seed(0)
    images = torch.bernoulli(torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(2)))
    model, guide = DeepLatentGaussian((1, 4, 4), 2, hidden=(8,)), GaussianEncoder((1, 4, 4), 2, hidden=(8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, guide, images, batch_size=8, num_epochs=3, lr=1e-2,
                 callbacks=[KLAnnealing(warmup_steps=8)], **QUIET)
    assert result.model is model and result.guide is guide  # the networks, not the handlers' wrappers
    assert set(result.state["modules"]) == {"model", "guide"}
    with result.scope():
        trained = model.state_dict()
    assert any(not torch.equal(trained[k], before[k]) for k in before)  # the decoder was optimised


# -- autoguides with a parameter per data point --------------------------------------------------
N_POINTS = 200


def local_model(x, num_data=None):
    """z_i ~ N(0, 3^2), x_i ~ N(z_i, 1): one latent per data point, through vi_toolkit.data_plate."""
    with data_plate(x, num_data):
        z = pyro.sample("z", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def indexed_model(x, index, num_data=None):
    """The same model, its plate given each batch's point indices."""
    with pyro.plate("data", N_POINTS, subsample=index):
        z = pyro.sample("z", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_an_autoguide_with_a_parameter_per_point_is_refused_for_minibatches_naming_the_site():
    x = 3 * torch.randn(N_POINTS, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"AutoNormal keeps parameters for each of the 200 data points of latent "
                                         r"site\(s\) \['z'\].*create_plates"):
        fit(local_model, AutoNormal(local_model), x, batch_size=50, num_steps=2, progress=False)
    fit(local_model, AutoNormal(local_model), x, num_steps=2, progress=False)  # the full batch is right


def test_an_autoguide_given_each_batchs_indices_fits_the_exact_per_point_posterior():
    x = 3 * torch.randn(N_POINTS, generator=torch.Generator().manual_seed(0))
    guide = AutoNormal(indexed_model,
                       create_plates=lambda x, index, num_data=None: pyro.plate("data", N_POINTS, subsample=index))
    result = fit(indexed_model, guide, (x, torch.arange(N_POINTS)), batch_size=50, num_epochs=500, lr=0.1,
                 num_particles=16, lr_schedule="cosine", seed=0, progress=False)
    # z_i | x_i ~ N(0.9 x_i, 0.9): every point's own posterior, in posterior sds
    sd = 0.9 ** 0.5
    assert (result.params["AutoNormal.locs.z"] - 0.9 * x).abs().max() < 0.15 * sd
    assert (result.params["AutoNormal.scales.z"] / sd - 1).abs().max() < 0.06


def _adam_step(x):
    """An eager Adam step on the conjugate model, initialised (two parameters, their moments)."""
    pyro.clear_param_store()
    step = EagerStep(conjugate.model, conjugate_guide.guide, make_elbo("trace"), optimizer="adam", lr=0.1,
                     optimizer_args=None, lr_schedule=None, total_steps=10, clip_norm=None,
                     validate=False, strategy=SingleProcess("cpu"))
    args, kwargs = FitData(x).call_args([x], None)
    step.loss(args, kwargs)  # creates the guide's parameters
    step.init()
    return step, args, kwargs


def test_a_restored_state_is_not_changed_by_the_steps_after_it(x):
    """The last good state is restored before a divergence's replay and again after it: the
    steps between must not write into it (torch's optimizer keeps the tensors it is loaded
    with and Adam updates its moments in place; checked by mutation)."""
    step, args, kwargs = _adam_step(x)
    for _ in range(3):
        step.update(args, kwargs)
    good = step.state_dict()
    kept = map_tensors(torch.clone, good)
    step.load_state_dict(good, "the last good state")
    for _ in range(3):
        step.update(args, kwargs)
    for i, moments in good["optimizer"]["state"].items():  # each parameter's m, v and t
        for k, value in moments.items():
            assert torch.equal(value, kept["optimizer"]["state"][i][k]), f"parameter {i}'s {k!r} changed"
