"""Gradient estimators (sticking the landing, DReG) and schedules (KL annealing, lr on plateau).

References: the conjugate model's closed-form posterior; estimators written out by hand in
torch for a linear Gaussian model; torch's own ReduceLROnPlateau.
"""

import itertools
import math
import warnings
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from vi_toolkit import FitError, data_plate, fit, make_elbo
from vi_toolkit.elbo import DReG, StickingTheLanding, vimco_signal
from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.models import conjugate
from vi_toolkit.schedules import KLAnnealing, ReduceLROnPlateau

# the linear Gaussian model of Rainforth et al. (2018): z ~ N(mu, I), x | z ~ N(z, I), so that
# p(z | x) = N((mu + x) / 2, I / 2); the encoder q(z | x) = N(A x + b, s^2 I), s^2 = 2/3 at the start
D, R = 5, 4000  # latent size; data points, every one a copy of x0
_gen = torch.Generator().manual_seed(1)
MU0 = torch.randn(D, generator=_gen, dtype=torch.float64)
X0 = MU0 + 2 ** 0.5 * torch.randn(D, generator=_gen, dtype=torch.float64)
A0 = torch.eye(D, dtype=torch.float64) / 2 + 0.1 * torch.randn(D, D, generator=_gen, dtype=torch.float64)
B0 = MU0 / 2 + 0.1 * torch.randn(D, generator=_gen, dtype=torch.float64)
ENCODER_SCALE = (2 / 3) ** 0.5


def linear_model(x, num_data=None):
    mu = pyro.param("mu", MU0.clone())  # a copy: the store makes its initial value a leaf
    with data_plate(x, num_data):
        z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def linear_guide(x, num_data=None):
    """q(z_i | x_i) = N(A x_i + b_i, s_i^2 I): a bias and a scale row per point, so that each row
    of their gradients is an independent draw of one point's encoder gradient."""
    A = pyro.param("A", A0.clone())
    b = pyro.param("b", B0.expand(x.shape[0], D).clone())
    s = pyro.param("s", torch.full((x.shape[0], 1), ENCODER_SCALE, dtype=x.dtype), constraint=constraints.positive)
    with data_plate(x, num_data):
        pyro.sample("z", dist.Normal(x @ A.T + b, s).to_event(1))


@pytest.fixture
def x_rows():
    return X0.expand(R, D)


def ascent_gradients(elbo, model, guide, x, names, seed, init=None):
    """Gradients of the objective (minus the loss) w.r.t. the unconstrained ``names``, from the
    guide's initial parameters or those ``init()`` sets."""
    pyro.clear_param_store()
    if init is not None:
        init()
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(model, guide, x)
    params = [pyro.param(name).unconstrained() for name in names]
    return [-g for g in torch.autograd.grad(loss, params)]


def hand_draws(sample_shape, seed):
    """The linear Gaussian's bias rows b, log-scale rows, means and reparameterized draws z, of shape
    sample_shape + (R, D), after seeding torch with ``seed``."""
    torch.manual_seed(seed)
    b = B0.expand(R, D).clone().requires_grad_()
    log_s = torch.full((R, 1), math.log(ENCODER_SCALE), dtype=torch.float64, requires_grad=True)
    loc = X0.expand(R, D) @ A0.T + b
    z = torch.distributions.Normal(loc, log_s.exp()).rsample(sample_shape)
    return b, log_s, loc, z


def hand_iwae_surrogate(K, seed, power):
    """sum_k w~_k^power log w_k of the linear Gaussian, with log q's parameters detached.

    power=2 is DReG's guide gradient (Tucker et al. 2018), power=1 is the sticking-the-landing
    idea applied to IWAE, which is biased for K > 1. Returns the gradient w.r.t. the bias rows.
    """
    normal = torch.distributions.Normal
    b, log_s, loc, z = hand_draws((K,), seed)
    log_w = (normal(MU0, 1.0).log_prob(z) + normal(z, 1.0).log_prob(X0)
             - normal(loc.detach(), log_s.exp().detach()).log_prob(z)).sum(-1)
    w = torch.softmax(log_w.detach(), 0)
    return torch.autograd.grad((w ** power * log_w).sum(), b)[0]


def z_scores(a, b):
    """Difference of the row means of two independent samples of gradients, in standard errors."""
    return (a.mean(0) - b.mean(0)) / (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()


def snr(rows):
    """Signal-to-noise ratio |E g| / sd(g) per coordinate, averaged over the coordinates."""
    return float((rows.mean(0).abs() / rows.std(0)).mean())


# -- sticking the landing -------------------------------------------------------------------

def test_stl_gradient_variance_is_zero_at_the_exact_posterior_and_plain_variance_is_not():
    x = 3.0 + torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, sd = conjugate.posterior(x)

    def exact():
        pyro.param("mu_loc", mean.clone())
        pyro.param("mu_scale", torch.as_tensor(sd, dtype=torch.float64), constraint=constraints.positive)

    def gradients(name):
        return torch.stack([torch.stack(ascent_gradients(make_elbo(name), conjugate.model, conjugate_guide.guide,
                                                         x, ["mu_loc", "mu_scale"], seed, init=exact))
                            for seed in range(40)])

    plain, stl = gradients("trace"), gradients("stl")
    assert (plain.var(0) > 0.1).all(), plain.var(0)  # the score term's noise
    assert (stl.var(0) < 1e-20).all() and (stl.abs() < 1e-10).all(), stl.var(0)


def test_stl_is_an_unbiased_elbo_gradient_and_dropping_the_entropy_path_is_not(x_rows):
    """E[STL] = the ELBO gradient (the plain estimator's mean); the path of -log q through z counts."""
    plain = torch.cat(ascent_gradients(make_elbo("trace"), linear_model, linear_guide, x_rows, ["b", "s"], 0), 1)
    stl = torch.cat(ascent_gradients(make_elbo("stl"), linear_model, linear_guide, x_rows, ["b", "s"], 1), 1)
    assert (z_scores(stl, plain).abs() < 4).all(), z_scores(stl, plain)
    b, log_s, _, z = hand_draws((), seed=2)  # negative control: the gradient of E_q[log p(x, z)] alone
    normal = torch.distributions.Normal
    wrong = torch.cat(torch.autograd.grad((normal(MU0, 1.0).log_prob(z) + normal(z, 1.0).log_prob(X0)).sum(),
                                          [b, log_s]), 1)
    assert (z_scores(wrong, plain).abs() > 4).any(), z_scores(wrong, plain)


# -- doubly reparameterized IWAE gradients --------------------------------------------------

def test_dreg_equals_the_hand_written_estimator_and_keeps_the_iwae_model_gradient(x_rows):
    K = 10
    # max_plate_nesting given: guessing it would trace the guide, drawing numbers before the step's
    dreg_b, dreg_mu = ascent_gradients(make_elbo("iwae-dreg", num_particles=K, max_plate_nesting=1),
                                       linear_model, linear_guide, x_rows, ["b", "mu"], seed=3)
    assert torch.allclose(dreg_b, hand_iwae_surrogate(K, seed=3, power=2), rtol=1e-10, atol=1e-12)
    iwae_b, iwae_mu = ascent_gradients(make_elbo("iwae", num_particles=K, max_plate_nesting=1),
                                       linear_model, linear_guide, x_rows, ["b", "mu"], seed=3)
    assert torch.allclose(dreg_mu, iwae_mu, rtol=1e-10)  # the model's gradient is plain IWAE's
    assert not torch.allclose(dreg_b, iwae_b, rtol=0.1)


def test_dreg_with_a_global_latent_equals_the_hand_written_joint_estimator():
    """One global latent: the bound weights the whole batch jointly; DReG applies to those weights."""
    x = 3.0 + torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    K = 16
    pyro.clear_param_store()
    pyro.param("mu_loc", torch.tensor(2.0, dtype=torch.float64))
    pyro.param("mu_scale", torch.tensor(0.5, dtype=torch.float64), constraint=constraints.positive)
    pyro.set_rng_seed(4)
    elbo = make_elbo("iwae-dreg", num_particles=K, max_plate_nesting=1)
    loss = elbo.differentiable_loss(conjugate.model, conjugate_guide.guide, x)
    params = [pyro.param("mu_loc").unconstrained(), pyro.param("mu_scale").unconstrained()]
    toolkit = torch.stack([-g for g in torch.autograd.grad(loss, params)])
    torch.manual_seed(4)
    loc = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(math.log(0.5), dtype=torch.float64, requires_grad=True)
    normal = torch.distributions.Normal
    mu = normal(loc, log_scale.exp()).rsample((K,))
    log_w = (normal(0.0, 10.0).log_prob(mu) + normal(mu[:, None], 1.0).log_prob(x).sum(-1)
             - normal(loc.detach(), log_scale.exp().detach()).log_prob(mu))
    w = torch.softmax(log_w.detach(), 0)
    hand = torch.stack(torch.autograd.grad((w ** 2 * log_w).sum(), [loc, log_scale]))
    assert torch.allclose(toolkit, hand, rtol=1e-10), (toolkit, hand)


def test_dreg_is_unbiased_for_the_iwae_gradient_and_a_misweighted_variant_is_not(x_rows):
    K = 10
    iwae, = ascent_gradients(make_elbo("iwae", num_particles=K), linear_model, linear_guide, x_rows, ["b"], seed=5)
    dreg, = ascent_gradients(make_elbo("iwae-dreg", num_particles=K), linear_model, linear_guide, x_rows, ["b"],
                             seed=6)
    assert (z_scores(dreg, iwae).abs() < 4).all(), z_scores(dreg, iwae)
    misweighted = hand_iwae_surrogate(K, seed=7, power=1)  # w~ where DReG has w~^2
    assert (z_scores(misweighted, iwae).abs() > 4).any(), z_scores(misweighted, iwae)


def test_encoder_snr_decays_with_k_under_iwae_but_not_under_dreg(x_rows):
    """Rainforth et al. (2018): plain IWAE's inference-network SNR falls as 1/sqrt(K)."""
    ratios = {}
    for name in ("iwae", "iwae-dreg"):
        by_k = {K: snr(ascent_gradients(make_elbo(name, num_particles=K), linear_model, linear_guide,
                                        x_rows, ["b"], seed=K)[0]) for K in (1, 10, 100)}
        ratios[name] = by_k[100] / by_k[1]
    assert ratios["iwae"] < 0.3, ratios  # 1/sqrt(100) = 0.1 in theory
    assert ratios["iwae-dreg"] > 1.0, ratios


# -- both -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,plain", [("stl", "trace"), ("iwae-dreg", "iwae")])
def test_estimators_keep_the_value_of_their_objective(name, plain, x_rows):
    values = []
    for elbo in (name, plain):
        pyro.clear_param_store()
        pyro.set_rng_seed(8)
        values.append(make_elbo(elbo, num_particles=4).differentiable_loss(linear_model, linear_guide, x_rows))
    assert torch.allclose(values[0], values[1], rtol=1e-12)


def test_make_elbo_builds_the_estimators_by_name():
    assert isinstance(make_elbo("stl", num_particles=3), StickingTheLanding)
    assert isinstance(make_elbo("iwae-dreg", num_particles=3), DReG)
    assert make_elbo("iwae-dreg", num_particles=3).num_particles == 3


def coin_model(x, num_data=None):
    """c ~ Bernoulli(0.3), x_i | c ~ N(c, 1): a discrete latent, so its guide cannot be reparameterized."""
    c = pyro.sample("c", dist.Bernoulli(0.3))
    with data_plate(x, num_data):
        pyro.sample("x", dist.Normal(c, 1.0), obs=x)


def coin_guide(x, num_data=None):
    pyro.sample("c", dist.Bernoulli(pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)))


@pytest.mark.parametrize("name", ["stl", "iwae-dreg"])
def test_estimators_refuse_a_guide_that_is_not_reparameterized_naming_the_site(name):
    with pytest.raises(ValueError, match=f"elbo='{name}'.*guide site 'c'"):
        make_elbo(name, num_particles=2).differentiable_loss(coin_model, coin_guide, torch.zeros(5))


def offset_guide(x, num_data=None):
    """q(mu) = N(m, s^2) for the conjugate model, started 7 and 0.4 posterior sds away (N = 200)."""
    m = pyro.param("m", x.mean() + 0.5)
    s = pyro.param("s", x.new_tensor(0.1), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(m, s))


@pytest.fixture
def x200():
    return 3.0 + torch.randn(200, generator=torch.Generator().manual_seed(0))


def test_fit_with_stl_sticks_the_landing_on_the_exact_posterior_and_plain_does_not(x200):
    """At the optimum STL's gradient noise vanishes, so Adam settles on the posterior; the plain
    estimator's score-term noise keeps it wandering around it."""
    mean, sd = conjugate.posterior(x200)
    errors, classes = {}, {}
    for name in ("stl", "trace"):
        result = fit(conjugate.model, offset_guide, x200, elbo=name, num_steps=300, lr=0.05, seed=0,
                     progress=False)
        errors[name] = (abs(float(result.params["m"] - mean)) / sd, abs(float(result.params["s"]) / sd - 1))
        classes[name] = result.config["elbo_class"]
    assert classes == {"stl": "StickingTheLanding", "trace": "TraceELBO"}
    assert max(errors["stl"]) < 1e-3, errors
    assert max(errors["trace"]) > 10 * max(errors["stl"]), errors


def test_fit_refuses_dreg_for_a_guide_that_is_not_reparameterized():
    with pytest.raises(FitError, match="guide site 'c'"):
        fit(coin_model, coin_guide, torch.zeros(5), elbo="iwae-dreg", num_particles=4, num_steps=2, progress=False)


# -- VIMCO: IWAE with a guide that is not reparameterized ----------------------------------

COIN_P, COIN_X, COIN_K = 0.8, 1.5, 4  # q(c_i = 1) at the start, every x_i, the particles


def local_coin_model(x, num_data=None):
    """c_i ~ Bernoulli(0.3), x_i | c_i ~ N(2 c_i, 1): a discrete latent per data point."""
    with data_plate(x, num_data):
        c = pyro.sample("c", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(2 * c, 1.0), obs=x)


def local_coin_guide(x, num_data=None):
    """q(c_i) = Bernoulli(p_i), one p_i a row, so that each row's gradient is a separate draw."""
    p = pyro.param("p", x.new_full((x.shape[0],), COIN_P), constraint=constraints.unit_interval)
    with data_plate(x, num_data):
        pyro.sample("c", dist.Bernoulli(p))


def exact_iwae_gradients(log_w_of, K):
    """d L_K / du at u = logit(COIN_P), exactly, by summing over the 2^K draws c_1..c_K ~ q_u; and
    the mean of the estimator that differentiates log w at the drawn c only (no score term)."""
    u = torch.tensor(math.log(COIN_P / (1 - COIN_P)), dtype=torch.float64, requires_grad=True)
    q = dist.Bernoulli(torch.sigmoid(u))
    bound = path_only = 0.0
    for draw in itertools.product([0.0, 1.0], repeat=K):
        c = torch.tensor(draw, dtype=torch.float64)
        prob = q.log_prob(c).sum().exp()
        L = torch.logsumexp(log_w_of(c) - q.log_prob(c), 0) - math.log(K)
        bound, path_only = bound + prob * L, path_only + prob.detach() * L
    return torch.autograd.grad(bound, u, retain_graph=True)[0], torch.autograd.grad(path_only, u)[0]


def test_iwae_with_a_discrete_local_guide_site_is_unbiased_by_vimco_and_the_path_term_alone_is_not():
    x = torch.full((R,), COIN_X, dtype=torch.float64)
    exact, path_only = exact_iwae_gradients(
        lambda c: dist.Bernoulli(0.3).log_prob(c) + dist.Normal(2 * c, 1.0).log_prob(torch.tensor(COIN_X)), COIN_K)
    rows, = ascent_gradients(make_elbo("iwae", num_particles=COIN_K), local_coin_model, local_coin_guide, x,
                             ["p"], seed=0)
    error = (rows.mean() - exact) / (rows.std() / R ** 0.5)
    assert abs(error) < 4, (float(rows.mean()), float(exact), float(error))
    assert abs(path_only - exact) > 8 * rows.std() / R ** 0.5, (float(path_only), float(exact))


def test_iwae_with_a_discrete_global_guide_site_is_unbiased_by_vimco():
    """The coin c is global, so the bound is the batch's joint one and each call is one draw."""
    x = torch.tensor([0.8, 1.9, 1.2, 0.4, 1.1], dtype=torch.float64)
    exact, path_only = exact_iwae_gradients(
        lambda c: dist.Bernoulli(0.3).log_prob(c) + dist.Normal(c[:, None], 1.0).log_prob(x).sum(-1), COIN_K)

    def init():
        pyro.param("p", torch.tensor(COIN_P, dtype=torch.float64), constraint=constraints.unit_interval)

    draws = torch.stack([ascent_gradients(make_elbo("iwae", num_particles=COIN_K), coin_model, coin_guide, x,
                                          ["p"], seed, init=init)[0] for seed in range(400)])
    error = (draws.mean() - exact) / (draws.std() / 400 ** 0.5)
    assert abs(error) < 4, (float(draws.mean()), float(exact), float(error))
    assert abs(path_only - exact) > 8 * draws.std() / 400 ** 0.5, (float(path_only), float(exact))


def test_iwae_with_discrete_local_sites_in_a_joint_bound_is_unbiased_by_vimco():
    """A global mu (a point mass) makes the bound joint over the batch, with a coin c_i per point:
    log q of the K draws is per point, summed over the B = 3 points (B != K); the exact L_K sums
    over all 2^(K B) draws."""
    x = torch.tensor([0.3, 2.1, 1.4], dtype=torch.float64)
    K, B, m = 2, 3, 0.4

    def model(x, num_data=None):
        mu = pyro.sample("mu", dist.Normal(x.new_tensor(0.0), 1.0))
        with data_plate(x, num_data):
            c = pyro.sample("c", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(mu + 2 * c, 1.0), obs=x)

    def guide(x, num_data=None):
        pyro.sample("mu", dist.Delta(x.new_tensor(m)))
        p = pyro.param("p", x.new_tensor(COIN_P), constraint=constraints.unit_interval)
        with data_plate(x, num_data):
            pyro.sample("c", dist.Bernoulli(p))

    u = torch.tensor(math.log(COIN_P / (1 - COIN_P)), dtype=torch.float64, requires_grad=True)
    q = dist.Bernoulli(torch.sigmoid(u))
    exact = 0.0
    for draw in itertools.product([0.0, 1.0], repeat=K * B):
        c = torch.tensor(draw, dtype=torch.float64).reshape(K, B)
        log_w = (dist.Normal(0.0, 1.0).log_prob(torch.tensor(m)) + (dist.Bernoulli(0.3).log_prob(c)
                 + dist.Normal(m + 2 * c, 1.0).log_prob(x) - q.log_prob(c)).sum(-1))
        exact = exact + q.log_prob(c).sum().exp() * (torch.logsumexp(log_w, 0) - math.log(K))
    exact, = torch.autograd.grad(exact, u)
    draws = torch.stack([ascent_gradients(make_elbo("iwae", num_particles=K), model, guide, x, ["p"], seed)[0]
                         for seed in range(400)])
    error = (draws.mean() - exact) / (draws.std() / 400 ** 0.5)
    assert abs(error) < 4, (float(draws.mean()), float(exact), float(error))


def test_vimco_signal_is_the_bound_minus_the_leave_one_out_bound():
    log_w = torch.tensor([[0.3, -1.0], [1.2, 0.5], [-0.4, 2.0]], dtype=torch.float64)
    signal = vimco_signal(log_w)
    for k in range(3):
        held_out = log_w.clone()
        held_out[k] = torch.cat([log_w[:k], log_w[k + 1:]]).mean(0)
        expected = torch.logsumexp(log_w, 0) - torch.logsumexp(held_out, 0)
        assert torch.allclose(signal[k], expected, rtol=1e-12), (k, signal[k], expected)
    assert torch.equal(vimco_signal(log_w[:1]), log_w[:1])  # K = 1: the bound itself


# -- KL annealing ---------------------------------------------------------------------------

def stand_in(step=0, total_steps=100, elbo="trace", **extra):
    """The few FitState attributes a schedule reads."""
    return SimpleNamespace(step=step, total_steps=total_steps, config={"elbo": elbo, **extra.pop("config", {})},
                           **extra)


def test_kl_annealing_beta_rises_linearly_from_start_to_one():
    annealing = KLAnnealing(warmup_steps=100, start=0.2)
    annealing.on_fit_start(stand_in(step=0))
    assert annealing.beta == 0.2
    seen = []
    for step in range(1, 151):
        annealing.on_step_end(stand_in(step=step))
        seen.append(annealing.beta)
    assert seen[49] == pytest.approx(0.2 + 0.8 * 0.5) and seen[99] == 1.0 and seen[-1] == 1.0
    assert all(b > a for a, b in zip(seen[:99], seen[1:100]))  # strictly rising until step 100
    resumed = KLAnnealing(warmup_steps=100, start=0.2)
    resumed.on_fit_start(stand_in(step=75))  # a resumed fit continues the schedule
    assert resumed.beta == pytest.approx(0.2 + 0.8 * 0.75)


@pytest.mark.parametrize("name", ["trace", "meanfield"])
def test_kl_annealing_weights_the_kl_term_by_beta_and_beta_zero_leaves_the_expected_log_likelihood(name):
    """loss(beta) = -E_q[log p(x | z)] + beta KL on the same draws (KL by Monte Carlo or in closed form)."""
    x = X0.expand(20, D) + torch.randn(20, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    annealing = KLAnnealing(warmup_steps=10)
    model, guide = annealing.wrap(linear_model, linear_guide)
    pyro.clear_param_store()
    pyro.set_rng_seed(9)
    z = pyro.poutine.trace(linear_guide).get_trace(x).nodes["z"]["value"].detach()
    loc = x @ A0.T + B0
    normal = torch.distributions.Normal
    neg_log_lik = -normal(z, 1.0).log_prob(x).sum()
    if name == "trace":
        kl = (normal(loc, ENCODER_SCALE).log_prob(z) - normal(MU0, 1.0).log_prob(z)).sum()
    else:  # KL(N(m, s^2) || N(mu, 1)) = -log s + (s^2 + (m - mu)^2) / 2 - 1/2 per coordinate
        kl = (-math.log(ENCODER_SCALE) + (ENCODER_SCALE ** 2 + (loc - MU0) ** 2) / 2 - 0.5).sum()
    for step in (0, 3, 10):
        annealing.on_step_end(stand_in(step=step))
        pyro.clear_param_store()
        pyro.set_rng_seed(9)
        loss = make_elbo(name).differentiable_loss(model, guide, x)
        assert float(loss.detach()) == pytest.approx(float(neg_log_lik + step / 10 * kl), rel=1e-10), step


def test_kl_annealing_refuses_importance_weighted_objectives_and_bad_arguments():
    for name in ("iwae", "iwae-dreg"):
        with pytest.raises(ValueError, match="KLAnnealing: elbo='" + name):
            KLAnnealing(warmup_steps=10).on_fit_start(stand_in(elbo=name))
    with pytest.raises(ValueError, match="warmup_steps"):
        KLAnnealing(warmup_steps=0)
    with pytest.raises(ValueError, match="start"):
        KLAnnealing(warmup_steps=10, start=1.5)
    with pytest.warns(UserWarning, match="fewer than warmup_steps"):
        KLAnnealing(warmup_steps=1000).on_fit_start(stand_in(total_steps=100))


def test_fit_with_kl_annealing_scales_the_kl_term_by_beta(x200):
    """Over q(mu) = N(m, s^2) the annealed ELBO is maximised at s^2 = beta / (N + beta / tau0^2),
    about beta sd^2: a fit held at beta ~ 1/4 halves the posterior sd; one whose warm-up ended
    reaches the posterior sd."""
    _, sd = conjugate.posterior(x200)
    scales = {}
    for start, warmup in ((0.0, 100), (0.25, 10 ** 6)):
        annealing = KLAnnealing(warmup_steps=warmup, start=start)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # 200 steps < warmup_steps: annealed to the end
            result = fit(conjugate.model, offset_guide, x200, elbo="meanfield", num_particles=16, num_steps=200,
                         lr=0.05, seed=0, progress=False, callbacks=[annealing])
        assert annealing.beta == annealing.beta_at(200)
        scales[start] = float(result.params["s"]) / sd
    assert abs(scales[0.0] - 1) < 0.2, scales
    assert abs(scales[0.25] - 0.25 ** 0.5) < 0.12, scales


# -- learning rate on a plateau -------------------------------------------------------------

def test_reduce_lr_on_plateau_lowers_the_rate_after_patience_epochs_without_improvement():
    """The same rates as torch's ReduceLROnPlateau (mode max, no threshold), whose patience counts
    the epochs it tolerates: ours is fit's early-stopping patience, one more."""
    weight = torch.zeros(1, requires_grad=True)
    ours, theirs = torch.optim.SGD([weight], lr=0.1), torch.optim.SGD([weight], lr=0.1)
    schedule = ReduceLROnPlateau(factor=0.5, patience=3, min_lr=0.01)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(theirs, mode="max", factor=0.5, patience=2,
                                                           threshold=0.0, min_lr=0.01)
    schedule.on_fit_start(stand_in(optimizer=ours, config={"lr_schedule": None}))
    gen = torch.Generator().manual_seed(0)
    val = (-10 + 9 * (1 - torch.exp(-torch.arange(60.0) / 5)) + 0.05 * torch.randn(60, generator=gen)).tolist()
    rates = []
    for epoch, value in enumerate(val):
        schedule.on_epoch_end(stand_in(optimizer=ours, val_elbo=value, epoch=epoch))
        reference.step(value)
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"]), epoch
        rates.append(ours.param_groups[0]["lr"])
    assert rates[0] == 0.1 and rates[-1] == 0.01  # rising then flat: lowered down to the floor
    plateau = ReduceLROnPlateau(patience=2)  # the first decrease comes exactly `patience` epochs on
    sgd = torch.optim.SGD([weight], lr=1.0)
    for epoch, value in enumerate([-3.0, -2.0, -2.5, -2.1]):
        plateau.on_epoch_end(stand_in(optimizer=sgd, val_elbo=value))
        assert sgd.param_groups[0]["lr"] == (0.5 if epoch == 3 else 1.0), epoch


def test_fit_with_reduce_lr_on_plateau_lowers_the_rate_as_the_held_out_elbo_flattens():
    x = 3.0 + torch.randn(300, generator=torch.Generator().manual_seed(0))
    result = fit(conjugate.model, conjugate_guide.guide, x[:200], val_data=x[200:], batch_size=20, num_epochs=30,
                 lr=0.1, seed=0, progress=False, callbacks=[ReduceLROnPlateau(factor=0.5, patience=2)])
    lrs, vals = result.history["lr"], result.history["val_elbo"]
    weight = torch.zeros(1, requires_grad=True)
    sgd = torch.optim.SGD([weight], lr=0.1)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(sgd, mode="max", factor=0.5, patience=1, threshold=0.0)
    expected = []  # the history records each epoch's rate before the epoch-end callbacks run
    for value in vals:
        expected.append(sgd.param_groups[0]["lr"])
        reference.step(value)
    assert lrs == pytest.approx(expected)
    assert min(lrs) < 0.1  # the held-out ELBO did plateau


def test_a_resumed_fit_with_reduce_lr_on_plateau_ends_where_an_uninterrupted_one_ends(tmp_path):
    x = 3.0 + torch.randn(300, generator=torch.Generator().manual_seed(0))
    settings = dict(val_data=x[200:], batch_size=20, lr=0.1, seed=0, progress=False)
    plateau = lambda: [ReduceLROnPlateau(factor=0.5, patience=2)]  # noqa: E731
    whole = fit(conjugate.model, conjugate_guide.guide, x[:200], num_epochs=30, callbacks=plateau(), **settings)
    # interrupt after an epoch that did not beat the best held-out ELBO: the count of epochs
    # without improvement (and the best) must come back from the checkpoint
    vals = whole.history["val_elbo"]
    split = next(e for e in range(5, len(vals)) if vals[e - 1] < max(vals[:e - 1]))
    path = tmp_path / "plateau.pt"
    fit(conjugate.model, conjugate_guide.guide, x[:200], num_epochs=split, checkpoint=path, callbacks=plateau(),
        **settings)
    resumed = fit(conjugate.model, conjugate_guide.guide, x[:200], num_epochs=30, checkpoint=path, resume=True,
                  callbacks=plateau(), **settings)
    assert len(set(whole.history["lr"])) > 2  # the rate fell more than once
    assert resumed.history["lr"] == whole.history["lr"]
    assert all(torch.equal(resumed.params[k], whole.params[k]) for k in whole.params)


def test_reduce_lr_on_plateau_refuses_a_fit_without_val_data_or_with_its_own_schedule():
    with pytest.raises(ValueError, match="val_data"):
        ReduceLROnPlateau().on_epoch_end(stand_in(val_elbo=None, optimizer=None))
    with pytest.raises(ValueError, match="lr_schedule=None"):
        ReduceLROnPlateau().on_fit_start(stand_in(config={"lr_schedule": "cosine"}))
    for kwargs in ({"factor": 1.0}, {"patience": 0}, {"min_lr": -1.0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ReduceLROnPlateau(**kwargs)
