"""Kingma & Welling (2013), Auto-Encoding Variational Bayes: analogues of Fig. 2 and Fig. 4.

The VAE of the paper: p(z) = N(0, I), a Bernoulli MLP decoder and a Gaussian MLP encoder
with one hidden layer of 500 units, on binarized images (dynamic binarization: each
training batch is resampled x_bin ~ Bernoulli(x)), fitted by ``vi_toolkit.fit``.

* Fig. 2: the training and test lower bound per image against the number of training
  samples seen, for latent sizes Nz in {3, 5, 10, 20, 200} (``--latent-dims``);
* Fig. 4: for Nz = 2, the learned data manifold (decoded means of p(x | z) on a grid of
  z = Phi^-1(u), u on a regular grid of the unit square) and the test codes mu(x)
  coloured by label;
* random samples (decoded means, z ~ p(z)) for each Nz.

The paper used MNIST; here Fashion-MNIST (Debian's package) by default, MNIST with
``--dataset mnist --data-root DIR [--download]``, the 8x8 digits with ``--quick``.
"""

import time

import torch

from vi_toolkit.guides.vae import GaussianEncoder
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit import plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser


def manifold(model, size):
    """Decoded means on the grid z = Phi^-1(u), u in a size x size grid of (0, 1)^2."""
    u = torch.linspace(0.05, 0.95, size)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.cartesian_prod(u.flip(0), u))[:, [1, 0]]
    return model.decode(z.to(next(model.parameters()).device))


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/kingma_welling"),
                                default="fashion-mnist", binarize="dynamic")
    parser.add_argument("--latent-dims", type=int, nargs="+", default=[3, 5, 10, 20, 200])
    parser.add_argument("--hidden", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--activation", default="tanh", help="the paper's hidden units are tanh")
    args = parse_args(parser, argv)
    data = images_from_args(args)
    epochs = 30 if args.quick else args.epochs
    hidden = (128,) if args.quick else (args.hidden,)
    dims = sorted(set([3, 5, 20] if args.quick else args.latent_dims))
    metrics, histories, samples, start = {"dataset": data.name}, {}, [], time.perf_counter()
    options = dict(batch_size=args.batch_size, num_epochs=epochs, seed=args.seed, progress=not args.quick,
                   elbo="meanfield", val_data="test", lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    for nz in sorted(set(dims) | {2}):
        model = DeepLatentGaussian(data.shape, nz, hidden=hidden, activation=args.activation)
        guide = GaussianEncoder(data.shape, nz, hidden=hidden, activation=args.activation)
        result = data.fit(model, guide, **options)
        metrics[f"nz{nz}_train_elbo"], metrics[f"nz{nz}_test_elbo"] = result.elbo, result.val_elbo
        if nz == 2:  # Fig. 4: the manifold and the test codes
            size = 10 if args.quick else 20
            save_figure(plots.image_grid(manifold(model, size), nrow=size, title="Learned manifold, Nz = 2"),
                        args.out, "manifold_2d")
            save_figure(plots.latent_scatter(guide.encode(data.test), data.test_labels,
                                             class_names=list(data.classes), title="Test codes mu(x), Nz = 2"),
                        args.out, "test_codes_2d")
        if nz in dims:
            history = dict(result.history)
            history["samples seen"] = [s * args.batch_size for s in history["step"]]
            histories[f"Nz={nz}"] = history
            samples.append(model.sample(10, generator=gen))
    save_figure(plots.elbo_curves(histories, x="samples seen", title="Train (solid) and test (dashed) lower bound"),
                args.out, "lower_bound_vs_samples")
    save_figure(plots.image_grid(torch.cat(samples), nrow=10, row_labels=[f"Nz={nz}" for nz in dims],
                                 title="Random samples (means of p(x | z))"),
                args.out, "samples")
    return finish(args.out, f"Kingma & Welling analogue on {data.name} ({epochs} epochs)", metrics, start)


if __name__ == "__main__":
    main()
