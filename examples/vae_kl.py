"""The lecture's example VAE, trained with the analytic KL and with the Monte Carlo KL.

Generative model: z ~ N(0, I),  h = ReLU(W1 z + b1),  mu(z) = W2 h + b2,
log sigma^2(z) = W3 h + b3,  x | z ~ N(mu(z), diag sigma^2(z))  (``likelihood="gaussian"``).
Inference model: h = ReLU(W4 x + b4), mu(x) = W5 h + b5, log sigma^2(x) = W6 h + b6,
z = mu(x) + sigma(x) * eps  (``vi_toolkit.guides.vae.GaussianEncoder``).

    ELBO = E_eps[log p(x | z = mu + sigma * eps)] - KL(q(z | x) || p(z))

is fitted twice from the same initialization: ``elbo="meanfield"`` takes
KL = -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2) in closed form, ``elbo="trace"``
estimates it by log q(z | x) - log p(z) at the sampled z. Both are unbiased for the same
objective; the analytic KL removes part of the gradient noise.
"""

import time

import torch

from vi_toolkit.guides.vae import GaussianEncoder
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit import plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/vae_kl"),
                                default="fashion-mnist", binarize="none")
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parse_args(parser, argv)
    data = images_from_args(args)
    epochs = 40 if args.quick else args.epochs
    hidden = (128,) if args.quick else (args.hidden,)
    metrics, histories, start = {"dataset": data.name}, {}, time.perf_counter()
    for elbo in ("meanfield", "trace"):
        torch.manual_seed(args.seed)  # the same initial networks for both objectives
        model = DeepLatentGaussian(data.shape, args.latent_dim, likelihood="gaussian", hidden=hidden)
        guide = GaussianEncoder(data.shape, args.latent_dim, hidden=hidden)
        result = data.fit(model, guide, elbo=elbo, batch_size=args.batch_size, num_epochs=epochs,
                          seed=args.seed, progress=not args.quick)
        label = "analytic KL" if elbo == "meanfield" else "Monte Carlo KL"
        histories[label] = result.history
        metrics[f"{elbo}_train_elbo"] = result.elbo
        metrics[f"{elbo}_val_elbo"] = result.val_elbo
        metrics[f"{elbo}_seconds_per_epoch"] = result.history["time"][-1] / epochs
        save_figure(plots.image_grid(model.sample(32, generator=torch.Generator().manual_seed(args.seed)),
                                     title=f"Means of p(x | z), z ~ p(z): {label}"),
                    args.out, f"samples_{elbo}")
    save_figure(plots.elbo_curves(histories, x="epoch", title="Gaussian VAE: analytic vs Monte Carlo KL"),
                args.out, "elbo_curves")
    return finish(args.out, f"Lecture VAE on {data.name}: analytic vs Monte Carlo KL ({epochs} epochs)", metrics, start)


if __name__ == "__main__":
    main()
