"""The contract every script under ``examples/`` and ``benchmarks/`` shares.

``--help``, ``--quick`` (a run of seconds, used by the demo and the smoke tests),
``--out DIR`` (figures as PNG and a ``metrics.json``), ``--device`` and ``--seed``;
each script prints a short summary at the end.
"""

import argparse
import json
import os
import time

import matplotlib

matplotlib.use("Agg")  # scripts write PNG files; no display needed
import torch  # noqa: E402


def script_parser(description, default_out):
    """An ``ArgumentParser`` with the shared options; add the script's own to it."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a run of seconds (smoke test, demo)")
    parser.add_argument("--out", default=default_out, help="folder for PNG figures and metrics.json")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def write_metrics(out, metrics):
    """Write ``metrics`` to ``out/metrics.json`` and return the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "metrics.json")
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2, default=float)
    return path


def print_summary(title, metrics):
    """Print ``metrics`` (a flat dict) as an aligned summary under ``title``."""
    print(f"\n{title}")
    for key, value in metrics.items():
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        print(f"  {key:<36} {text}")


def parse_args(parser, argv=None):
    """Parse a script's arguments and seed torch with ``--seed`` (networks are built before any
    fit seeds its own run, so the same seed gives the same script run). A ``--quick`` run uses
    one torch thread, since its tiny networks run faster on one thread than on several."""
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.quick:
        torch.set_num_threads(1)
    return args


def use_cores(n):
    """Run this process on ``n`` CPU cores with ``n`` torch threads; returns the cores.

    Every thread of the process, and every thread it starts later (a peer's thread pool:
    JAX/XLA, BLAS), is pinned to the same first ``n`` of the cores it may use, so that
    implementations compared in one process get the same hardware. Linux only.
    """
    available = sorted(os.sched_getaffinity(0))
    if not isinstance(n, int) or not 1 <= n <= len(available):
        raise ValueError(f"--threads must be between 1 and the {len(available)} cores available, got {n!r}")
    cores = set(available[:n])
    for task in os.listdir("/proc/self/task"):  # the threads already running
        os.sched_setaffinity(int(task), cores)
    torch.set_num_threads(n)
    return sorted(cores)


def finish(out, title, metrics, start=None):
    """Add the seconds since ``start``, write ``metrics.json``, print the summary; return metrics."""
    if start is not None:
        metrics["seconds"] = time.perf_counter() - start
    write_metrics(out, metrics)
    print_summary(title, metrics)
    return metrics
