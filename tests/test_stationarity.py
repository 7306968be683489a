"""Fits run until converged: split R-hat, batch-means MCSE, the guide's Fisher scale, and
minibatch fits that end at the exact posterior without being told how many epochs to run."""

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.signal import lfilter

from vi_toolkit import Callback, data_plate, fit
from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.guides import regression as regression_guide
from vi_toolkit.models import conjugate, regression
from vi_toolkit.stationarity import Stationarity, batch_means, fisher_diagonal, split_rhat


def ar1(phi, steps, columns, seed):
    """``columns`` independent AR(1) series x_t = phi x_{t-1} + e_t, e_t ~ N(0, 1): (steps, columns)."""
    noise = np.random.default_rng(seed).standard_normal((steps, columns))
    return lfilter([1.0], [1.0, -phi], noise, axis=0)


def test_split_rhat_is_arviz_rhat_of_the_two_halves_and_flags_a_drift():
    x = ar1(0.9, 400, 3, seed=0)
    x[:, 0] += np.linspace(0.0, 8.0, 400)  # a drifting coordinate
    ours = split_rhat(torch.tensor(x)).numpy()
    reference = [az.rhat(x[:, j].reshape(2, 200), method="identity") for j in range(3)]
    np.testing.assert_allclose(ours, reference, rtol=1e-10)
    assert ours[0] > 1.1 and (ours[1:] < 1.1).all()


def test_batch_means_mcse_matches_the_ar1_closed_form_where_the_iid_error_does_not():
    phi, steps, columns, thin = 0.95, 20_000, 400, 10
    x = ar1(phi, steps, columns, seed=1)
    kept = list(range(0, steps, thin))
    mcse, ess = batch_means(torch.tensor(x[kept]), torch.tensor(x.cumsum(0)[kept]), kept)
    # the average of the steps after the first kept one; its exact asymptotic standard error
    # is sqrt(1 / (1 - phi)^2 / T), and its integrated autocorrelation time (1 + phi) / (1 - phi)
    T = kept[-1] - kept[0]
    exact = (1.0 / (1 - phi) ** 2 / T) ** 0.5
    assert abs(float(mcse.mean()) / exact - 1) < 0.1
    tau = (1 + phi) / (1 - phi)
    assert abs(float(ess.mean()) / (T / tau) - 1) < 0.25
    means = x[kept[0] + 1:].mean(0)
    covered = np.mean(np.abs(means) < 2 * mcse.numpy())
    assert 0.88 < covered < 0.99  # t with 15 degrees of freedom: 93.6%
    naive = x.std(0) / T**0.5  # the error of an average of independent draws
    assert np.mean(np.abs(means) < 2 * naive) < 0.5


def test_fisher_scale_of_gaussian_guides_is_their_closed_form():
    torch.manual_seed(0)
    x = torch.randn(50)
    pyro.param("mu_loc", torch.tensor(3.0))
    pyro.param("mu_scale", torch.tensor(0.5), constraint=torch.distributions.constraints.positive)
    params = dict(pyro.get_param_store().named_parameters())
    draws = 1000
    fisher = fisher_diagonal(conjugate_guide.guide, (x,), {}, [params["mu_loc"], params["mu_scale"]], draws)
    # q = N(m, s^2): score (z - m) / s^2 for m, eps^2 - 1 for log s (eps standard normal),
    # so F = (1 / s^2, 2), with Monte Carlo standard errors sqrt(2 / S) / s^2 and sqrt(56 / S)
    assert abs(float(fisher[0]) - 4.0) < 4 * (2 / draws) ** 0.5 * 4.0
    assert abs(float(fisher[1]) - 2.0) < 4 * (56 / draws) ** 0.5

    pyro.clear_param_store()
    X, y = torch.randn(50, 2), torch.randn(50)
    scale_tril = torch.linalg.cholesky(torch.tensor([[1.0, 0.9], [0.9, 1.0]]))
    pyro.param("w_loc", torch.zeros(2))
    pyro.param("w_scale_tril", scale_tril, constraint=torch.distributions.constraints.lower_cholesky)
    params = dict(pyro.get_param_store().named_parameters())
    draws = 400
    fisher = fisher_diagonal(regression_guide.guide, (X, y), {}, [params["w_loc"]], draws)
    # q = N(m, Sigma): the location's Fisher information is diag(Sigma^-1) (here 5.26, not the
    # 1 / Sigma_jj = 1 of the marginal standard deviations), standard error sqrt(2 / S) of it
    precision = torch.linalg.inv(scale_tril @ scale_tril.T).diag()
    assert ((fisher.float() / precision - 1).abs() < 4 * (2 / draws) ** 0.5).all()


def minibatch_errors(result, mean, sd):
    """(largest |m - E| / sd, largest |s / sd - 1|) of a Gaussian guide against the exact posterior."""
    p = result.params
    if "mu_loc" in p:
        return float(abs(p["mu_loc"] - mean) / sd), float(abs(p["mu_scale"] / sd - 1))
    L = p["w_scale_tril"]
    return (float(((p["w_loc"] - mean) / sd).abs().max()),
            float(((L @ L.T).diag().sqrt() / sd - 1).abs().max()))


class Iterates(Callback):
    """Records a location parameter over the last 200 steps of a fit."""

    def __init__(self, name):
        self.name, self.values = name, []

    def on_step_end(self, state):
        if state.step > state.total_steps - 200:
            self.values.append(state.params[self.name].detach().clone())

    def rms_error(self, mean, sd):
        """Root-mean-square over the recorded iterates of their largest error in posterior sds."""
        errors = torch.stack([((v - mean) / sd).abs().max() for v in self.values])
        return float(errors.pow(2).mean().sqrt())


def test_minibatch_fit_until_converged_ends_at_the_exact_conjugate_posterior():
    x = 3.0 + torch.randn(1000, generator=torch.Generator().manual_seed(0))
    mean, sd = conjugate.posterior(x)
    settings = dict(batch_size=250, lr=0.2, num_particles=64, seed=0, progress=False)
    result = fit(conjugate.model, conjugate_guide.guide, x, until="converged", **settings)
    loc_error, sd_error = minibatch_errors(result, mean, sd)
    assert loc_error < 0.05 and sd_error < 0.05, (loc_error, sd_error)
    report = result.diagnostics
    assert result.stopped == "converged" and report["converged"] and report["reason"] is None
    assert report["mcse"] <= report["tol"] and len(report["levels"]) >= 2
    rates = [level["lr"] for level in report["levels"]]
    assert rates == [0.2 * 0.5**i for i in range(len(rates))]  # halved after each phase
    assert result.history["lr"][-1] == pytest.approx(rates[-1])

    # negative control: as many steps with the learning rate kept high and no averaging end
    # on one iterate among iterates that miss the same check
    iterates = Iterates("mu_loc")
    fit(conjugate.model, conjugate_guide.guide, x, num_steps=len(result.history["loss"]),
        callbacks=[iterates], **settings)
    assert iterates.rms_error(mean, sd) > 0.05


@pytest.mark.slow
def test_minibatch_fit_until_converged_ends_at_the_exact_regression_posterior():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(1000, 3, generator=gen)
    y = X @ torch.randn(3, generator=gen) + torch.randn(1000, generator=gen)
    mean, cov = regression.posterior(X, y)
    sd = cov.diag().sqrt()
    settings = dict(batch_size=250, lr=0.1, num_particles=32, seed=0, progress=False)
    result = fit(regression.model, regression_guide.guide, (X, y), until="converged", **settings)
    loc_error, sd_error = minibatch_errors(result, mean, sd)
    assert result.diagnostics["converged"]
    assert loc_error < 0.05 and sd_error < 0.05, (loc_error, sd_error)
    iterates = Iterates("w_loc")
    fit(regression.model, regression_guide.guide, (X, y), num_steps=len(result.history["loss"]),
        callbacks=[iterates], **settings)
    assert iterates.rms_error(mean, sd) > 0.05


def logistic_model(X, y, num_data=None):
    """w ~ N(0, I);  y_i ~ Bernoulli(sigmoid(x_i^T w))."""
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
    with data_plate(X, num_data):
        pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1)), obs=y)


def logistic_posterior_on_a_grid(X, y, half_width=8.0, points=241):
    """Exact posterior mean and sds of a two-feature logistic regression by quadrature on a grid
    of +-half_width Laplace sds around the mode (Newton's method)."""
    X, y = X.double(), y.double()
    w = torch.zeros(2, dtype=torch.float64)
    for _ in range(30):
        p = torch.sigmoid(X @ w)
        hessian = (X.T * (p * (1 - p))) @ X + torch.eye(2, dtype=torch.float64)
        w = w + torch.linalg.solve(hessian, X.T @ (y - p) - w)
    half = half_width * torch.linalg.inv(hessian).diag().sqrt()
    axes = [torch.linspace(float(w[j] - half[j]), float(w[j] + half[j]), points, dtype=torch.float64) for j in range(2)]
    grid = torch.cartesian_prod(*axes)  # (points^2, 2)
    log_joint = torch.cat([-0.5 * (g**2).sum(-1) + (y @ (X @ g.T)) - torch.nn.functional.softplus(X @ g.T).sum(0)
                           for g in grid.split(4096)])
    weights = torch.softmax(log_joint, 0)
    mean = weights @ grid
    return mean.float(), (weights @ (grid - mean) ** 2).sqrt().float()


@pytest.mark.slow
def test_minibatch_fit_until_converged_ends_at_the_exact_logistic_regression_posterior():
    """A likelihood that is not Gaussian: the average's bias at each rate is what the rate
    decreases remove; the reference is quadrature, not a Gaussian formula."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 2, generator=gen)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.5, -1.0])), generator=gen)
    mean, sd = logistic_posterior_on_a_grid(X, y)
    settings = dict(batch_size=100, lr=0.02, num_particles=8, seed=0, progress=False, compile=True)
    result = fit(logistic_model, regression_guide.guide, (X, y), until="converged", **settings)
    loc_error, sd_error = minibatch_errors(result, mean, sd)
    assert result.diagnostics["converged"], result.diagnostics["reason"]
    assert loc_error < 0.05 and sd_error < 0.05, (loc_error, sd_error)
    iterates = Iterates("w_loc")
    fit(logistic_model, regression_guide.guide, (X, y), num_steps=len(result.history["loss"]),
        callbacks=[iterates], **settings)
    assert iterates.rms_error(mean, sd) > 0.05


class Record(Callback):
    """Records a scalar parameter after every step."""

    def __init__(self, name):
        self.name, self.values = name, []

    def on_step_end(self, state):
        self.values.append(float(state.params[self.name].detach()))


def test_fit_stationary_but_out_of_budget_warns_with_the_steps_it_lacks_and_returns_the_average():
    x = 3.0 + torch.randn(1000, generator=torch.Generator().manual_seed(0))
    record = Record("mu_loc")
    with pytest.warns(UserWarning, match=r"did not converge in 1600 steps: the iterates are stationary at lr "
                                         r"0.2 from step \d+, but the Monte Carlo standard error"):
        result = fit(conjugate.model, conjugate_guide.guide, x, batch_size=250, num_steps=1600, lr=0.2,
                     until="converged", callbacks=[record], seed=0, progress=False)
    report = result.diagnostics
    assert not report["converged"] and report["mcse"] > report["tol"] and report["levels"] == []
    averaged = torch.tensor(record.values[report["stationary_at"]:])  # values[i]: after step i + 1
    # the MCSE falls as 1 / sqrt(steps): the reason's estimate of the steps still needed
    lacking = len(averaged) * ((report["mcse"] / report["tol"]) ** 2 - 1)
    assert f"about {lacking:,.0f} more steps" in report["reason"]
    # the result is the average of the stationary iterates, not the last of them
    spread = float(averaged.std())
    assert abs(float(result.params["mu_loc"]) - float(averaged.mean())) < 0.05 * spread
    assert abs(record.values[-1] - float(averaged.mean())) > 0.05 * spread


def test_fit_out_of_budget_warns_and_reports_why_it_did_not_converge():
    x = 3.0 + torch.randn(200, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="did not converge in 300 steps: the iterates never became stationary"):
        result = fit(conjugate.model, conjugate_guide.guide, x, batch_size=50, num_steps=300,
                     until="converged", lr=1e-3, seed=0, progress=False)
    report = result.diagnostics
    assert result.stopped == "max steps" and not report["converged"]
    assert report["rhat"] > report["rhat_threshold"] and "R-hat" in report["reason"]
    assert report["levels"] == [] and report["lr"] == 1e-3


class Interrupt(Callback):
    """Raise KeyboardInterrupt after step ``at`` (None: never), as a user's Ctrl-C would."""

    def __init__(self, at=None):
        self.at = at

    def on_step_end(self, state):
        if state.step == self.at:
            raise KeyboardInterrupt


def test_interrupted_fit_until_converged_resumes_to_the_uninterrupted_parameters(tmp_path):
    x = 3.0 + torch.randn(1000, generator=torch.Generator().manual_seed(0))
    settings = dict(batch_size=250, num_steps=1300, until="converged", lr=0.2, num_particles=64,
                    seed=0, progress=False, options={"checkpoint_every": 25})
    with pytest.warns(UserWarning, match="did not converge"):
        whole = fit(conjugate.model, conjugate_guide.guide, x, callbacks=[Interrupt()], **settings)
    assert whole.diagnostics["levels"]  # the interruption falls after a phase ended
    path = tmp_path / "fit.pt"
    with pytest.warns(UserWarning, match="interrupted"):
        fit(conjugate.model, conjugate_guide.guide, x, callbacks=[Interrupt(at=1100)],
            checkpoint=path, **settings)
    with pytest.warns(UserWarning, match="did not converge"):
        resumed = fit(conjugate.model, conjugate_guide.guide, x, callbacks=[Interrupt()],
                      checkpoint=path, resume=True, **settings)
    for name, value in whole.params.items():
        assert torch.equal(resumed.params[name], value), name
    assert resumed.diagnostics == whole.diagnostics


def test_until_and_stationarity_refuse_bad_settings_by_name():
    x = torch.randn(100)
    common = dict(batch_size=10, progress=False)
    with pytest.raises(ValueError, match="until must be 'converged'"):
        fit(conjugate.model, conjugate_guide.guide, x, until="stationary", **common)
    with pytest.raises(ValueError, match="lr_schedule"):
        fit(conjugate.model, conjugate_guide.guide, x, until="converged", lr_schedule="cosine", **common)
    for setting in ({"tol": 0.0}, {"rhat": 1.0}, {"factor": 1.5}, {"tol": "small"}):
        with pytest.raises(ValueError, match=f"Stationarity: {next(iter(setting))}"):
            Stationarity(**setting)
    with pytest.raises(ValueError, match="window must be at least"):
        Stationarity(window=64)


def test_minibatch_convergence_benchmark_quick_runs_its_three_fits_and_says_it_did_not_converge(
        load_main, keep_threads, tmp_path):
    with pytest.warns(UserWarning, match="did not converge"):
        metrics = load_main("benchmarks/minibatch_convergence.py")(
            ["--quick", "--out", str(tmp_path), "--device", "cpu"])
    for name in ("elbo.png", "errors.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    # the quick budget is too small to converge: the report says so, and the schedule over the
    # same steps gets exactly the steps the converging fit used
    assert metrics["converged"] is False and metrics["until_converged_stopped"] == "max steps"
    assert metrics["reason"].startswith("the iterates never became stationary")
    assert metrics["until_converged_epochs"] == metrics["budget_epochs"] == metrics["schedule_same_steps_epochs"]
