"""How the time per epoch of ``fit`` grows with the data set and with the network.

The Bernoulli MLP VAE of ``benchmarks/vae_speed.py`` (784-H-50, softplus, batch 128,
Adam, single-sample Trace ELBO, statically binarized images), fitted by ``vi_toolkit.fit``
and by Pyro's tutorial loop (``vae_vs_pyro_loop.pyro_loop``) from the same weights:

* against N, the number of training images, at H = ``--hidden``: an epoch is N / B steps,
  so both grow linearly in N (slope 1 on the log-log plot) once past the warm-up;
* against the width H at N = ``--points``: small networks are bound by the per-step work
  of Python and Pyro, which both share; wide ones by the matrix products, where ``fit``'s
  oneDNN products (``vi_toolkit.linear``, on CPUs where it is chosen) pull away from the
  loop's (``loop_over_fit_by_width`` in ``metrics.json``).

Seconds per epoch are the median over the epochs after the first (warm-up) one.
Writes ``scaling_points.png`` and ``scaling_width.png`` (log-log) and ``metrics.json``.
"""

import argparse
import time

import torch

from vae_speed import metric_key, run_fit, run_pyro_loop
from vi_toolkit import plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser, use_cores

IMPLEMENTATIONS = {"fit": run_fit, "pyro loop": run_pyro_loop}


def sweep(x, args, values, setting):
    """Seconds per epoch of each implementation for each value of ``setting`` (points or hidden)."""
    curves = {name: [] for name in IMPLEMENTATIONS}
    for value in values:
        run_args = argparse.Namespace(**{**vars(args), "hidden": value}) if setting == "hidden" else args
        data = x[:value] if setting == "points" else x[:args.points]
        for name, run in IMPLEMENTATIONS.items():
            seconds = run(data, run_args, args.batch_size)[0]  # (seconds per epoch, ELBO, ...)
            curves[name].append(seconds)
            print(f"{setting}={value:<7} {name:<10} {seconds:8.3f} s/epoch", flush=True)
    return curves


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/scaling"),
                                default="fashion-mnist", binarize="static")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000, 20000, 50000],
                        help="training set sizes N")
    parser.add_argument("--widths", type=int, nargs="+", default=[50, 100, 200, 400, 800, 1600],
                        help="hidden widths H")
    parser.add_argument("--hidden", type=int, default=400, help="H of the sweep over N")
    parser.add_argument("--points", type=int, default=10000, help="N of the sweep over H")
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is a warm-up")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None,
                        help="run on this many cores with as many torch threads (default: torch's)")
    args = parse_args(parser, argv)
    if args.threads:
        use_cores(args.threads)
    x = images_from_args(args).train
    if args.quick:
        args.sizes, args.widths, args.points, args.epochs = [250, 500, 1000], [16, 32, 64], 500, 2
    if max(args.sizes) > x.shape[0] or args.points > x.shape[0]:
        raise ValueError(f"--sizes and --points must not exceed the {x.shape[0]} training images")
    start = time.perf_counter()
    by_points = sweep(x, args, args.sizes, "points")
    by_width = sweep(x, args, args.widths, "hidden")
    save_figure(plots.scaling(args.sizes, by_points, xlabel="training images N",
                              title=f"Time per epoch against N (H = {args.hidden})"),
                args.out, "scaling_points")
    save_figure(plots.scaling(args.widths, by_width, xlabel="hidden width H",
                              title=f"Time per epoch against H (N = {args.points})"),
                args.out, "scaling_width")
    metrics = {"dataset": "digits" if args.quick else args.dataset, "threads": torch.get_num_threads(),
               "batch_size": args.batch_size, "sizes": args.sizes, "widths": args.widths}
    for name in IMPLEMENTATIONS:
        key = metric_key(name)
        metrics[f"{key}_seconds_by_points"] = by_points[name]
        metrics[f"{key}_seconds_by_width"] = by_width[name]
    metrics["loop_over_fit_by_width"] = [b / a for a, b in zip(by_width["fit"], by_width["pyro loop"])]
    return finish(args.out, "Seconds per epoch against N and H: fit and the Pyro loop", metrics, start)


if __name__ == "__main__":
    main()
