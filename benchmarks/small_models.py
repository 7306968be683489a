"""Milliseconds per SVI step on four small models: fit (eager, compiled), Pyro's loop and JIT, NumPyro.

Each model has the same objective, guide family and optimizer (Adam, the same learning rate)
in every implementation:

* ``beta-bernoulli``: p ~ Beta(2, 2), 400 Bernoulli points, q(p) = Beta(a, b), 8 vectorized
  particles of the Monte Carlo ELBO;
* ``eight-schools``: the centred model (mu ~ N(0, 5^2), tau ~ HalfCauchy(5), theta_j ~
  N(mu, tau^2), y_j ~ N(theta_j, sigma_j^2)) with a mean-field Normal guide on the
  unconstrained space (``AutoNormal``);
* ``logistic``: Bayesian logistic regression (w ~ N(0, I_10), b ~ N(0, 1)) on 20,000 points
  in minibatches of 256, full-rank Gaussian guide (``AutoMultivariateNormal``);
* ``gmm``: ``vi_toolkit.models.gmm`` (K = 3, D = 2, diagonal) on 1,000 points, the
  assignments summed out (enumerated in Pyro; NumPyro without funsor: the same marginal by
  logsumexp), point-mass guide (``vi_toolkit.guides.gmm.MAPGuide``), Adam.

Implementations: ``fit`` (``compile=False``), ``fit (compiled)`` (``compile=True``; its
seconds of tracing and compiling are reported beside it), ``pyro SVI`` (a Python loop of
``SVI.step``, ``Trace_ELBO``/``TraceEnum_ELBO``), ``pyro JIT`` (``JitTrace_ELBO``/
``JitTraceEnum_ELBO``, skipped with its error where it fails) and ``numpyro`` (``svi.update``
in a jitted ``lax.fori_loop``, the whole run one XLA program, as ``svi.run(progress_bar=False)``
runs it; minibatches over each epoch's permutation, as ``vae_speed.py``). The
milliseconds per step exclude warm-up and compilation: ``fit`` from the end of its first
logging interval, the Pyro loops after the first 10% of the steps, NumPyro from the second
call of its jitted loop; wall-clock, or with ``--clock cpu`` the process's CPU time (which
other processes on a shared machine inflate less). The final -ELBO per data point (the mean over
the last tenth of the steps) is printed beside each, so that equal work is visible. With
``--repeats R`` each implementation runs R times one after another and its median run is
reported with the first run's compile seconds (every run's milliseconds are in ``metrics.json``).
"""

import math
import statistics
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, JitTrace_ELBO, JitTraceEnum_ELBO, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from torch.distributions import constraints

from vi_toolkit import data_plate, fit, plots
from vi_toolkit.guides.gmm import MAPGuide
from vi_toolkit.models.gmm import GaussianMixture
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser, use_cores
from vae_speed import EpochClock, add_timing_arguments, clock_of, comma_choices

SIGMA_SCHOOLS = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]
Y_SCHOOLS = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
GMM_LOCS = [[-3.0, 0.0], [3.0, 1.0], [0.0, -3.0]]


# -- the models in Pyro (used by fit and by Pyro's loops) -----------------------------------

def beta_bernoulli_model(x, num_data=None):
    p = pyro.sample("p", dist.Beta(x.new_tensor(2.0), x.new_tensor(2.0)))
    with data_plate(x, num_data):
        pyro.sample("x", dist.Bernoulli(p), obs=x)


def beta_bernoulli_guide(x, num_data=None):
    a = pyro.param("a", x.new_tensor(1.0), constraint=constraints.positive)
    b = pyro.param("b", x.new_tensor(1.0), constraint=constraints.positive)
    pyro.sample("p", dist.Beta(a, b))


def eight_schools_model(y, sigma, num_data=None):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    with data_plate(y, num_data):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def logistic_model(x, y, num_data=None):
    w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(x.new_tensor(0.0), 1.0))
    with data_plate(x, num_data):
        pyro.sample("y", dist.Bernoulli(logits=x @ w + b), obs=y)


def simulate(seed):
    """The data of each model, simulated once: ``{name: tuple of tensors}``."""
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(20_000, 10, generator=gen)
    w = torch.linspace(-1.0, 1.0, 10)
    labels = torch.bernoulli(torch.sigmoid(xs @ w + 0.5), generator=gen)
    z = torch.randint(3, (1000,), generator=gen)
    return {"beta-bernoulli": ((torch.rand(400, generator=gen) < 0.3).float(),),
            "eight-schools": (torch.tensor(Y_SCHOOLS), torch.tensor(SIGMA_SCHOOLS)),
            "logistic": (xs, labels),
            "gmm": (torch.tensor(GMM_LOCS)[z] + torch.randn(1000, 2, generator=gen),)}


def pyro_problem(name):
    """``(model, guide, enumerated, particles, batch_size)`` of a model for fit and Pyro."""
    if name == "beta-bernoulli":
        return beta_bernoulli_model, beta_bernoulli_guide, False, 8, None
    if name == "eight-schools":
        return eight_schools_model, AutoNormal(eight_schools_model), False, 1, None
    if name == "logistic":
        return logistic_model, AutoMultivariateNormal(logistic_model), False, 1, 256
    mixture = GaussianMixture(3, 2, "diag")
    return mixture.model, MAPGuide(mixture), True, 1, None


# -- the implementations ----------------------------------------------------------------------

def run_fit(name, data, args, compile):
    model, guide, enumerated, particles, batch = pyro_problem(name)
    steps = args.steps if batch is None else None
    epochs = None if batch is None else max(2, args.steps * batch // data[0].shape[0])
    epochs_clock = EpochClock(clock_of(args))
    result = fit(model, guide, data, elbo="enum" if enumerated else "trace", num_particles=particles,
                 batch_size=batch, num_steps=steps, num_epochs=epochs, lr=args.lr, seed=args.seed,
                 progress=False, device=args.device, compile=compile, callbacks=[epochs_clock])
    h, times, done = result.history, epochs_clock.times, epochs_clock.steps
    per_step = (times[-1] - times[0]) / (done[-1] - done[0])
    tail = max(1, len(h["elbo"]) // 10)
    return {"ms_per_step": 1e3 * per_step, "neg_elbo": -statistics.mean(h["elbo"][-tail:]),
            "compile_seconds": result.config["compile"]["seconds"] if compile else None}


def run_pyro(name, data, args, jit):
    model, guide, enumerated, particles, batch = pyro_problem(name)
    cls = {(False, False): Trace_ELBO, (False, True): JitTrace_ELBO, (True, False): TraceEnum_ELBO,
           (True, True): JitTraceEnum_ELBO}[enumerated, jit]
    elbo = cls(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    data = tuple(t.to(device) for t in data)
    n = data[0].shape[0]
    pyro.set_rng_seed(args.seed)
    losses, start, clock = [], None, clock_of(args)
    with pyro.get_param_store().scope(), pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the JIT's tracer warnings
        svi = SVI(model, guide, pyro.optim.Adam({"lr": args.lr}), loss=elbo)
        perm, pos = torch.randperm(n, device=device), 0
        for step in range(args.steps):
            if step == args.steps // 10:
                start = clock()
            if batch is None:
                losses.append(svi.step(*data, num_data=n))
            else:
                if pos + batch > n:
                    perm, pos = torch.randperm(n, device=device), 0
                index, pos = perm[pos:pos + batch], pos + batch
                losses.append(svi.step(*(t[index] for t in data), num_data=n))
        seconds = clock() - start
    timed = args.steps - args.steps // 10
    return {"ms_per_step": 1e3 * seconds / timed, "neg_elbo": statistics.mean(losses[-timed // 10 or -1:]) / n,
            "compile_seconds": None}


def numpyro_problem(name, data):
    """``(model, guide, arrays, batch_size, particles)`` of a model in NumPyro."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd
    from jax.nn import logsumexp
    from numpyro.infer.autoguide import AutoMultivariateNormal as NAutoMVN, AutoNormal as NAutoNormal

    arrays = tuple(jnp.asarray(t.numpy()) for t in data)
    n = data[0].shape[0]
    if name == "beta-bernoulli":
        def model(x):
            p = numpyro.sample("p", nd.Beta(2.0, 2.0))
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("x", nd.Bernoulli(p), obs=x)

        def guide(x):
            a = numpyro.param("a", 1.0, constraint=nd.constraints.positive)
            b = numpyro.param("b", 1.0, constraint=nd.constraints.positive)
            numpyro.sample("p", nd.Beta(a, b))

        return model, guide, arrays, None, 8
    if name == "eight-schools":
        def model(y, sigma):
            mu = numpyro.sample("mu", nd.Normal(0.0, 5.0))
            tau = numpyro.sample("tau", nd.HalfCauchy(5.0))
            with numpyro.plate("data", y.shape[0]):
                theta = numpyro.sample("theta", nd.Normal(mu, tau))
                numpyro.sample("y", nd.Normal(theta, sigma), obs=y)

        return model, NAutoNormal(model), arrays, None, 1
    if name == "logistic":
        def model(x, y):
            w = numpyro.sample("w", nd.Normal(jnp.zeros(x.shape[-1]), 1.0).to_event(1))
            b = numpyro.sample("b", nd.Normal(0.0, 1.0))
            with numpyro.plate("data", n, subsample_size=x.shape[0]):
                numpyro.sample("y", nd.Bernoulli(logits=x @ w + b), obs=y)

        return model, NAutoMVN(model), arrays, 256, 1
    mixture = GaussianMixture(3, 2, "diag")

    def model(x):  # mixture.model's priors, the assignments summed out by logsumexp
        weights = numpyro.sample("weights", nd.Dirichlet(jnp.full(3, mixture.concentration)))
        with numpyro.plate("components", 3):
            locs = numpyro.sample("locs", nd.Normal(jnp.zeros(2), mixture.loc_scale).to_event(1))
            scales = numpyro.sample("scales", nd.LogNormal(jnp.full(2, mixture.scale_loc),
                                                           mixture.scale_scale).to_event(1))
        log_lik = nd.Normal(locs, scales).to_event(1).log_prob(x[:, None, :]) + jnp.log(weights)
        with numpyro.plate("data", x.shape[0]):
            numpyro.factor("x", logsumexp(log_lik, -1))

    init = MAPGuide(mixture)
    # the same k-means start as the toolkit's guide, from an empty parameter store (a repeated
    # run would find the guide's parameters there and skip the start)
    with torch.no_grad(), pyro.get_param_store().scope():
        pyro.poutine.trace(init).get_trace(data[0])
    start = {k: jnp.asarray(v.detach().numpy()) for k, v in init.init.items()}

    def guide(x):
        weights = numpyro.param("weights_map", start["weights"], constraint=nd.constraints.simplex)
        locs = numpyro.param("locs_map", start["locs"])
        scales = numpyro.param("scales_map", start["scales"], constraint=nd.constraints.positive)
        numpyro.sample("weights", nd.Delta(weights, event_dim=1))
        with numpyro.plate("components", 3):
            numpyro.sample("locs", nd.Delta(locs, event_dim=1))
            numpyro.sample("scales", nd.Delta(scales, event_dim=1))

    return model, guide, arrays, None, 1


def run_numpyro(name, data, args):
    import jax
    import jax.numpy as jnp
    import numpyro
    from numpyro.infer import SVI as NSVI, Trace_ELBO as NTrace_ELBO

    model, guide, arrays, batch, particles = numpyro_problem(name, data)
    elbo = NTrace_ELBO(num_particles=particles, vectorize_particles=particles > 1)
    svi = NSVI(model, guide, numpyro.optim.Adam(args.lr), elbo)
    n = data[0].shape[0]
    state = svi.init(jax.random.PRNGKey(args.seed), *(a[:batch] for a in arrays))
    per_epoch = n // (batch or n)

    @jax.jit
    def run(state, key, epochs):  # epochs x per_epoch updates in one XLA program (as svi.run)
        def epoch(e, carry):
            state, total = carry
            perm = jax.random.permutation(jax.random.fold_in(key, e), n)

            def body(i, carry):
                state, total = carry
                if batch is None:
                    return svi.update(state, *arrays)[0], total
                index = jax.lax.dynamic_slice_in_dim(perm, i * batch, batch)
                state, loss = svi.update(state, *(a[index] for a in arrays))
                return state, total + loss

            return jax.lax.fori_loop(0, per_epoch, body, (state, total))

        return jax.lax.fori_loop(0, epochs, epoch, (state, jnp.zeros(())))

    epochs = math.ceil(args.steps / per_epoch)
    jax.block_until_ready(run(state, jax.random.PRNGKey(0), 1))  # compiles
    clock = clock_of(args)
    start = clock()
    state, _ = jax.block_until_ready(run(state, jax.random.PRNGKey(args.seed), epochs))
    seconds = clock() - start
    loss = float(svi.evaluate(state, *arrays)) if batch is None else float(
        run(state, jax.random.PRNGKey(args.seed + 1), 1)[1]) / per_epoch
    return {"ms_per_step": 1e3 * seconds / (epochs * per_epoch), "neg_elbo": loss / n, "compile_seconds": None}


IMPLEMENTATIONS = {
    "fit": lambda name, data, args: run_fit(name, data, args, compile=False),
    "fit (compiled)": lambda name, data, args: run_fit(name, data, args, compile=True),
    "pyro SVI": lambda name, data, args: run_pyro(name, data, args, jit=False),
    "pyro JIT": lambda name, data, args: run_pyro(name, data, args, jit=True),
    "numpyro": run_numpyro,
}
MODELS = ("beta-bernoulli", "eight-schools", "logistic", "gmm")


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/small_models")
    parser.add_argument("--steps", type=int, default=3000, help="SVI steps per run")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    add_timing_arguments(parser, threads=1)
    args = parse_args(parser, argv)
    names = comma_choices(args.models, MODELS, "--models")
    if args.quick:  # a smoke test, maybe inside another process: one thread, no pinning
        args.steps = 40
    else:
        use_cores(args.threads)
    data = simulate(args.seed)
    metrics = {"steps": args.steps, "threads": torch.get_num_threads(), "device": args.device,
               "clock": args.clock}
    rows = []
    for name in names:
        for impl, run in IMPLEMENTATIONS.items():
            if args.quick and impl == "fit (compiled)":  # a smoke test waits on no compiler
                continue
            try:
                runs = [run(name, data[name], args) for _ in range(args.repeats)]
            except ImportError as err:
                print(f"{name} / {impl}: skipped ({err}); install the bench extra")
                continue
            except Exception as err:  # Pyro's JIT does not trace every model
                print(f"{name} / {impl}: failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
                continue
            row = dict(sorted(runs, key=lambda r: r["ms_per_step"])[(len(runs) - 1) // 2],  # the median run
                       compile_seconds=runs[0]["compile_seconds"])  # the first run's compile (as vae_speed.py)
            rows.append((name, impl, row))
            key = f"{name}_{impl}".replace(" ", "_").replace("(", "").replace(")", "")
            metrics.update({f"{key}_{k}": v for k, v in row.items() if v is not None})
            if args.repeats > 1:
                metrics[f"{key}_ms_per_step_runs"] = [r["ms_per_step"] for r in runs]
            print(f"{name:<15} {impl:<15} {row['ms_per_step']:>9.3f} ms/step  -ELBO/point "
                  f"{row['neg_elbo']:>10.4f}" + (f"  compile {row['compile_seconds']:.1f} s"
                                                  if row["compile_seconds"] else ""), flush=True)
    print(f"\n{'model':<15} {'implementation':<15} {'ms/step':>9} {'vs numpyro':>11} {'compile s':>10}")
    for name, impl, row in rows:
        ref = metrics.get(f"{name}_numpyro_ms_per_step")
        ratio = row["ms_per_step"] / ref if ref else float("nan")
        metrics[f"{name}_{impl}_vs_numpyro".replace(" ", "_").replace("(", "").replace(")", "")] = ratio
        compile_s = f"{row['compile_seconds']:.1f}" if row["compile_seconds"] else "-"
        print(f"{name:<15} {impl:<15} {row['ms_per_step']:>9.3f} {ratio:>11.2f} {compile_s:>10}")
    save_figure(plots.bar_chart({f"{name} {impl}": row["ms_per_step"] for name, impl, row in rows},
                                ylabel="milliseconds per step", title="SVI on small models"),
                args.out, "ms_per_step")
    return finish(args.out, "Milliseconds per SVI step on small models", metrics)


if __name__ == "__main__":
    main()
