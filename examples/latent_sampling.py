"""Sampling from an auto-encoder's latent space, and from a VAE's prior, side by side.

An auto-encoder (``vi_toolkit.models.vae.DeepLatentGaussian`` with a flat prior and a point-mass
guide) defines no density over its latent space. As in the lecture, fit one to the codes
z_i = f(x_i) of the training images, sample there and decode with g:

* a factored Gaussian q(z) = N(mu^, diag sigma^2^) estimated on the codes (the lecture's
  unsatisfying result: the codes are not Gaussian, many samples decode to non-images);
* a Gaussian mixture p(z | theta) = sum_k pi_k N(z; mu_k, diag s_k^2), the toolkit's
  ``vi_toolkit.models.gmm.GaussianMixture`` (with its weak priors p(theta)) fitted to the codes by
  ``vi_toolkit.recipes.fit_gmm`` with the MAP guide: theta^ = argmax log p(theta) + sum_i
  log p(z_i | theta), the assignments summed out exactly (k-means++ initialisation, full-batch L-BFGS); samples z ~ p(z | theta^);
* the VAE: z ~ p(z) = N(0, I), which its training made the codes' distribution.

The densities are fitted to the codes of the training images as the auto-encoder saw them
(binarized, with ``--binarize dynamic``, as the test images are). The metrics
``ae_*_test_code_loglik`` are the average log density of the auto-encoder's test codes under
the two density models (higher: a better model of where codes lie);
``gmm_train_code_loglik`` is the mixture's on the training codes.
"""

import time

import pyro.distributions as dist
import torch

from vi_toolkit.recipes import fit_gmm
from vi_toolkit.guides.vae import DeltaEncoder, GaussianEncoder
from vi_toolkit.models.gmm import GaussianMixture
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit import plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/latent_sampling"),
                                default="fashion-mnist", binarize="dynamic")
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parse_args(parser, argv)
    data = images_from_args(args)
    epochs = 60 if args.quick else args.epochs
    hidden = (256,) if args.quick else (500,)
    shape, d = data.shape, args.latent_dim
    metrics, start = {"dataset": data.name}, time.perf_counter()
    options = dict(batch_size=args.batch_size, num_epochs=epochs, seed=args.seed, progress=not args.quick)

    mixture = GaussianMixture(args.components, d, "diag")  # checks --components before any fit
    ae_model = DeepLatentGaussian(shape, d, hidden=hidden, prior="flat")
    ae_guide = DeltaEncoder(shape, d, hidden=hidden)
    data.fit(ae_model, ae_guide, **options)
    # codes of the training images as the AE saw them (binarized like the test images, which
    # the loader binarized once; gray-level inputs give codes of another distribution). They
    # carry no graph (encode runs without gradients) and stay on the data's device, where the
    # mixture is fitted and scored; samples are drawn on the CPU and moved there
    train = data.train if data.transform is None else data.transform([data.train])[0]
    codes, test_codes = ae_guide.encode(train), ae_guide.encode(data.test)

    # the lecture's factored Gaussian, estimated on the codes
    gauss = dist.Normal(codes.mean(0), codes.std(0)).to_event(1)
    # a mixture of Gaussians: the MAP estimate of vi_toolkit.models.gmm's parameters
    gmm_fit, gmm_guide = fit_gmm(mixture, codes, guide="map", seed=args.seed, device=codes.device)
    theta = gmm_guide.point_estimate(gmm_fit)
    vae_model, vae_guide = DeepLatentGaussian(shape, d, hidden=hidden), GaussianEncoder(shape, d, hidden=hidden)
    vae_fit = data.fit(vae_model, vae_guide, elbo="meanfield", **options)

    n = 20
    gen = torch.Generator().manual_seed(args.seed)
    eps = torch.randn(2, n, d, generator=gen).to(codes.device)
    gmm_draws = mixture.simulate({k: v.cpu() for k, v in theta.items()}, n, generator=gen)[0]
    samples = {"AE + Gaussian": (gauss.mean + gauss.stddev * eps[0], ae_model),
               "AE + GMM": (gmm_draws.to(codes.device), ae_model),
               "VAE prior": (eps[1], vae_model)}
    rows, labels = [], []
    for label, (z, model) in samples.items():
        rows.append(model.decode(z))
        labels += [label, ""]
    save_figure(plots.image_grid(torch.cat(rows), nrow=n // 2, row_labels=labels,
                                 title="Decoded samples from a density on the latent space"),
                args.out, "samples")
    metrics["ae_gaussian_test_code_loglik"] = float(gauss.log_prob(test_codes).mean())
    metrics["ae_gmm_test_code_loglik"] = float(mixture.log_likelihood(test_codes, theta).mean())
    metrics["gmm_train_code_loglik"] = float(mixture.log_likelihood(codes, theta).mean())
    metrics["vae_val_elbo"] = vae_fit.val_elbo
    return finish(args.out, f"Sampling from latent spaces on {data.name} (latent {d})", metrics, start)


if __name__ == "__main__":
    main()
