"""A VAE on scikit-learn's 8x8 digits, fitted data-parallel over the processes torchrun starts.

    python examples/distributed_vae.py --quick                               # one process
    torchrun --nproc_per_node=2 examples/distributed_vae.py --quick          # two, CPU (gloo)
    torchrun --nproc_per_node=4 examples/distributed_vae.py --device cuda    # four GPUs (NCCL)

The script is the same in every case: ``fit`` notices torchrun's environment, splits each
global batch of ``--batch-size`` points across the processes and averages their
gradients. Only rank 0 prints and writes ``metrics.json`` and the ELBO curve.
"""

import time

import torch

from vi_toolkit.guides.vae import GaussianEncoder
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit import fit
from vi_toolkit.datasets import load_images
from vi_toolkit.distributed import launched, rank
from vi_toolkit.plots import elbo_curves
from vi_toolkit.scripts import print_summary, save_figure, script_parser, write_metrics


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/distributed_vae")
    parser.add_argument("--epochs", type=int, default=100, help="passes over the training data")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="global batch, split across the processes")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else args.epochs
    # binarized 8x8 digits, loaded on the CPU: fit moves them to each process's device
    data = load_images("digits", binarize="dynamic", seed=args.seed, device="cpu")
    torch.manual_seed(args.seed)  # fit starts every process from rank 0's parameters anyway
    model = DeepLatentGaussian(data.shape, 4, hidden=(128,))
    guide = GaussianEncoder(data.shape, 4, hidden=(128,))
    start = time.perf_counter()
    result = fit(model, guide, data.train, val_data=data.val, transform=data.transform,
                 batch_size=args.batch_size, num_epochs=epochs, lr=args.lr, device=args.device,
                 seed=args.seed)
    seconds = time.perf_counter() - start
    world = result.config.get("world_size", 1)
    metrics = {
        "processes": world,
        "device": str(result.device),
        "epochs": epochs,
        "batch_size": args.batch_size,
        "train_elbo_per_point": result.elbo,
        "val_elbo_per_point": result.val_elbo,
        "fit_seconds": seconds,
        # training points per second of the loop (held-out evaluations included)
        "points_per_second": result.history["step"][-1] * args.batch_size / result.history["time"][-1],
    }
    if rank() == 0:
        save_figure(elbo_curves(result.history, title=f"VAE on 8x8 digits, {world} process(es)"), args.out, "elbo")
        write_metrics(args.out, metrics)
        print_summary(f"distributed VAE ({world} process(es)); files in {args.out}", metrics)
    if launched():
        torch.distributed.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
