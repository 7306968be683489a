"""Compiled SVI steps (vi_toolkit.compiled): the eager step's losses and gradients, unbiased,
reproducible, guarded, and the same fits (on the CPU the graph draws the eager step's numbers).

A compile costs seconds (Inductor's C++ compiler; its cache on disk makes a repeat cheaper),
so the default run compiles a few small graphs and the longer checks are marked slow. No
timing is asserted: speed is the benchmarks' to report.
"""

import copy
import math
import os
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from torch import nn
from torch._inductor import codecache
from torch.distributions import constraints

from vi_toolkit import Callback, DivergenceError, FitError, data_plate, fit, load_checkpoint, make_elbo
from vi_toolkit.callbacks import ProgressBar
from vi_toolkit import compiled
from vi_toolkit.compiled import StepGraph, compile_plan, log1p_from_log
from vi_toolkit.graph_update import AdamRule
from vi_toolkit.linear import linear_backend, onednn_available
from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.guides.gmm import MAPGuide
from vi_toolkit.models import conjugate
from vi_toolkit.models.gmm import GaussianMixture
from vi_toolkit.traces import fit_parameters, trace_pair

from support import globally_scaled, hierarchical_guide, hierarchical_model


@pytest.fixture(scope="module")
def x():
    return 3.0 + torch.randn(100, generator=torch.Generator().manual_seed(0))


def graph_of(elbo, model, guide, args, kwargs, **options):
    """``(params, StepGraph)`` of ``elbo`` on a fresh parameter store (the guide run once first)."""
    pyro.clear_param_store()
    with torch.no_grad():
        trace_pair(model, guide, args, kwargs)
    params = fit_parameters(model, guide)
    return params, StepGraph(lambda a, k: elbo.differentiable_loss(model, guide, *a, **k), params, args,
                             kwargs, **options)


def eager_loss_and_grads(elbo, model, guide, params, args, kwargs):
    loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
    return loss.detach(), torch.autograd.grad(loss, list(params.values()))


def assert_float32_close(actual, expected):
    scale = expected.abs().max().clamp(min=1.0)
    assert (actual - expected).abs().max() <= 1e-5 * scale * max(expected.numel(), 16) ** 0.5, (actual, expected)


# -- equal to the eager step ----------------------------------------------------------------

@pytest.mark.parametrize("covariance", ["diag", pytest.param("full", marks=pytest.mark.slow)])
def test_compiled_loss_and_gradients_equal_the_eager_ones_on_a_map_mixture(covariance):
    """A deterministic objective (MAP mixture, assignments enumerated): float32 rounding apart,
    at every parameter value and on every batch, so the graph reads its inputs, not constants."""
    mixture = GaussianMixture(3, 2, covariance)
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]])
    batches = [centres[torch.randint(3, (300,), generator=gen)] + torch.randn(300, 2, generator=gen)
               for _ in range(2)]
    guide = MAPGuide(mixture)
    elbo = make_elbo("enum", max_plate_nesting=1)
    params, graph = graph_of(elbo, mixture.model, guide, (batches[0],), {"num_data": 1000})
    losses = []
    for batch in batches:
        for _ in range(2):
            args, kwargs = (batch,), {"num_data": 1000}
            loss, grads = graph(list(args))
            expected_loss, expected_grads = eager_loss_and_grads(elbo, mixture.model, guide, params, args, kwargs)
            assert_float32_close(loss, expected_loss)
            assert len(grads) == len(expected_grads) == len(params)
            for g, e in zip(grads, expected_grads):
                assert_float32_close(g, e)
            losses.append(float(loss))
            with torch.no_grad():  # a step: the next replay must see the new values
                for p in params.values():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
    # the check has power: a graph holding the first parameters or batch as constants would
    # have repeated the first loss
    assert len(set(losses)) == len(losses)


def test_compiled_stochastic_loss_equals_the_eager_one_at_the_same_draws():
    """On the CPU the compiled graph draws with torch's random operations, the eager step's
    numbers (4 vectorized particles, a minibatch of a global and a local latent)."""
    x = torch.randn(20)
    elbo = make_elbo("trace", num_particles=4, max_plate_nesting=1)
    args, kwargs = (x,), {"num_data": 100}
    params, graph = graph_of(elbo, hierarchical_model, hierarchical_guide, args, kwargs)
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        loss, grads = graph(list(args))
        pyro.set_rng_seed(seed)
        expected_loss, expected_grads = eager_loss_and_grads(elbo, hierarchical_model, hierarchical_guide,
                                                             params, args, kwargs)
        assert_float32_close(loss, expected_loss)
        for g, e in zip(grads, expected_grads):
            assert_float32_close(g, e)
    pyro.set_rng_seed(0)
    first = graph(list(args))[0]
    assert graph(list(args))[0] != first  # every replay draws afresh


@pytest.mark.slow
@pytest.mark.parametrize("name", ["meanfield", "iwae"])
def test_compiled_meanfield_and_iwae_losses_equal_the_eager_ones_at_the_same_draws(name):
    # fixed data: on 2 of 40 draws of x the compiled IWAE gradients differed from the eager ones
    # by 5e-5 of their size (the rounding of log weights of hundreds that cancel), past the tolerance
    pyro.set_rng_seed(0)
    x = torch.randn(20)
    elbo = make_elbo(name, num_particles=4, max_plate_nesting=1)
    args, kwargs = (x,), {"num_data": 100}
    params, graph = graph_of(elbo, hierarchical_model, hierarchical_guide, args, kwargs)
    pyro.set_rng_seed(3)
    loss, grads = graph(list(args))
    pyro.set_rng_seed(3)
    expected_loss, expected_grads = eager_loss_and_grads(elbo, hierarchical_model, hierarchical_guide,
                                                         params, args, kwargs)
    assert_float32_close(loss, expected_loss)
    for g, e in zip(grads, expected_grads):
        assert_float32_close(g, e)


@pytest.mark.slow
def test_compiled_gradient_is_unbiased_and_the_globally_scaled_estimator_is_not(x):
    """Inductor's own random stream (``fallback_random=False``, the CUDA path's generator): the
    mean of R compiled minibatch gradients equals the full-data gradient (eager, 4000
    particles) within Monte Carlo error; the estimator that
    scales the global terms by N/B too (test_fit's negative control) fails the same check."""
    x = torch.cat([x, x])  # N = 200
    N, B, R = x.shape[0], 10, 3000
    pyro.set_rng_seed(0)
    full_args = (x,), {"num_data": N}
    params, _ = graph_of(make_elbo("trace"), hierarchical_model, hierarchical_guide, *full_args)
    full_elbo = make_elbo("trace", num_particles=4000, max_plate_nesting=1)
    full = torch.stack(eager_loss_and_grads(full_elbo, hierarchical_model, hierarchical_guide, params,
                                            *full_args)[1])

    one = make_elbo("trace", max_plate_nesting=1)
    for model, guide, unbiased in ((hierarchical_model, hierarchical_guide, True),
                                   (globally_scaled(hierarchical_model), globally_scaled(hierarchical_guide), False)):
        _, graph = graph_of(one, model, guide, (x[:B],), {"num_data": N}, options={"fallback_random": False})
        grads = torch.stack([torch.stack(graph([x[torch.randperm(N)[:B]]])[1])
                             for _ in range(R)])
        se = grads.std(0) / R ** 0.5
        if unbiased:
            assert ((grads.mean(0) - full).abs() < 4 * se + 0.02 * full.abs()).all(), (grads.mean(0), full, se)
        else:
            assert ((grads.mean(0) - full).abs() > 6 * se).any()


@pytest.mark.parametrize("optimizer, settings, clip_norm", [
    (torch.optim.AdamW, {"weight_decay": 0.1, "betas": (0.8, 0.99)}, 0.5),
    pytest.param(torch.optim.Adam, {"weight_decay": 0.05, "eps": 1e-6}, None, marks=pytest.mark.slow),
], ids=["AdamW, clipped", "Adam, L2 decay"])
def test_adam_s_update_in_the_graph_moves_parameters_and_state_as_torch_s_adam(optimizer, settings, clip_norm):
    """The graph's update (vi_toolkit.graph_update) against torch's Adam stepping the eager
    gradients from the same start, on a deterministic objective (MAP mixture): parameters, m,
    v and t equal to float32 rounding after each step, with two parameter groups, a
    learning rate changed between steps (the graph reads it at every call) and, before the
    last step, the state after the second loaded back (``load_state_dict``, as a checkpoint or
    the last good state: new state tensors, the old rates, which the graph must take up); a
    step at the old rate lands elsewhere, so the check sees the rate."""
    mixture = GaussianMixture(3, 2, "diag")
    gen = torch.Generator().manual_seed(2)
    batch = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]])[torch.randint(3, (300,), generator=gen)]
    args, kwargs = (batch + torch.randn(300, 2, generator=gen),), {"num_data": 300}
    guide, elbo = MAPGuide(mixture), make_elbo("enum", max_plate_nesting=1)
    pyro.clear_param_store()
    with torch.no_grad():
        trace_pair(mixture.model, guide, args, kwargs)
    start = {k: v.detach().clone() for k, v in fit_parameters(mixture.model, guide).items()}
    names = sorted(start)

    def run(params, step_fn):
        """Five steps from ``start`` (the second group's rate raised before the third, the
        state after the second loaded back before the fifth); the parameters and Adam's state
        after each."""
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(start[k])
        opt = optimizer([{"params": [params[k] for k in names[:2]], "lr": 0.05},
                         {"params": [params[k] for k in names[2:]]}], lr=0.02, **settings)
        after = []
        for step in range(5):
            if step == 2:
                saved = copy.deepcopy(opt.state_dict())
                opt.param_groups[1]["lr"] = 0.2
            if step == 4:
                opt.load_state_dict(saved)
            step_fn(opt)
            after.append({k: (params[k].detach().clone(),
                              *[opt.state[params[k]][s].clone() for s in ("exp_avg", "exp_avg_sq", "step")])
                          for k in names})
        return after

    params = fit_parameters(mixture.model, guide)

    def eager(opt):
        opt.zero_grad()
        elbo.differentiable_loss(mixture.model, guide, *args, **kwargs).backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), clip_norm)
        opt.step()

    expected = run(params, eager)
    graphs = []

    def in_graph(opt):
        if not graphs:
            rule, why = AdamRule.for_step(opt, params.values(), clip_norm=clip_norm, world=1)
            assert why is None
            graphs.append(StepGraph(lambda a, k: elbo.differentiable_loss(mixture.model, guide, *a, **k), params,
                                    args, kwargs, rule=rule))
        _, grads = graphs[0](list(args))
        assert grads == []

    actual = run(params, in_graph)
    for a, e in zip(actual, expected):
        for k in names:
            for value, reference in zip(a[k], e[k]):
                assert_float32_close(value, reference)
    # negative control: at the third step the second group moved by 0.2's step, not 0.02's
    for k in names[2:]:
        moved = expected[2][k][0] - expected[1][k][0]
        assert (actual[2][k][0] - (expected[1][k][0] + moved * 0.1)).abs().max() > 1e-4


def test_log1p_from_log_is_log1p_to_float32_rounding_where_log_of_one_plus_y_is_not():
    """The graph's log1p on the CPU, against float64 log1p of the same float32 values, from
    1e-30 to 1e30 and at -1, inf, nan; the naive log(1 + y) loses every digit at tiny y."""
    magnitudes = torch.logspace(-30, 30, 2001, dtype=torch.float64)
    y = torch.cat([magnitudes, -magnitudes[magnitudes < 1], torch.linspace(-0.999, 3.0, 4001, dtype=torch.float64)])
    y = y.float()
    reference = torch.log1p(y.double())
    relative = ((log1p_from_log(y).double() - reference).abs() / reference.abs()).max()
    assert relative < 4 * torch.finfo(torch.float32).eps, relative
    naive = ((torch.log(1 + y).double() - reference).abs() / reference.abs()).max()
    assert naive > 0.5  # the negative control: the formula's point
    special = torch.tensor([-1.0, math.inf, math.nan, -2.0])
    assert torch.equal(log1p_from_log(special).isnan(), torch.tensor([False, False, True, True]))
    assert log1p_from_log(special)[:2].tolist() == [-math.inf, math.inf]


def traced_and_hoisted(f, *inputs):
    """``(graph as traced, graph after compiled._hoist_broadcasts)`` of ``f`` at ``inputs``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    traced, hoisted = make_fx(f)(*inputs), make_fx(f)(*inputs)
    compiled._hoist_broadcasts(hoisted)
    return traced, hoisted


def elementwise_shapes(gm, op):
    return [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.target is op]


def test_elementwise_operations_of_a_broadcast_tensor_run_before_the_broadcast_to_the_same_values():
    """A Bernoulli's logits of probabilities expanded over a plate (torch's clamp, log, log1p of
    the expanded tensor): after the pass the logs take the 8 particles' values, not 8 x 400, and
    the graph's outputs are the traced graph's."""
    def logits_loss(p, x):
        q = p.expand(8, 400).clamp(1e-6, 1 - 1e-6)
        logits = torch.log(q) - torch.log1p(-q)
        return (x * logits - torch.nn.functional.softplus(logits)).sum(), torch.sigmoid(logits) - x

    gen = torch.Generator().manual_seed(0)
    p, x = torch.rand(8, 1, generator=gen), (torch.rand(8, 400, generator=gen) < 0.3).float()
    traced, hoisted = traced_and_hoisted(logits_loss, p, x)
    aten = torch.ops.aten
    assert elementwise_shapes(traced, aten.log.default) == [(8, 400)]
    assert elementwise_shapes(hoisted, aten.log.default) == [(8, 1)]
    assert elementwise_shapes(hoisted, aten.log1p.default) == [(8, 1)]
    assert elementwise_shapes(hoisted, aten.sub.Tensor)[0] == (8, 1)
    (loss, residual), (expected_loss, expected_residual) = hoisted(p, x), traced(p, x)
    # to float32 rounding: torch's CPU kernels take vectorized and scalar paths by size and
    # layout, whose log and sigmoid differ in the last bit, and sum in another order
    assert_float32_close(residual, expected_residual)
    assert_float32_close(loss, expected_loss)


def test_the_broadcast_is_kept_where_moving_it_would_change_a_dtype_or_a_layout_read():
    """Negative controls: a 0-d float64 broadcast against float32 values promotes them to
    float64, which its 0-d source would not (type promotion ignores 0-d tensors); a ``view`` of
    the result reads its memory's layout, which a broadcast (zero strides) does not have; a
    random draw over a broadcast draws for every element."""
    aten = torch.ops.aten

    def promoted(scale, x):
        return (scale.expand(8, 400) * x).sum(-1)

    _, hoisted = traced_and_hoisted(promoted, torch.tensor(2.0, dtype=torch.float64), torch.rand(8, 1))
    assert elementwise_shapes(hoisted, aten.mul.Tensor) == [(8, 400)]
    assert hoisted(torch.tensor(2.0, dtype=torch.float64), torch.rand(8, 1)).dtype == torch.float64

    def viewed(p):
        return torch.log(p.expand(8, 400)).view(3200)

    _, hoisted = traced_and_hoisted(viewed, torch.rand(8, 1))
    assert elementwise_shapes(hoisted, aten.log.default) == [(8, 400)]

    def drawn(p):  # a draw for every element of the broadcast, not one a particle
        return torch.bernoulli(p.expand(8, 400)).sum(-1)

    _, hoisted = traced_and_hoisted(drawn, torch.rand(8, 1))
    assert elementwise_shapes(hoisted, aten.bernoulli.default) == [(8, 400)]


def traced_and_merged(f, *inputs):
    """``(graph as traced, graph after compiled._merge_small_draws)`` of ``f`` at ``inputs``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    traced, merged = make_fx(f)(*inputs), make_fx(f)(*inputs)
    compiled._merge_small_draws(merged)
    return traced, merged


def draws_of(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.aten.normal_.default]


def replayed(gm, *inputs, seed=0):
    """``gm``'s outputs from a seeded generator, and the generator's state after them."""
    torch.manual_seed(seed)
    out = gm(*inputs)
    return out, torch.get_rng_state()


def assert_same_draws(traced, merged, *inputs):
    (out, state), (expected, expected_state) = replayed(merged, *inputs), replayed(traced, *inputs)
    assert all(torch.equal(a, b) for a, b in zip(out, expected)), "the merged draw changed the numbers"
    assert torch.equal(state, expected_state), "the merged draw left the generator in another state"


def test_small_standard_draws_are_merged_into_one_draw_of_the_same_numbers():
    """An AutoNormal-like guide of three sites (1, 1 and 8 values, loc + scale * eps each,
    arithmetic between the draws): one draw of 10 after the pass, the same numbers bit for bit
    and the same generator state after it, in float32 and float64."""
    def guide(loc, scale):
        mu = loc[0] + scale[0] * torch.empty((), dtype=loc.dtype).normal_()
        tau = torch.exp(loc[1] + scale[1] * torch.empty((), dtype=loc.dtype).normal_())
        theta = mu + tau * torch.empty(8, dtype=loc.dtype).normal_()
        return mu, tau, theta

    for dtype in (torch.float32, torch.float64):
        loc, scale = torch.tensor([0.5, -1.0, 0.0], dtype=dtype), torch.tensor([0.1, 0.2, 0.3], dtype=dtype)
        traced, merged = traced_and_merged(guide, loc, scale)
        assert len(draws_of(traced)) == 3
        assert [tuple(n.meta["val"].shape) for n in draws_of(merged)] == [(10,)]
        assert_same_draws(traced, merged, loc, scale)


def test_draws_are_kept_apart_where_merging_would_change_the_numbers():
    """Negative controls: 8 + 8 values (torch draws 16 or more by a vectorised Box-Muller, other
    numbers than one at a time), a uniform draw between two normal ones (the merged draw would
    take the numbers the uniform one takes), and a draw from another generator stay apart; their
    numbers are the traced graph's."""
    def halves(x):
        return x + torch.empty(8).normal_(), x - torch.empty(8).normal_()

    traced, merged = traced_and_merged(halves, torch.zeros(8))
    assert len(draws_of(merged)) == 2
    assert_same_draws(traced, merged, torch.zeros(8))

    def interleaved(x):
        return x + torch.empty(3).normal_(), torch.rand(2), x - torch.empty(3).normal_()

    traced, merged = traced_and_merged(interleaved, torch.zeros(3))
    assert len(draws_of(merged)) == 2
    assert_same_draws(traced, merged, torch.zeros(3))

    other = torch.Generator().manual_seed(1)

    def two_generators(x):
        return x + torch.empty(3).normal_(generator=other), x - torch.empty(3).normal_()

    _, merged = traced_and_merged(two_generators, torch.zeros(3))
    assert len(draws_of(merged)) == 2


@pytest.mark.slow
@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear primitive")
def test_a_network_s_products_by_onednn_and_by_mm_equal_the_eager_step_at_the_same_draws():
    """A VAE on the oneDNN route: its two 256 x 256 layers' products (16.8 MFLOP at batch 128)
    stay oneDNN's, the small ones go to torch's mm; loss and every gradient equal the eager
    step's at the same draws, at two parameter values."""
    from vi_toolkit.guides.vae import GaussianEncoder
    from vi_toolkit.models.vae import DeepLatentGaussian

    torch.manual_seed(0)
    model = DeepLatentGaussian((1, 16, 16), 8, hidden=(256,), activation="softplus")
    guide = GaussianEncoder((1, 16, 16), 8, hidden=(256,), activation="softplus")
    x = (torch.rand(128, 1, 16, 16) < 0.3).float()
    elbo = make_elbo("trace", max_plate_nesting=1)
    args, kwargs = (x,), {"num_data": 1000}
    with linear_backend("onednn"):
        params, graph = graph_of(elbo, model, guide, args, kwargs)
        for seed in (0, 1):
            pyro.set_rng_seed(seed)
            loss, grads = graph([x])
            pyro.set_rng_seed(seed)
            expected_loss, expected_grads = eager_loss_and_grads(elbo, model, guide, params, args, kwargs)
            assert_float32_close(loss, expected_loss)
            assert len(grads) == len(expected_grads)
            for g, e in zip(grads, expected_grads):
                assert_float32_close(g, e)
            with torch.no_grad():
                for p in params.values():
                    p.add_(0.01 * torch.randn_like(p))


CACHED_FIT = """
import torch, torch._dynamo.utils
from vi_toolkit import fit
from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.models import conjugate
x = 3.0 + torch.randn(100, generator=torch.Generator().manual_seed(0))
reports = [fit(conjugate.model, conjugate_guide.guide, x, num_steps=100, num_particles=3, lr=0.05, progress=False,
                seed=0, compile=True, options={"log_every": log_every}).config["compile"] for log_every in (10, 50)]
counters = torch._dynamo.utils.counters["inductor"]
print(*[(r["used"], r["steps_per_call"]) for r in reports], counters["fxgraph_cache_hit"],
      counters["fxgraph_cache_miss"])
"""


@pytest.mark.slow
def test_a_second_process_takes_the_compiled_step_from_inductor_s_cache(tmp_path):
    """Two processes on one (empty) cache folder, each with a fit of one step a call and a fit
    of blocks of 50 steps (a loop in the graph): the first compiles both graphs (two cache
    misses), the second is served both from the cache on disk (two hits, no miss)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", CACHED_FIT], env=env, capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(2)]
    assert runs[0] == ["(True,", "1)", "(True,", "50)", "0", "2"], runs
    assert runs[1] == ["(True,", "1)", "(True,", "50)", "2", "0"], runs


# -- the plan and the guards ---------------------------------------------------------------

class Wrapping(Callback):
    def wrap(self, model, guide):
        return model, guide


def test_compile_plan_compiles_long_fits_only_and_refuses_what_a_graph_cannot_follow():
    assert compile_plan("auto", total_steps=compiled.AUTO_MIN_STEPS, validate="first", callbacks=[]) == (True, None)
    short, reason = compile_plan("auto", total_steps=200, validate="first", callbacks=[])
    assert not short and str(compiled.AUTO_MIN_STEPS) in reason
    assert compile_plan(True, total_steps=5, validate="first", callbacks=[]) == (True, None)
    assert compile_plan(False, total_steps=10 ** 9, validate="first", callbacks=[])[0] is False
    with pytest.raises(ValueError, match="compile=True: validate=True"):
        compile_plan(True, total_steps=5, validate=True, callbacks=[])
    with pytest.raises(ValueError, match="compile=True: callback Wrapping wraps the model"):
        compile_plan(True, total_steps=5, validate="first", callbacks=[Wrapping()])
    with pytest.warns(UserWarning, match="running the eager step: callback Wrapping"):
        assert not compile_plan("auto", total_steps=10 ** 6, validate="first", callbacks=[Wrapping()])[0]
    for bad in ("yes", 1.0, None):
        with pytest.raises(ValueError, match="compile must be 'auto', True or False"):
            compile_plan(bad, total_steps=5, validate="first", callbacks=[])


def test_a_short_auto_fit_runs_eagerly_and_says_why(x):
    result = fit(conjugate.model, conjugate_guide.guide, x, num_steps=20, progress=False, seed=0)
    report = result.config["compile"]
    assert report["requested"] == "auto" and report["used"] is False and report["graphs"] == 0
    assert "20 steps" in report["reason"]
    with pytest.raises(ValueError, match="compile must be"):
        fit(conjugate.model, conjugate_guide.guide, x, num_steps=20, progress=False, compile="always")


def branching_model(x, num_data=None):
    """Data-dependent control flow: which likelihood depends on a value of the batch."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with data_plate(x, num_data):
        if x.mean() > 0:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)
        else:
            pyro.sample("x", dist.Cauchy(mu, 1.0), obs=x)


def growing_guide(x, num_data=None):
    """Creates a new parameter at every call: no fixed number of parameters."""
    store = pyro.get_param_store()
    extra = pyro.param(f"extra_{len(store)}", torch.tensor(0.0))
    pyro.sample("mu", dist.Normal(pyro.param("mu_loc", torch.tensor(0.0)) + extra, 1.0))


class NormedGuide(nn.Module):
    """q(mu) = N(mean of batch-normed x, 1): batch norm updates its statistics in place."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(1)

    def forward(self, x, num_data=None):
        pyro.module("guide", self)
        pyro.sample("mu", dist.Normal(self.norm(x.unsqueeze(-1)).mean(), 1.0))


@pytest.mark.parametrize("model, make_guide, why", [
    (branching_model, lambda: conjugate_guide.guide, "tracing the step failed"),
    (conjugate.model, lambda: growing_guide, "creates or replaces parameters"),
    (conjugate.model, NormedGuide, "changes state other than its parameters"),
], ids=["data-dependent control flow", "a parameter created in the step", "batch-norm statistics"])
def test_a_step_without_fixed_structure_falls_back_with_one_warning_or_raises(x, monkeypatch, model, make_guide,
                                                                               why):
    """These are caught while tracing, before anything is compiled; "auto" then runs the eager
    step from the first step on, so the fit equals a fit with compile=False."""
    settings = dict(num_steps=30, lr=0.05, progress=False, seed=3)
    with pytest.raises(FitError, match=f"CompileError: compile=True: .*{why}"):
        fit(model, make_guide(), x, compile=True, **settings)
    monkeypatch.setattr(compiled, "AUTO_MIN_STEPS", 10)
    torch.manual_seed(0)  # a module guide's initial weights
    with pytest.warns(UserWarning, match=f"compile='auto': running the eager step: .*{why}") as caught:
        fallen = fit(model, make_guide(), x, **settings)
    assert sum("compile='auto'" in str(w.message) for w in caught) == 1
    assert fallen.config["compile"]["used"] is False and why in fallen.config["compile"]["reason"]
    torch.manual_seed(0)
    eager = fit(model, make_guide(), x, compile=False, **settings)
    assert fallen.history["loss"] == eager.history["loss"]


def test_seeded_compiled_fits_are_bit_identical_equal_the_eager_fit_and_catch_a_site_added_between_epochs(x):
    """One small graph, compiled twice (the second time from Inductor's cache): the same seed
    gives the same fit; on the CPU it draws the eager fit's numbers, so the eager fit of that
    seed has the same losses to float32 rounding (and another seed's does not); a model that
    grows a site at an epoch's end stops a compile=True fit."""
    settings = dict(lr=0.1, lr_schedule="cosine", batch_size=25, num_epochs=100, num_particles=2,
                    progress=False, seed=5, compile=True)
    a, b = (fit(conjugate.model, conjugate_guide.guide, x, **settings) for _ in range(2))
    assert a.config["compile"]["used"] and a.config["compile"]["graphs"] == 1
    assert a.config["compile"]["update"] == "in the graph"  # Adam's update, with the cosine schedule
    assert a.config["compile"]["seconds"] > 0
    assert a.history["loss"] == b.history["loss"]
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    mean, sd = conjugate.posterior(x)
    assert abs(float(a.params["mu_loc"]) - float(mean)) < 0.5 * float(sd)
    eager = fit(conjugate.model, conjugate_guide.guide, x, **{**settings, "compile": False})
    assert eager.history["loss"] == pytest.approx(a.history["loss"], rel=1e-5)
    other_seed = fit(conjugate.model, conjugate_guide.guide, x, **{**settings, "compile": False, "seed": 6})
    assert other_seed.history["loss"] != pytest.approx(a.history["loss"], rel=1e-5)

    growing_model, switch = model_that_grows_a_site(after_step=0)
    with pytest.raises(FitError, match="sites of the model or guide changed.*'model', 'nuisance'"):
        fit(growing_model, conjugate_guide.guide, x, callbacks=[switch], **settings)


def model_that_grows_a_site(after_step):
    """``(model, callback)``: the conjugate model, which gains the site ``nuisance`` once the
    epoch-end callback has seen a step past ``after_step``."""
    extra = {"on": False}

    def growing_model(x, num_data=None):
        conjugate.model(x, num_data)
        if extra["on"]:
            pyro.sample("nuisance", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    def switch(event):
        extra["on"] = extra["on"] or event.step > after_step

    return growing_model, switch


def test_a_site_added_late_in_a_full_batch_fit_is_caught_within_the_checks_widest_spacing(x, monkeypatch):
    """Full batch: every step ends an epoch, and the check of the sites (one eager trace) spaces
    itself out while they stay unchanged (100, 200, 400 steps, then CHECK_AT_MOST); a site that
    a callback adds after 1,000 steps is still caught, no later than CHECK_AT_MOST steps on (the
    checks' share of the time not limiting them: see the next test)."""
    monkeypatch.setattr(compiled, "CHECK_TIME_SHARE", 1.0)
    growing_model, switch = model_that_grows_a_site(after_step=999)
    with pytest.raises(FitError, match="sites of the model or guide changed.*'model', 'nuisance'") as caught:
        fit(growing_model, conjugate_guide.guide, x, num_steps=3000, lr=0.05, progress=False, seed=0,
            compile=True, callbacks=[switch])
    assert 1000 < caught.value.step <= 1000 + compiled.CHECK_AT_MOST + 1


def test_checks_of_the_sites_that_cost_more_than_their_share_of_the_time_wait(x, monkeypatch):
    """With the checks' share of the time unbounded (100%) a full-batch fit of 3,000 steps checks
    the sites at steps 100, 300, 700, 1,500 and 2,300; at CHECK_TIME_SHARE = 2% a check that
    takes 1,000 s (a clock moved on inside it) waits 49,000 s for the next one, so the fit
    checks once, at step 100. The fits' losses are the same."""
    clock = {"offset": 0.0, "cost": 0.0, "checks": 0}
    perf_counter, site_structure = compiled.time.perf_counter, compiled.site_structure

    def costly_site_structure(*args, **kwargs):
        clock["checks"] += 1
        clock["offset"] += clock["cost"]
        return site_structure(*args, **kwargs)

    monkeypatch.setattr(compiled, "site_structure", costly_site_structure)
    monkeypatch.setattr(compiled.time, "perf_counter", lambda: perf_counter() + clock["offset"])
    runs = {}
    for share, cost in ((1.0, 0.0), (0.02, 1000.0)):
        monkeypatch.setattr(compiled, "CHECK_TIME_SHARE", share)
        clock.update(cost=cost, checks=0)
        result = fit(conjugate.model, conjugate_guide.guide, x, num_steps=3000, lr=0.05, progress=False, seed=0,
                     compile=True)
        runs[share] = (clock["checks"], result.history["loss"])
    (unbounded_checks, unbounded), (bounded_checks, bounded) = runs[1.0], runs[0.02]
    assert unbounded_checks - bounded_checks == 4
    assert unbounded == bounded


def test_an_optimizer_other_than_adam_applies_the_graph_s_gradients_and_the_report_says_so(x):
    """SGD with momentum: the graph returns the gradients and torch's SGD applies them; the
    fit equals the eager one to float32 rounding (the same draws on the CPU)."""
    settings = dict(optimizer="sgd", options={"optimizer_args": {"momentum": 0.9}}, lr=0.001, num_steps=60,
                    num_particles=2, progress=False, seed=4)
    compiled_fit = fit(conjugate.model, conjugate_guide.guide, x, compile=True, **settings)
    report = compiled_fit.config["compile"]
    assert report["used"] and report["update"] == "by the optimizer: SGD is not torch's Adam or AdamW"
    eager = fit(conjugate.model, conjugate_guide.guide, x, compile=False, **settings)
    assert compiled_fit.history["loss"] == pytest.approx(eager.history["loss"], rel=1e-5)


# -- blocks: a loop of steps in one graph ---------------------------------------------------

class StepsSeen(Callback):
    """Records ``state.step`` at every ``on_step_end``; with ``every_step=False`` a compiled fit
    may call it once a block."""

    def __init__(self, every_step):
        self.every_step, self.steps = every_step, []

    def on_step_end(self, state):
        self.steps.append(state.step)


@pytest.mark.parametrize("update", [
    dict(),
    pytest.param(dict(optimizer="adamw", optimizer_args={"weight_decay": 0.1}, clip_norm=0.5),
                 marks=pytest.mark.slow),
], ids=["adam", "adamw-clipped"])
def test_a_block_of_steps_in_one_graph_equals_one_step_a_call_and_the_eager_fit(x, update):
    """Full batch, 50 steps between read-backs: the steps run as blocks of 50 (a loop in the
    graph, the optimizer's update in its body: Adam, or AdamW with weight decay and clipping),
    drawing the eager step's numbers, so the losses and parameters equal the eager fit's and
    those of a compiled fit that a per-step callback holds to one step a call; a callback that
    allows it sees the blocks' ends only."""
    optimizer = update.pop("optimizer", "adam")
    settings = dict(num_steps=200, num_particles=3, lr=0.05, progress=False, seed=3, optimizer=optimizer,
                    options={"log_every": 50, **update})
    blocks, per_step, bar = StepsSeen(every_step=False), StepsSeen(every_step=True), ProgressBar()
    in_blocks = fit(conjugate.model, conjugate_guide.guide, x, compile=True, callbacks=[blocks, bar], **settings)
    one_a_call = fit(conjugate.model, conjugate_guide.guide, x, compile=True, callbacks=[per_step], **settings)
    eager = fit(conjugate.model, conjugate_guide.guide, x, compile=False, **settings)
    assert in_blocks.config["compile"]["steps_per_call"] == 50 and in_blocks.config["compile"]["blocks"] is None
    assert one_a_call.config["compile"]["steps_per_call"] == 1
    assert blocks.steps == [50, 100, 150, 200] and per_step.steps == list(range(1, 201))
    assert bar.bar.n == 200  # the progress bar counts the block's steps
    assert len(in_blocks.history["loss"]) == 200
    rel = 5e-5  # float32 rounding, over 200 steps (the clipping's norm adds its own)
    assert in_blocks.history["loss"] == pytest.approx(one_a_call.history["loss"], rel=rel)
    assert in_blocks.history["loss"] == pytest.approx(eager.history["loss"], rel=rel)
    for k in eager.params:
        assert torch.allclose(in_blocks.params[k], eager.params[k], rtol=1e-4, atol=1e-5), k
    assert in_blocks.history["loss"] != pytest.approx(
        fit(conjugate.model, conjugate_guide.guide, x, compile=True, **{**settings, "seed": 4}).history["loss"],
        rel=rel)


SCHOOL_SIGMAS = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def schools_model(y):  # reads a tensor it is not given: a constant of the traced step
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("schools", 8):
        pyro.sample("y", dist.Normal(mu, SCHOOL_SIGMAS), obs=y)


def test_a_block_hands_the_step_s_tensor_constants_to_its_loop():
    """A model that reads a tensor of its own (not an argument) still runs in blocks: the loop's
    body receives the step's constants as inputs of the loop (read as constants inside the
    body, the loop failed to compile and the fit ran one step a call), and equals the eager fit."""
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    settings = dict(num_steps=100, lr=0.05, progress=False, seed=0, options={"log_every": 50})
    in_blocks = fit(schools_model, AutoNormal(schools_model), y, compile=True, **settings)
    eager = fit(schools_model, AutoNormal(schools_model), y, compile=False, **settings)
    report = in_blocks.config["compile"]
    assert report["steps_per_call"] == 50 and report["blocks"] is None, report["blocks"]
    assert in_blocks.history["loss"] == pytest.approx(eager.history["loss"], rel=1e-5)


def one_latent(prior, likelihood, family):
    """``(model, guide)``: z ~ prior, x_i | z ~ likelihood(z), and q(z) = family(a, b)."""
    def model(x, num_data=None):
        z = pyro.sample("z", prior(x.new_tensor(2.0), x.new_tensor(1.0)))
        with data_plate(x, num_data):
            pyro.sample("x", likelihood(z), obs=x)

    def guide(x, num_data=None):
        a = pyro.param("a", x.new_tensor(2.0), constraint=constraints.positive)
        b = pyro.param("b", x.new_tensor(1.0), constraint=constraints.positive)
        pyro.sample("z", family(a, b))

    return model, guide


@pytest.mark.parametrize("pair,data", [  # q = Beta: torch's Dirichlet sampler; q = Gamma: its Gamma sampler
    (one_latent(dist.Beta, dist.Bernoulli, dist.Beta), (torch.arange(60) % 3 == 0).float()),
    (one_latent(dist.Gamma, dist.Poisson, dist.Gamma), (torch.arange(60) % 5).float()),
], ids=["beta", "gamma"])
def test_a_block_draws_gamma_and_dirichlet_variates_as_the_eager_fit_without_calling_python(
        pair, data, monkeypatch):
    """torch's Gamma and Dirichlet samplers take a Generator, which Inductor's C++ wrapper passes
    through a Python callback at every step; the block draws them through the dispatcher
    instead, the same numbers from torch's default generator."""
    callbacks = []
    original = codecache.custom_op_wrapper
    monkeypatch.setattr(codecache, "custom_op_wrapper", lambda op, *args: callbacks.append(op) or original(op, *args))
    settings = dict(num_steps=100, num_particles=4, lr=0.05, progress=False, seed=1, options={"log_every": 50})
    in_blocks = fit(*pair, data, compile=True, **settings)
    eager = fit(*pair, data, compile=False, **settings)
    assert in_blocks.config["compile"]["steps_per_call"] == 50
    assert callbacks == []
    assert in_blocks.history["loss"] == pytest.approx(eager.history["loss"], rel=5e-5)
    for k in eager.params:
        assert torch.allclose(in_blocks.params[k], eager.params[k], rtol=1e-4, atol=1e-5), k


def test_a_block_follows_a_learning_rate_schedule_step_by_step(x):
    """A cosine schedule sets each step's rate: a block takes every step's rate as an input
    row (the schedule stepped past the block), so the fit equals the eager one to float32
    rounding and ends at the same rate; with SGD, whose update is not in the graph, the fit
    runs one step a call and the report says why."""
    settings = dict(num_steps=100, lr=0.05, lr_schedule="cosine", num_particles=2, progress=False, seed=0,
                    options={"log_every": 50})
    in_blocks = fit(conjugate.model, conjugate_guide.guide, x, compile=True, **settings)
    assert in_blocks.config["compile"]["steps_per_call"] == 50
    eager = fit(conjugate.model, conjugate_guide.guide, x, compile=False, **settings)
    assert in_blocks.history["loss"] == pytest.approx(eager.history["loss"], rel=1e-5)
    assert in_blocks.history["lr"] == pytest.approx(eager.history["lr"], rel=1e-6)
    assert in_blocks.history["lr"][0] != pytest.approx(in_blocks.history["lr"][1], rel=1e-3)
    sgd = fit(conjugate.model, conjugate_guide.guide, x, compile=True, optimizer="sgd",
              **{**settings, "lr": 0.001})
    assert sgd.config["compile"]["steps_per_call"] == 1
    assert sgd.config["compile"]["blocks"] == "one step a call: the optimizer's update is not in the graph"


@pytest.mark.slow
def test_a_minibatch_fit_in_blocks_runs_the_smaller_last_batch_alone_and_equals_the_eager_fit():
    """1,010 points in batches of 20: each epoch is a block of 50 steps (the stacked batches
    sliced in the loop) and the last batch of 10, one step of its own graph; the fit is the
    eager fit to float32 rounding."""
    x = 3.0 + torch.randn(1010, generator=torch.Generator().manual_seed(0))
    settings = dict(lr=0.05, batch_size=20, num_epochs=3, num_particles=2, progress=False, seed=2)
    in_blocks = fit(conjugate.model, conjugate_guide.guide, x, compile=True, **settings)
    report = in_blocks.config["compile"]
    assert report["graphs"] == 2 and report["steps_per_call"] == 50, str(report)
    eager = fit(conjugate.model, conjugate_guide.guide, x, compile=False, **settings)
    assert len(in_blocks.history["loss"]) == 3 * 51
    assert in_blocks.history["loss"] == pytest.approx(eager.history["loss"], rel=1e-5)
    assert in_blocks.history["elbo"] == pytest.approx(eager.history["elbo"], rel=1e-5)


# -- the same fits -------------------------------------------------------------------------

@pytest.mark.slow
def test_a_minibatch_fit_with_a_smaller_last_batch_compiles_two_specializations():
    x = 3.0 + torch.randn(110, generator=torch.Generator().manual_seed(0))
    result = fit(conjugate.model, conjugate_guide.guide, x, lr=0.1, lr_schedule="cosine", batch_size=25,
                 num_epochs=100, num_particles=8, progress=False, seed=0, compile=True)
    assert result.config["compile"]["graphs"] == 2 and result.config["compile"]["used"]
    mean, sd = conjugate.posterior(x)
    assert abs(float(result.params["mu_loc"]) - float(mean)) < 0.05
    assert abs(float(result.params["mu_scale"]) / float(sd) - 1) < 0.3


@pytest.mark.slow
@pytest.mark.parametrize("settings, stop_epoch", [
    (dict(batch_size=25, lr_schedule="cosine", num_epochs=4), 2),  # one step a call
    (dict(num_steps=200, options={"log_every": 50}), 100),  # full batch, blocks of 50 steps
], ids=["minibatches", "blocks"])
def test_a_resumed_compiled_fit_ends_where_an_uninterrupted_one_ends(tmp_path, x, settings, stop_epoch):
    path = tmp_path / "fit.pt"
    settings = dict(lr=0.05, num_particles=2, progress=False, seed=11, val_data=x[:30], compile=True, **settings)
    unbroken = fit(conjugate.model, conjugate_guide.guide, x, **settings)
    assert unbroken.config["compile"]["steps_per_call"] == (50 if "options" in settings else 1)
    fit(conjugate.model, conjugate_guide.guide, x, checkpoint=path, callbacks=[lambda e: e.epoch == stop_epoch],
        **settings)
    assert load_checkpoint(path)["progress"]["epoch"] == stop_epoch
    resumed = fit(conjugate.model, conjugate_guide.guide, x, checkpoint=path, resume=True, **settings)
    for key in unbroken.history.keys() - {"time"}:
        assert resumed.history[key] == unbroken.history[key], key
    assert all(torch.equal(resumed.params[k], unbroken.params[k]) for k in unbroken.params)


eager_steps = {}  # the failing step of each parametrization


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [10, 50], ids=["one-step-a-call", "blocks"])
def test_a_compiled_fit_that_diverges_names_the_step_and_the_site(x, log_every):
    def model(x, num_data=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with data_plate(x, num_data):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x, num_data=None):
        scale = pyro.param("scale", torch.tensor(1.0))  # unconstrained: can go negative
        pyro.sample("mu", dist.Normal(pyro.param("loc", torch.tensor(0.0)), scale))

    with pytest.raises(DivergenceError) as caught:
        fit(model, guide, x, lr=0.5, num_steps=300, progress=False, seed=0, compile=True,
            options={"log_every": log_every})
    err = caught.value  # the replay from the last good state is exact: it finds the culprit
    assert err.step > 1 and err.site in ("parameter 'scale'", "guide site 'mu'")
    assert all(step < err.step for step in err.result.history["step"])
    eager_steps[log_every] = err.step
    if len(eager_steps) == 2:  # blocks or not, the same draws: the same failing step
        assert eager_steps[10] == eager_steps[50]


@pytest.mark.slow
def test_compiled_and_eager_vaes_reach_the_same_test_elbo_within_seed_noise():
    from vi_toolkit.datasets import load_images
    from vi_toolkit.guides.vae import GaussianEncoder
    from vi_toolkit.models.vae import DeepLatentGaussian

    data = load_images("digits", binarize="static")
    test_elbo = {}
    for compile_ in (False, True):
        for seed in range(3):
            torch.manual_seed(seed)
            model = DeepLatentGaussian(data.shape, 8, hidden=(64,))
            guide = GaussianEncoder(data.shape, 8, hidden=(64,))
            result = fit(model, guide, data.train, elbo="trace", batch_size=100, num_epochs=15, lr=3e-3,
                         seed=seed, progress=False, compile=compile_)
            assert result.config["compile"]["used"] is compile_
            test_elbo[compile_, seed] = result.evaluate(data.test, num_samples=20)["elbo"]
    eager = torch.tensor([test_elbo[False, s] for s in range(3)])
    comp = torch.tensor([test_elbo[True, s] for s in range(3)])
    noise = eager.std()  # the spread between seeds of one implementation
    assert abs(float(comp.mean() - eager.mean())) < max(3 * float(noise), 1.0), (comp, eager)


@pytest.mark.gpu
def test_a_compiled_step_on_cuda_equals_the_eager_step_and_keeps_everything_on_the_gpu():
    """The CUDA graph path: a deterministic objective equal to the eager one on the GPU, and
    a compiled fit whose data and parameters stay there, reaching the eager fit's ELBO."""
    mixture = GaussianMixture(3, 2, "diag")
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0)).cuda()
    x[:200] += 3.0
    guide = MAPGuide(mixture)
    elbo = make_elbo("enum", max_plate_nesting=1)
    with torch.device("cuda"):
        params, graph = graph_of(elbo, mixture.model, guide, (x,), {"num_data": 500})
        for _ in range(3):
            loss, grads = graph([x])
            expected_loss, expected_grads = eager_loss_and_grads(elbo, mixture.model, guide, params, (x,),
                                                                 {"num_data": 500})
            assert loss.device.type == "cuda"
            assert_float32_close(loss, expected_loss)
            for g, e in zip(grads, expected_grads):
                assert_float32_close(g, e)
            with torch.no_grad():
                for p in params.values():
                    p.add_(0.05 * torch.randn_like(p))
    data = 3.0 + torch.randn(1000, generator=torch.Generator().manual_seed(0))
    fits = {c: fit(conjugate.model, conjugate_guide.guide, data, lr=0.05, batch_size=100, num_epochs=30,
                   num_particles=4, device="cuda", progress=False, seed=0, compile=c) for c in (False, True)}
    assert fits[True].config["compile"]["used"] and fits[True].device.type == "cuda"
    assert fits[True].config["compile"]["update"].startswith("by the optimizer: on CUDA")  # a CUDA graph
    assert math.isclose(fits[True].elbo, fits[False].elbo, abs_tol=0.05)
