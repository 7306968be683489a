"""Seconds per epoch of one MLP VAE in five implementations, side by side in one process.

The Bernoulli VAE of ``vi_toolkit.models.vae`` / ``vi_toolkit.guides.vae`` (784-H-Z, softplus, one hidden layer),
statically binarized images, Adam at the same learning rate, the same batch size, and the
same objective (the single-sample Monte Carlo ELBO of Pyro's ``Trace_ELBO``):

* ``fit``         ``vi_toolkit.fit(..., elbo="trace")``, its float32 linear layers by oneDNN
  on CPUs where torch's MKL does not use the full vector width (``vi_toolkit.linear``);
* ``fit (torch BLAS)``  the same with ``linear_backend="torch"``: torch's own matrix products;
* ``fit (compiled)``  ``fit(..., compile=True)``: the step traced once, compiled by Inductor
  and replayed (``vi_toolkit.compiled``; its seconds of tracing and compiling are printed);
* ``pyro loop``   Pyro's VAE tutorial: ``SVI.step`` over a ``DataLoader``
  (``vae_vs_pyro_loop.pyro_loop``);
* ``torch``       the same networks and estimator written directly in PyTorch
  (log p(x | z) + log p(z) - log q(z | x) at z = mu + sigma * eps);
* ``torch (compiled)``  the same loss under ``torch.compile`` (backward and Adam eager);
* ``numpyro``     NumPyro's SVI with stax networks of the same sizes, each epoch one jitted
  ``lax.fori_loop`` (the ``bench`` extra; skipped with a note if it is not installed).

For each batch size it prints seconds per epoch (the median over the timed epochs, after
one warm-up epoch, which holds any compilation; wall-clock seconds, or with ``--clock cpu``
the process's CPU seconds, which other processes on a shared machine inflate less), the ratio
to ``fit``, and the training ELBO
per point each reached in its last epoch, so that equal work is visible; and beside them the
matrix-product floor: the seconds an epoch's products alone take (every layer's forward
product, its weight gradient and, past the first layer, its input gradient, by the backend
``fit`` uses), against which the compiled step and NumPyro are measured. With ``--repeats R``
each implementation runs R times one after another and the median run is reported (every
run's seconds are in ``metrics.json``): on a shared virtual machine one run's epochs can be
10-20% off the next run's.
"""

import math
import os
import re
import statistics
import time

import numpy as np
import torch

from vi_toolkit.guides.vae import GaussianEncoder
from vi_toolkit.models.vae import DeepLatentGaussian
from vae_vs_pyro_loop import pyro_loop
from vi_toolkit import Callback, fit, plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.linear import onednn_linear, resolve_backend
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser, use_cores


def networks(shape, hidden, latent, seed):
    torch.manual_seed(seed)
    return (DeepLatentGaussian(shape, latent, hidden=(hidden,), activation="softplus"),
            GaussianEncoder(shape, latent, hidden=(hidden,), activation="softplus"))


def add_timing_arguments(parser, *, threads):
    """``--threads`` (default ``threads``; ``None``: all cores), ``--clock``, read by
    :func:`clock_of`, and ``--repeats``; returns ``parser``."""
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each implementation one after another; the median is reported")
    parser.add_argument("--threads", type=int, default=threads,
                        help="run the whole process on this many cores, torch with as many threads "
                             "(JAX's thread pool is pinned to the same cores)"
                             + ("; None: all cores" if threads is None else ""))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall-clock seconds, or the process's CPU seconds (a loaded machine "
                             "inflates them less; with one thread they are the seconds it ran)")
    return parser


def comma_choices(text, allowed, option):
    """The names of a comma-separated option (``--models``, ``--implementations``), each one of
    ``allowed``; ``ValueError`` naming ``option`` and the unknown names otherwise."""
    names = text.split(",")
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise ValueError(f"{option}: unknown {unknown}; use {', '.join(allowed)}")
    return names


def clock_of(args):
    """The timer of ``--clock`` (wall-clock or this process's CPU seconds); wall-clock for the
    scripts that reuse these runs without the option (``scaling.py``)."""
    return time.process_time if getattr(args, "clock", "wall") == "cpu" else time.perf_counter


class EpochClock(Callback):
    """The times (by ``clock``, from the fit's start) and steps at the end of each epoch of a fit."""

    def __init__(self, clock):
        self.clock, self.times, self.steps = clock, [], []

    def on_fit_start(self, state):
        self.start = self.clock()

    def on_epoch_end(self, state):
        self.times.append(self.clock() - self.start)
        self.steps.append(state.step)


def per_epoch(times):
    """Median seconds per epoch after the first (warm-up) epoch, from cumulative end times."""
    steps = np.diff([0.0, *times])
    return float(statistics.median(steps[1:]) if len(steps) > 1 else steps[0])


def run_fit(x, args, batch, linear_backend="auto", compile=False):
    model, guide = networks(x.shape[1:], args.hidden, args.latent_dim, args.seed)
    epochs = EpochClock(clock_of(args))
    result = fit(model, guide, x, elbo="trace", batch_size=batch, num_epochs=args.epochs, lr=args.lr,
                 seed=args.seed, progress=False, device=x.device, compile=compile, callbacks=[epochs],
                 options={"linear_backend": linear_backend})
    return per_epoch(epochs.times), result.elbo, result.config["compile"]["seconds"]


def run_fit_compiled(x, args, batch):
    return run_fit(x, args, batch, compile=True)


def run_fit_torch_linear(x, args, batch):
    return run_fit(x, args, batch, linear_backend="torch")


def run_pyro_loop(x, args, batch):
    model, guide = networks(x.shape[1:], args.hidden, args.latent_dim, args.seed)
    history = pyro_loop(model, guide, x, epochs=args.epochs, batch_size=batch, lr=args.lr, dynamic=False,
                        seed=args.seed, device=x.device, clock=clock_of(args))
    return per_epoch(history["time"]), history["elbo"][-1]


def run_torch(x, args, batch, compile=False):
    model, guide = networks(x.shape[1:], args.hidden, args.latent_dim, args.seed)
    encoder, decoder = guide.encoder, model.decoder
    optim = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=args.lr)
    normal = torch.distributions.Normal
    n, times = x.shape[0], []

    def loss_of(xb):
        loc, log_var = encoder(xb)
        scale = (0.5 * log_var).exp()
        z = loc + scale * torch.randn_like(loc)
        logits, = decoder(z)
        log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(logits, xb, reduction="sum")
        elbo = log_lik + normal(0.0, 1.0).log_prob(z).sum() - normal(loc, scale).log_prob(z).sum()
        return -elbo * n / xb.shape[0]

    loss_of = torch.compile(loss_of) if compile else loss_of
    clock = clock_of(args)
    start = clock()
    for _ in range(args.epochs):
        total = x.new_zeros(())
        perm = torch.randperm(n, device=x.device)
        for i in range(0, n, batch):
            xb = x[perm[i:i + batch]]
            loss = loss_of(xb)
            optim.zero_grad()
            loss.backward()
            optim.step()
            total += loss.detach()
        times.append(clock() - start)
        last = -float(total) / (n / batch) / n
    return per_epoch(times), last


def run_torch_compiled(x, args, batch):
    return run_torch(x, args, batch, compile=True)


def product_floor(x, args, batch, repeats=20):
    """Seconds per epoch of the VAE's matrix products alone (see the module), by the backend
    ``fit`` uses for float32 linear layers on this device; the median of ``repeats``."""
    pixels, h, d = x[0].numel(), args.hidden, args.latent_dim
    linear = onednn_linear if resolve_backend("auto", x.device) == "onednn" else torch.nn.functional.linear
    layers = [(pixels, h, False), (h, 2 * d, True), (d, h, True), (h, pixels, True)]  # (in, out, input grad)
    tensors = [(torch.randn(batch, i, device=x.device), torch.randn(o, i, device=x.device),
                torch.randn(batch, o, device=x.device), grad_in) for i, o, grad_in in layers]

    def products():
        for inputs, weight, grad, grad_in in tensors:
            linear(inputs, weight)  # forward
            linear(grad.t(), inputs.t())  # dL/dW = grad^T inputs
            if grad_in:
                linear(grad, weight.t())  # dL/dinputs = grad W

    times, clock = [], clock_of(args)
    with torch.no_grad():
        for _ in range(repeats + 2):
            start = clock()
            products()
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(clock() - start)
    return statistics.median(times[2:]) * math.ceil(x.shape[0] / batch)


def run_numpyro(x, args, batch):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd
    from jax.example_libraries import stax
    from numpyro.infer import SVI, Trace_ELBO

    n, pixels, h, d = x.shape[0], x[0].numel(), args.hidden, args.latent_dim
    xs = jnp.asarray(x.reshape(n, -1).cpu().numpy())
    encoder = stax.serial(stax.Dense(h), stax.Softplus, stax.Dense(2 * d))
    decoder = stax.serial(stax.Dense(h), stax.Softplus, stax.Dense(pixels))

    def model(xb):
        dec = numpyro.module("decoder", decoder, (batch, d))
        with numpyro.plate("data", n, subsample_size=xb.shape[0]):
            z = numpyro.sample("z", nd.Normal(0.0, 1.0).expand([d]).to_event(1))
            numpyro.sample("x", nd.Bernoulli(logits=dec(z)).to_event(1), obs=xb)

    def guide(xb):
        enc = numpyro.module("encoder", encoder, (batch, pixels))
        loc, log_var = jnp.split(enc(xb), 2, axis=-1)
        with numpyro.plate("data", n, subsample_size=xb.shape[0]):
            numpyro.sample("z", nd.Normal(loc, jnp.exp(0.5 * log_var)).to_event(1))

    svi = SVI(model, guide, numpyro.optim.Adam(args.lr), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(args.seed), xs[:batch])
    steps = n // batch  # fixed-size batches: one compiled step

    @jax.jit
    def epoch(state, key):
        perm = jax.random.permutation(key, n)

        def body(i, carry):
            state, total = carry
            state, loss = svi.update(state, xs[jax.lax.dynamic_slice_in_dim(perm, i * batch, batch)])
            return state, total + loss

        return jax.lax.fori_loop(0, steps, body, (state, 0.0))

    clock = clock_of(args)
    times, start = [], clock()
    for e in range(args.epochs):
        state, total = epoch(state, jax.random.PRNGKey(args.seed + e))
        total.block_until_ready()
        times.append(clock() - start)
    return per_epoch(times), -float(total) / steps / n


def metric_key(name):
    """``"fit (torch BLAS)"`` -> ``"fit_torch_BLAS"``: an implementation's name in metrics.json."""
    return re.sub(r"\W+", "_", name).strip("_")


IMPLEMENTATIONS = {"fit": run_fit, "fit (torch BLAS)": run_fit_torch_linear, "fit (compiled)": run_fit_compiled,
                   "pyro loop": run_pyro_loop, "torch": run_torch, "torch (compiled)": run_torch_compiled,
                   "numpyro": run_numpyro}


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/vae_speed"),
                                default="fashion-mnist", binarize="static")
    parser.add_argument("--hidden", type=int, default=400)
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is a warm-up")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS),
                        help="comma-separated, of: " + ", ".join(IMPLEMENTATIONS))
    add_timing_arguments(parser, threads=None)
    args = parse_args(parser, argv)
    chosen = comma_choices(args.implementations, IMPLEMENTATIONS, "--implementations")
    if args.quick:  # a smoke test, maybe inside another process: one thread, no pinning
        args.hidden, args.epochs, args.batch_sizes = 64, 2, [128]
    else:
        use_cores(args.threads or len(os.sched_getaffinity(0)))
    x = images_from_args(args).train
    start = time.perf_counter()
    metrics = {"dataset": args.dataset if not args.quick else "digits", "points": x.shape[0],
               "architecture": f"{x[0].numel()}-{args.hidden}-{args.latent_dim}",
               "threads": torch.get_num_threads(), "epochs": args.epochs, "clock": args.clock}
    table = []
    for name, run in IMPLEMENTATIONS.items():  # NumPyro last: JAX's thread pool stays busy after it
        if name not in chosen or args.quick and "compiled" in name:  # a smoke test waits on no compiler (tests/test_compiled.py)
            continue
        for batch in args.batch_sizes:
            try:
                runs = [run(x, args, batch) for _ in range(args.repeats)]
            except ImportError as err:
                print(f"{name}: skipped ({err}); install the bench extra")
                continue
            seconds = statistics.median(r[0] for r in runs)
            _, elbo, *compile_seconds = runs[0]
            key = metric_key(name)
            metrics[f"b{batch}_{key}_seconds_per_epoch"] = seconds
            if args.repeats > 1:
                metrics[f"b{batch}_{key}_seconds_per_epoch_runs"] = [r[0] for r in runs]
            metrics[f"b{batch}_{key}_train_elbo"] = elbo
            if compile_seconds and compile_seconds[0]:
                metrics[f"b{batch}_{key}_compile_seconds"] = compile_seconds[0]
            table.append((batch, name, seconds, elbo))
    for batch in args.batch_sizes:
        metrics[f"b{batch}_product_floor_seconds_per_epoch"] = product_floor(x, args, batch)
    print(f"\n{'batch':>6} {'implementation':<18} {'s/epoch':>9} {'vs fit':>7} {'train ELBO':>11}")
    for batch, name, seconds, elbo in sorted(table, key=lambda row: row[0]):
        fit_seconds = metrics.get(f"b{batch}_fit_seconds_per_epoch")
        if fit_seconds:
            metrics[f"b{batch}_{metric_key(name)}_vs_fit"] = seconds / fit_seconds
        ratio = f"{seconds / fit_seconds:>7.2f}" if fit_seconds else f"{'-':>7}"
        compile_seconds = metrics.get(f"b{batch}_{metric_key(name)}_compile_seconds")
        print(f"{batch:>6} {name:<18} {seconds:>9.3f} {ratio} {elbo:>11.2f}"
              + (f"   (compiled in {compile_seconds:.1f} s)" if compile_seconds else ""))
    for batch in args.batch_sizes:
        floor = metrics[f"b{batch}_product_floor_seconds_per_epoch"]
        print(f"{batch:>6} {'matrix products':<18} {floor:>9.3f}   (the floor: the products alone)")
        for name in ("fit (compiled)", "numpyro"):
            seconds = metrics.get(f"b{batch}_{metric_key(name)}_seconds_per_epoch")
            if seconds:
                metrics[f"b{batch}_{metric_key(name)}_vs_floor"] = seconds / floor
        if metrics.get(f"b{batch}_numpyro_seconds_per_epoch") and f"b{batch}_fit_compiled_seconds_per_epoch" in metrics:
            metrics[f"b{batch}_fit_compiled_vs_numpyro"] = (metrics[f"b{batch}_fit_compiled_seconds_per_epoch"]
                                                            / metrics[f"b{batch}_numpyro_seconds_per_epoch"])
        ratios = [f"{label} {metrics[key]:.2f}" for label, key in (
            ("fit (compiled)/numpyro", f"b{batch}_fit_compiled_vs_numpyro"),
            ("fit (compiled)/floor", f"b{batch}_fit_compiled_vs_floor"), ("numpyro/floor", f"b{batch}_numpyro_vs_floor"))
            if key in metrics]
        if ratios:
            print(f"{batch:>6} {'ratios':<18} " + ", ".join(ratios))
    save_figure(plots.bar_chart({f"{name} (B={batch})": seconds for batch, name, seconds, _ in table},
                                ylabel="seconds per epoch",
                                title=f"MLP VAE {metrics['architecture']} on {metrics['dataset']}"),
                args.out, "seconds_per_epoch")
    return finish(args.out, "VAE seconds per epoch: fit, Pyro loop, PyTorch, NumPyro", metrics, start)


if __name__ == "__main__":
    main()
