"""Throughput of a data-parallel fit: the digits VAE example with 1, 2, ... processes.

Each configuration launches ``examples/distributed_vae.py`` under ``torchrun`` (one
process: an ordinary fit) and reads the training points per second of its
optimisation loop from the example's ``metrics.json`` (process start and the fit's
set-up excluded; one held-out evaluation per epoch included). On a CPU every process
gets ``--threads`` threads: processes times threads beyond the cores only compete for
them, which bounds the speed-up. Each process pays Pyro's per-step tracing in full, so a
small network gains only when its batch share costs more than that and the all-reduce.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

from vi_toolkit import plots
from vi_toolkit.scripts import print_summary, save_figure, script_parser, write_metrics

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples",
                       "distributed_vae.py")


def run_example(processes, threads, epochs, batch_size, device, seed):
    """Run the example once under torchrun; its metrics."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", EXAMPLE, "--epochs", str(epochs),
               "--batch-size", str(batch_size), "--device", device, "--seed", str(seed),
               "--out", out]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        with open(os.path.join(out, "metrics.json")) as f:
            return json.load(f)


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/distributed_throughput")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run")
    parser.add_argument("--batch-size", type=int, default=100, help="global batch size")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (median)")
    args = parser.parse_args(argv)
    epochs, repeats = (2, 1) if args.quick else (args.epochs, args.repeats)
    counts = [int(k) for k in args.processes.split(",")]
    metrics = {"device": args.device, "threads_per_process": args.threads, "epochs": epochs,
               "batch_size": args.batch_size, "repeats": repeats, "cpu_cores": os.cpu_count()}
    rates = {}
    for k in counts:
        runs = [run_example(k, args.threads, epochs, args.batch_size, args.device, args.seed)
                for _ in range(repeats)]
        rates[k] = statistics.median(r["points_per_second"] for r in runs)
        metrics[f"points_per_second_{k}_processes"] = rates[k]
        metrics[f"val_elbo_{k}_processes"] = runs[-1]["val_elbo_per_point"]
    base = rates[counts[0]]
    for k in counts[1:]:
        metrics[f"speedup_{k}_vs_{counts[0]}_processes"] = rates[k] / base
    save_figure(plots.bar_chart({f"{k} process(es)": rates[k] for k in counts}, ylabel="training points / s",
                                title=f"digits VAE, batch {args.batch_size}, {args.threads} thread(s) per process"),
                args.out, "throughput")
    write_metrics(args.out, metrics)
    print_summary(f"data-parallel throughput; files in {args.out}", metrics)
    return metrics


if __name__ == "__main__":
    main()
