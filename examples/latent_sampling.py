"""Sampling from an auto-encoder's latent space, and from a VAE's prior, side by side.

An auto-encoder (``models.vae.DeepLatentGaussian`` with a flat prior and a point-mass
guide) defines no density over its latent space. As in the lecture, fit one to the codes
z_i = f(x_i) of the training images, sample there and decode with g:

* a factored Gaussian q(z) = N(mu^, diag sigma^2^) estimated on the codes (the lecture's
  unsatisfying result: the codes are not Gaussian, many samples decode to non-images);
* a Gaussian mixture sum_k pi_k N(mu_k, diag s_k^2), fitted to the codes by maximum likelihood
  with ``vi_toolkit.fit`` (the mixture is marginalized in the likelihood; the guide is empty);
  ``models/gmm.py`` is the toolkit's Bayesian mixture, this is its point-estimate cousin
  kept here so the script needs nothing else;
* the VAE: z ~ p(z) = N(0, I), which its training made the codes' distribution.

The metrics ``ae_*_test_code_loglik`` are the average log density of the auto-encoder's
test codes under the two density models (higher: a better model of where codes lie).
"""

import os
import time

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from guides.vae import DeltaEncoder, GaussianEncoder
from models.vae import DeepLatentGaussian
from vi_toolkit import data_plate, fit, plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.scripts import finish, parse_args, script_parser


def gmm_density(z, num_data=None, *, num_components=10, init_locs=None):
    """p(z) = sum_k pi_k N(z; mu_k, diag s_k^2), every parameter a point estimate."""
    weights = pyro.param("weights", lambda: z.new_full((num_components,), 1.0 / num_components),
                         constraint=constraints.simplex)
    locs = pyro.param("locs", lambda: init_locs.clone())
    scales = pyro.param("scales", lambda: z.new_ones(num_components, z.shape[-1]) * z.std(0),
                        constraint=constraints.positive)
    mixture = dist.MixtureSameFamily(dist.Categorical(weights), dist.Normal(locs, scales).to_event(1))
    with data_plate(z, num_data):
        pyro.sample("z", mixture, obs=z)
    return mixture


def no_latents(z, num_data=None, **kwargs):
    """The guide of a model without latent variables: nothing to infer."""


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
    gen = torch.Generator(device=data.train.device).manual_seed(args.seed)

    ae_model = DeepLatentGaussian(shape, d, hidden=hidden, prior="flat")
    ae_guide = DeltaEncoder(shape, d, hidden=hidden)
    data.fit(ae_model, ae_guide, **options)
    codes, test_codes = ae_guide.encode(data.train), ae_guide.encode(data.test)

    # the lecture's factored Gaussian, estimated on the codes
    gauss = dist.Normal(codes.mean(0), codes.std(0)).to_event(1)
    # a mixture of Gaussians, fitted by maximum likelihood with fit
    init = codes[torch.randperm(codes.shape[0], generator=gen, device=codes.device)[:args.components]]
    mixture_fit = fit(lambda z, num_data=None: gmm_density(z, num_data, num_components=args.components,
                                                            init_locs=init),
                      no_latents, codes, lr=0.05, batch_size=min(512, codes.shape[0]),
                      num_epochs=100 if args.quick else 30, seed=args.seed, progress=False,
                      device=codes.device)
    with mixture_fit.scope():
        gmm = gmm_density(codes[:1], num_components=args.components, init_locs=init)
    vae_model, vae_guide = DeepLatentGaussian(shape, d, hidden=hidden), GaussianEncoder(shape, d, hidden=hidden)
    vae_fit = data.fit(vae_model, vae_guide, elbo="meanfield", **options)
    prior = dist.Normal(torch.zeros_like(codes[0]), torch.ones_like(codes[0])).to_event(1)

    n, rows, labels = 20, [], []
    for label, density, model in (("AE + Gaussian", gauss, ae_model), ("AE + GMM", gmm, ae_model),
                                  ("VAE prior", prior, vae_model)):
        with torch.no_grad():
            rows.append(model.decode(density.sample((n,))))
        labels += [label, ""]
    plots.image_grid(torch.cat(rows), os.path.join(args.out, "samples.png"), nrow=n // 2,
                     row_labels=labels, title="Decoded samples from a density on the latent space")
    with torch.no_grad():
        metrics["ae_gaussian_test_code_loglik"] = float(gauss.log_prob(test_codes).mean())
        metrics["ae_gmm_test_code_loglik"] = float(gmm.log_prob(test_codes).mean())
    metrics["vae_val_elbo"] = vae_fit.val_elbo
    metrics["gmm_train_loglik_per_code"] = mixture_fit.elbo
    return finish(args.out, f"Sampling from latent spaces on {data.name} (latent {d})", metrics, start)


if __name__ == "__main__":
    main()
