"""The fit engine: ELBO choices, minibatch unbiasedness, reproducibility, stopping, devices."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample

from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.models import conjugate
from vi_toolkit import DivergenceError, FitError, data_plate, fit, make_elbo
from vi_toolkit.data import FitData
from vi_toolkit.elbo import IWAE, TraceELBO, TraceMeanFieldELBO

from support import globally_scaled, hierarchical_guide, hierarchical_model


@pytest.fixture(scope="module")
def x():
    return 3.0 + torch.randn(200, generator=torch.Generator().manual_seed(0))


def _gradient(model, x, num_data, elbo):
    """Gradient of the loss w.r.t. the guide's unconstrained parameters at their initial values."""
    pyro.clear_param_store()
    args, kwargs = FitData(x).call_args([x], num_data)
    loss = elbo.differentiable_loss(model, hierarchical_guide, *args, **kwargs)
    params = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
    return torch.stack(torch.autograd.grad(loss, params))


def test_minibatch_gradient_is_unbiased_with_global_and_local_latents(x):
    """E_batch[grad ELBO_B] = grad ELBO: local terms scaled by N/B, global terms not."""
    pyro.set_rng_seed(0)
    N, B, R = x.shape[0], 10, 3000
    full = _gradient(hierarchical_model, x, N, make_elbo("trace", num_particles=4000))
    one = make_elbo("trace")
    grads = torch.stack([_gradient(hierarchical_model, x[torch.randperm(N)[:B]], N, one)
                         for _ in range(R)])
    se = grads.std(0) / R ** 0.5
    assert ((grads.mean(0) - full).abs() < 4 * se + 0.02 * full.abs()).all(), (grads.mean(0), full, se)

    # the same check rejects the estimator that also scales the global terms by N/B
    wrong = torch.stack([_gradient(globally_scaled(hierarchical_model), x[torch.randperm(N)[:B]], N, one)
                         for _ in range(R)])
    # the global (mu) parameters' gradients are off by far more than the Monte Carlo error
    assert ((wrong.mean(0) - full).abs() > 6 * wrong.std(0) / R ** 0.5).any()


def _fit(x, **kwargs):
    settings = dict(lr=0.05, num_epochs=3, batch_size=50, progress=False, seed=7)
    settings.update(kwargs)
    return fit(conjugate.model, conjugate_guide.guide, x, **settings)


def test_same_seed_is_bit_identical_and_other_seed_differs(x):
    a, b, c = _fit(x), _fit(x), _fit(x, seed=8)
    assert a.history["loss"] == b.history["loss"]
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert a.history["loss"] != c.history["loss"]


def test_fits_are_independent_and_leave_the_global_store_alone(x):
    pyro.param("mu_loc", torch.tensor(42.0))  # a user's own parameter of the same name
    first = _fit(x)
    first_params = {k: v.clone() for k, v in first.params.items()}
    second = _fit(-x, seed=1)  # same parameter names, different data
    assert all(torch.equal(first.params[k], first_params[k]) for k in first_params)
    assert second.params["mu_loc"] < 0 < first.params["mu_loc"]
    assert pyro.param("mu_loc").item() == 42.0
    with first.scope():
        assert torch.equal(pyro.param("mu_loc"), first_params["mu_loc"])


def test_history_result_and_repr(x):
    result = _fit(x, val_data=x[:40])
    h = result.history
    assert len(h["loss"]) == 3 * 4 and h["epoch"] == [1, 2, 3] and h["step"] == [4, 8, 12]
    assert len(h["elbo"]) == len(h["val_elbo"]) == 3
    assert result.stopped == "max steps"
    text = repr(result)
    assert "model=model" in text and "guide=guide" in text and "elbo_per_point" in text
    assert len(text) < 300


def test_elbo_per_point_matches_the_exact_evidence_bound(x):
    """At the exact posterior the ELBO equals log p(x); the fitted ELBO per point is close."""
    mean, sd = conjugate.posterior(x)
    cov = torch.eye(200) + 100.0 * torch.ones(200, 200)  # x ~ N(0, I + tau0^2 11^T)
    log_evidence = dist.MultivariateNormal(torch.zeros(200), cov).log_prob(x) / 200
    result = fit(conjugate.model, conjugate_guide.guide, x, elbo="meanfield", lr=0.2,
                 lr_schedule="exponential", num_particles=8, num_steps=1500, seed=0,
                 progress=False, val_data=x)
    assert result.val_elbo <= log_evidence + 1e-3
    assert result.val_elbo > log_evidence - 0.01


def test_elbo_names_and_objects(x):
    assert isinstance(make_elbo("trace"), TraceELBO)
    assert isinstance(make_elbo("meanfield"), TraceMeanFieldELBO)
    assert isinstance(make_elbo("iwae", num_particles=5), IWAE)
    assert isinstance(make_elbo("auto"), TraceELBO)
    assert type(make_elbo("auto", enumerated=True)).__name__ == "TraceEnum_ELBO"
    pyro_elbo = Trace_ELBO()
    assert make_elbo(pyro_elbo) is pyro_elbo
    result = _fit(x, elbo=Trace_ELBO(), num_epochs=1)
    assert result.config["elbo_class"] == "Trace_ELBO"


def test_auto_picks_enumeration_for_a_mixture():
    """A two-component mixture with enumerated assignments: auto uses TraceEnum_ELBO."""
    data = torch.cat([torch.randn(50) - 3, torch.randn(50) + 3])

    def model(x, num_data=None):
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with data_plate(x, num_data):
            k = pyro.sample("k", dist.Categorical(torch.ones(2) / 2),
                            infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[k], 1.0), obs=x)

    def guide(x, num_data=None):
        pass

    result = fit(model, guide, data, lr=0.1, num_steps=300, progress=False, seed=0)
    assert result.config["elbo_class"] == "TraceEnum_ELBO"
    locs = result.params["locs"].sort().values
    assert torch.allclose(locs, torch.tensor([-3.0, 3.0]), atol=0.4)


def test_trace_and_meanfield_agree_in_expectation_and_iwae_is_tighter(x):
    pyro.set_rng_seed(0)
    args = (x[:20],)
    estimates = {}
    for name in ("trace", "meanfield", "iwae"):
        pyro.clear_param_store()
        elbo = make_elbo(name, num_particles=2000 if name != "iwae" else 50)
        with torch.no_grad():
            values = torch.stack([elbo.differentiable_loss(conjugate.model, conjugate_guide.guide, *args)
                                  for _ in range(20)])
        estimates[name] = (values.mean(), values.std() / 20 ** 0.5)
    (t, t_se), (m, m_se) = estimates["trace"], estimates["meanfield"]
    assert abs(t - m) < 4 * (t_se**2 + m_se**2) ** 0.5 + 1e-3
    assert estimates["iwae"][0] < m - 4 * m_se  # lower loss: a tighter bound


def test_autoguide_and_pyro_module_models(x):
    class Model(PyroModule):
        def __init__(self):
            super().__init__()
            self.mu = PyroSample(dist.Normal(0.0, 10.0))

        def forward(self, x, num_data=None):
            mu = self.mu
            with data_plate(x, num_data):
                pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    model = Model()
    guide = AutoNormal(model)
    result = fit(model, guide, x, lr=0.05, num_epochs=30, batch_size=50, progress=False, seed=0)
    mean, sd = conjugate.posterior(x)
    loc = result.params["AutoNormal.locs.mu"]
    assert abs(loc - mean) < 0.05
    # the fitted autoguide keeps its parameters after the fit, outside its scope
    assert torch.equal(guide.locs.mu.detach(), loc)


def test_early_stopping_convergence_and_callbacks(x):
    early = _fit(x, num_epochs=200, lr=0.3, val_data=x[:50], patience=2)
    assert early.stopped == "early stopping"
    assert len(early.history["elbo"]) < 200
    best = max(early.history["val_elbo"])
    assert early.history["val_elbo"][-3] == best  # the patience window followed the best epoch

    converged = fit(conjugate.model, conjugate_guide.guide, x, lr=0.1, num_steps=20000,
                    tol_rel_obj=0.01, options={"log_every": 50}, num_particles=8, progress=False, seed=0)
    assert converged.stopped == "converged" and len(converged.history["loss"]) < 20000

    seen = []
    stopped = _fit(x, num_epochs=10, callbacks=[lambda e: seen.append(e.epoch) or e.epoch == 2])
    assert seen == [1, 2] and stopped.stopped == "callback"


def test_optimizer_choices_clipping_and_schedule(x):
    sgd = _fit(x, optimizer="sgd", lr=1e-4, options={"optimizer_args": {"momentum": 0.9}})
    assert sgd.config["optimizer"] == "sgd"
    cls = _fit(x, optimizer=torch.optim.RMSprop, lr=0.01)
    assert cls.config["optimizer"] == "RMSprop"
    made = _fit(x, optimizer=lambda params: torch.optim.Adagrad(params, lr=0.1))
    assert made.config["optimizer"] == "<lambda>"
    cosine = _fit(x, lr_schedule="cosine", options={"clip_norm": 1.0}, num_epochs=4)
    lrs = cosine.history["lr"]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-3 * 0.5
    with pytest.raises(ValueError, match="unknown optimizer 'adamm'"):
        _fit(x, optimizer="adamm")


def test_divergence_names_the_step_and_site_and_keeps_the_last_good_state(x):
    def model(x, num_data=None):
        noise = pyro.param("noise", torch.tensor(5.0))  # unconstrained: one SGD step makes it < 0
        loc = pyro.param("loc", torch.tensor(0.0))
        with data_plate(x, num_data):
            pyro.sample("x", dist.Normal(loc, noise), obs=x)

    def guide(x, num_data=None):
        pass

    pyro.enable_validation(False)
    with pytest.raises(DivergenceError) as info:
        fit(model, guide, x, optimizer="sgd", lr=1.0, num_steps=50, options={"log_every": 5},
            progress=False, seed=0)
    err = info.value
    assert err.step >= 1 and f"step {err.step}" in str(err)
    assert err.site == "model site 'x'"  # its scale, the parameter noise, went negative
    assert err.last_elbo is None and "last finite ELBO was none yet" in str(err)
    assert all(torch.isfinite(v).all() for v in err.result.params.values())


def test_the_replay_of_a_divergence_redraws_numpy_s_numbers_of_an_eager_model(x):
    """An eager model whose scale is NaN when NumPy's uniform draw of the step is below 0.1:
    the replay from the last good state (step 0, one read-back in 50 steps) redraws the same
    numbers, so it finds the site NaN at the failing step. Negative control: a last good state
    without NumPy's generator (as a compiled step's, whose graph never draws from it) gives
    the replay other numbers, and at the failing step the site is finite (checked by mutation)."""
    def model(x, num_data=None):
        loc = pyro.param("loc", torch.tensor(0.0))
        scale = torch.tensor(float("nan") if np.random.rand() < 0.1 else 1.0)
        with data_plate(x, num_data):
            pyro.sample("x", dist.Normal(loc, scale), obs=x)

    def guide(x, num_data=None):
        pass

    with pytest.raises(DivergenceError) as info:
        fit(model, guide, x, num_steps=50, options={"log_every": 50, "validate": False}, progress=False, seed=0,
            compile=False)  # a compiled graph would hold the draw of its trace as a constant
    err = info.value
    assert err.step > 1 and err.site == "model site 'x'"


def test_a_model_that_fails_mid_fit_gets_a_clear_error(x):
    def model(x, num_data=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with data_plate(x, num_data):
            pyro.sample("x", dist.Normal(mu.reshape(1).expand(x.shape[0]), 1.0), obs=x)

    with pytest.raises(FitError, match="(?s)step 1: .*vectorized particles"):
        fit(model, conjugate_guide.guide, x, num_particles=4, num_steps=5, progress=False)


def test_progress_bar_on_and_off(x, capsys):
    _fit(x, progress=True, num_epochs=2)
    err = capsys.readouterr().err
    assert "fit" in err and "8/8" in err and "elbo=" in err
    _fit(x, progress=False, num_epochs=2)
    assert capsys.readouterr().err == ""


@pytest.mark.gpu
def test_cuda_fit_keeps_data_and_parameters_on_the_gpu(x):
    result = _fit(x, device="cuda")
    assert all(v.is_cuda for v in result.params.values())
    cpu = _fit(x, device="cpu")
    assert abs(result.elbo - cpu.elbo) < 0.05


def test_iwae_is_per_data_point_and_approaches_log_evidence():
    """z_i ~ N(0, 1), x_i ~ N(z_i, 1): log p(x_i) = log N(x_i; 0, 2), for any guide as K grows."""

    def model(x, num_data=None):
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x, num_data=None):  # deliberately off: the exact posterior is N(x/2, 1/2)
        with data_plate(x, num_data):
            pyro.sample("z", dist.Normal(0.3 * x, 1.0))

    pyro.set_rng_seed(0)
    x = 2.0 * torch.randn(400)
    exact = dist.Normal(0.0, 2**0.5).log_prob(x).sum()
    bounds = {}
    for k in (1, 10, 1000):
        with torch.no_grad():
            bounds[k] = -make_elbo("iwae", num_particles=k).differentiable_loss(model, guide, x)
    assert bounds[1] < bounds[10] < bounds[1000] <= exact + 0.5
    assert exact - bounds[1000] < 0.01 * (exact - bounds[1])
    # the per-point bound on a minibatch is scaled to the data set: unbiased for N/B * sum_B
    with torch.no_grad():
        half = -make_elbo("iwae", num_particles=1000).differentiable_loss(model, guide, x[:200],
                                                                         num_data=400)
    assert abs(half - 2 * dist.Normal(0.0, 2**0.5).log_prob(x[:200]).sum()) < 0.01 * abs(exact)


def test_lbfgs_fits_a_deterministic_objective_in_few_steps():
    """MAP of the conjugate mean with a point-mass guide: argmax of the exact log posterior."""
    x = 3.0 + torch.randn(100, generator=torch.Generator().manual_seed(2))

    def delta_guide(x, num_data=None):
        pyro.sample("mu", dist.Delta(pyro.param("mu_map", torch.tensor(0.0))))

    result = fit(conjugate.model, delta_guide, x, optimizer="lbfgs", lr=1.0, num_steps=5,
                 progress=False)
    mean, _ = conjugate.posterior(x)  # for a Normal posterior the mode is the mean
    assert abs(result.params["mu_map"] - mean) < 1e-4
    with pytest.raises(ValueError, match="lbfgs' needs the full batch"):
        fit(conjugate.model, delta_guide, x, optimizer="lbfgs", batch_size=10, progress=False)
