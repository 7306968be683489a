"""Gradient estimators on a VAE: plain vs sticking the landing, and the encoder's SNR under IWAE and DReG.

On the toolkit's VAE (``vi_toolkit.models.vae.DeepLatentGaussian`` with a Bernoulli likelihood
and ``vi_toolkit.guides.vae.GaussianEncoder``, an MLP of ``--hidden`` units each side) this script

* fits the same initial networks twice, with ``elbo="trace"`` (the plain reparameterization
  gradient) and ``elbo="stl"`` (sticking the landing, Roeder et al. 2017), and reports each
  fit's final test ELBO per image (``vi_toolkit.evaluation.elbo_per_point``);
* at each fit's final parameters, draws ``--draws`` gradients of both estimators on one batch
  of training images and reports the variance of the encoder gradient, the sum over the
  encoder's parameters of Var[g] (the decoder's gradient is the same under both);
* at the plain fit's parameters, reports the signal-to-noise ratio of the encoder gradient,
  ``|E g| / sd(g)`` per parameter averaged over the parameters whose gradient is not always zero,
  for K = 1, 10, 100 under ``"iwae"`` and ``"iwae-dreg"`` (Tucker et al. 2018): Rainforth et al.
  (2018) show plain IWAE's falls as 1/sqrt(K).

Figures: ``snr.png`` (SNR against K, log-log) and ``elbo_curves.png`` (the two fits).
"""

import math
import time

import torch

from vi_toolkit import make_elbo, plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.evaluation import elbo_per_point
from vi_toolkit.guides.vae import GaussianEncoder
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser

ESTIMATORS = ("trace", "stl")
SNR_K = (1, 10, 100)


def encoder_gradients(elbo, model, guide, x, num_data, draws):
    """``draws`` gradients of the loss on the batch ``x`` w.r.t. the encoder's parameters, (draws, P)."""
    params = list(guide.encoder.parameters())
    rows = []
    for _ in range(draws):
        loss = elbo.differentiable_loss(model, guide, x, num_data=num_data)
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def signal_to_noise(rows):
    """``|E g| / sd(g)`` of each column, averaged over the columns that are not always zero."""
    sd = rows.std(0)
    live = sd > 0
    return float((rows.mean(0)[live].abs() / sd[live]).mean())


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/gradient_estimators"),
                                default="digits", binarize="dynamic")
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--draws", type=int, default=200, help="gradient draws per estimate")
    parser.add_argument("--eval-samples", type=int, default=100, help="guide draws per test image")
    args = parse_args(parser, argv)
    if args.quick:
        args.hidden, args.epochs, args.draws, args.eval_samples = 32, 1, 20, 10
    start = time.perf_counter()
    data = images_from_args(args)
    batch = torch.bernoulli(data.train[:args.batch_size], generator=torch.Generator().manual_seed(args.seed))
    batch = batch.to(data.train.device)
    num_data = data.train.shape[0]
    metrics = {"dataset": data.name, "architecture": f"{math.prod(data.shape)}-{args.hidden}-{args.latent_dim}",
               "epochs": args.epochs, "batch_size": args.batch_size, "draws": args.draws}
    fits, histories = {}, {}
    for name in ESTIMATORS:
        torch.manual_seed(args.seed)  # the same initial networks for both
        vae = (DeepLatentGaussian(data.shape, args.latent_dim, hidden=(args.hidden,)),
               GaussianEncoder(data.shape, args.latent_dim, hidden=(args.hidden,)))
        result = data.fit(*vae, elbo=name, batch_size=args.batch_size, num_epochs=args.epochs, lr=args.lr,
                          seed=args.seed, device=args.device, progress=False)
        fits[name], histories[name] = (result, vae), result.history
        metrics[f"{name}_test_elbo"] = float(elbo_per_point(result, data.test, num_samples=args.eval_samples,
                                                            seed=args.seed).mean())
        print(f"{name}: test ELBO {metrics[f'{name}_test_elbo']:.3f} per image", flush=True)
    for fitted in ESTIMATORS:
        result, (model, guide) = fits[fitted]
        with result.scope():
            for name in ESTIMATORS:
                rows = encoder_gradients(make_elbo(name), model, guide, batch, num_data, args.draws)
                metrics[f"{name}_grad_variance_at_{fitted}_fit"] = float(rows.var(0).sum())
        metrics[f"trace_over_stl_at_{fitted}_fit"] = (metrics[f"trace_grad_variance_at_{fitted}_fit"]
                                                      / metrics[f"stl_grad_variance_at_{fitted}_fit"])
    result, (model, guide) = fits["trace"]
    curves = {}
    with result.scope():
        for name in ("iwae", "iwae-dreg"):
            curves[name] = []
            for K in SNR_K:
                rows = encoder_gradients(make_elbo(name, num_particles=K), model, guide, batch, num_data,
                                         args.draws)
                metrics[f"{name}_snr_k{K}"] = signal_to_noise(rows)
                curves[name].append(metrics[f"{name}_snr_k{K}"])
    save_figure(plots.scaling(list(SNR_K), curves, xlabel="K (importance samples)", ylabel="encoder gradient SNR",
                              title="Signal-to-noise ratio of the encoder gradient"), args.out, "snr")
    save_figure(plots.elbo_curves(histories, x="epoch", title="Plain vs sticking-the-landing gradients"),
                args.out, "elbo_curves")
    return finish(args.out, "Gradient estimators on a VAE", metrics, start)


if __name__ == "__main__":
    main()
