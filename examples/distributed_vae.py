"""A VAE on scikit-learn's 8x8 digits, fitted data-parallel over the processes torchrun starts.

    python examples/distributed_vae.py --quick                               # one process
    torchrun --nproc_per_node=2 examples/distributed_vae.py --quick          # two, CPU (gloo)
    torchrun --nproc_per_node=4 examples/distributed_vae.py --device cuda    # four GPUs (NCCL)

The script is the same in every case: ``fit`` notices torchrun's environment, splits each
global batch of ``--batch-size`` points across the processes and averages their
gradients. Only rank 0 prints and writes ``metrics.json`` and the ELBO curve.
"""

import time

import pyro
import pyro.distributions as dist
import torch
from sklearn.datasets import load_digits
from torch import nn

from vi_toolkit import data_plate, fit
from vi_toolkit.distributed import launched, rank
from vi_toolkit.plots import elbo_curves
from vi_toolkit.scripts import print_summary, script_parser, write_metrics


class VAE(nn.Module):
    """Bernoulli decoder p(x | z) with a standard Normal prior, Gaussian encoder q(z | x)."""

    def __init__(self, num_pixels=64, latent_dim=4, hidden=128):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(nn.Linear(num_pixels, hidden), nn.Softplus(),
                                     nn.Linear(hidden, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.Softplus(),
                                     nn.Linear(hidden, num_pixels))

    def model(self, x, num_data=None):
        pyro.module("decoder", self.decoder)
        with data_plate(x, num_data):
            prior = dist.Normal(x.new_zeros(self.latent_dim), 1.0).expand(
                [x.shape[0], self.latent_dim]).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        pyro.module("encoder", self.encoder)
        with data_plate(x, num_data):
            loc, log_scale = self.encoder(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def digits():
    """Binarised 8x8 digits (1797 images as 64 pixels), split 1500 for training, the rest held out."""
    images = torch.as_tensor(load_digits().data, dtype=torch.float32)
    x = (images >= 8).float()
    return x[:1500], x[1500:]


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/distributed_vae")
    parser.add_argument("--epochs", type=int, default=100, help="passes over the training data")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="global batch, split across the processes")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else args.epochs
    train, val = digits()
    torch.manual_seed(args.seed)  # fit starts every process from rank 0's parameters anyway
    vae = VAE()
    start = time.perf_counter()
    result = fit(vae.model, vae.guide, train, val_data=val, batch_size=args.batch_size,
                 num_epochs=epochs, lr=args.lr, device=args.device, seed=args.seed)
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
        elbo_curves(result.history, f"{args.out}/elbo.png",
                    title=f"VAE on 8x8 digits, {world} process(es)")
        write_metrics(args.out, metrics)
        print_summary(f"distributed VAE ({world} process(es)); files in {args.out}", metrics)
    if launched():
        torch.distributed.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
