"""The contract every script under ``examples/`` and ``benchmarks/`` shares.

``--help``, ``--quick`` (a run of seconds, used by the demo and the smoke tests),
``--out DIR`` (figures as PNG and a ``metrics.json``), ``--device`` and ``--seed``;
each script prints a short summary at the end.

A script draws its figures with :mod:`vi_toolkit.plots` and writes them with
:func:`save_figure`. Building the script's parser (:func:`script_parser`) selects
matplotlib's Agg backend: a script writes files and opens no window. Importing this module
(or ``vi_toolkit.plots``) leaves the backend alone, so notebooks keep their inline plots.
"""

import argparse
import json
import os
import time

import matplotlib
import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure


def script_parser(description, default_out):
    """An ``ArgumentParser`` with the shared options; add the script's own to it.

    Also selects matplotlib's Agg backend for the script's process (the one place the
    toolkit chooses a backend): a script saves its figures as PNG and shows none.
    """
    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a run of seconds (smoke test, demo)")
    parser.add_argument("--out", default=default_out, help="folder for PNG figures and metrics.json")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def _file_in(out: str | os.PathLike, name: str, suffix: str) -> str:
    """``out/name + suffix``, creating ``out``; ``name`` is a bare file stem."""
    if not name or os.path.basename(name) != name or os.path.splitext(name)[1]:
        raise ValueError(f"name must be a file name without folder or extension, got {name!r}")
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, name + suffix)


def save_figure(fig: Figure, out: str | os.PathLike, name: str) -> str:
    """Write ``fig`` as ``out/name.png`` (creating ``out``) and close it.

    Args:
        fig: the figure, as returned by the functions of :mod:`vi_toolkit.plots`.
        out: the script's output folder (``--out``).
        name: the file's stem, without folder or extension (``"elbo"`` gives ``elbo.png``).

    Returns:
        The path of the PNG file.

    Raises:
        ValueError: ``fig`` is not a matplotlib Figure, or ``name`` holds a folder or an
            extension.
    """
    if not isinstance(fig, Figure):
        raise ValueError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    path = _file_in(out, name, ".png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def save_gif(frames, out: str | os.PathLike, name: str, *, duration_ms: int = 80, scale: int = 4) -> str:
    """Write images as a looping animated GIF ``out/name.gif``, each pixel ``scale``-fold.

    Args:
        frames: (T, H, W) or (T, 1, H, W) grey images with values in [0, 1].
        out: the script's output folder (``--out``).
        name: the file's stem, without folder or extension.
        duration_ms: how long each frame shows.
        scale: the enlargement of each pixel.

    Returns:
        The path of the GIF file.

    Raises:
        ValueError: ``frames`` is not a sequence of grey images, or ``name`` holds a folder
            or an extension.
    """
    from PIL import Image

    frames = torch.as_tensor(frames).detach().float().cpu()
    if frames.dim() == 4 and frames.shape[1] == 1:
        frames = frames[:, 0]
    if frames.dim() != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (T, H, W) or (T, 1, H, W) with T >= 1, got {tuple(frames.shape)}")
    path = _file_in(out, name, ".gif")
    pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
              for f in pixels]
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path


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
