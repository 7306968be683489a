"""IWAE evaluation throughput: images x importance samples per second.

The test log-likelihood of a VAE is estimated per image by the importance-weighted bound

    log p(x) ~ log 1/K sum_k p(x, z_k) / q(z_k | x),   z_k ~ q(z | x),

with K = 5000 in the papers (Burda et al. 2016), so evaluation, not training, is often the
longest part of a VAE experiment. For a Bernoulli MLP VAE (784-H-Z, fitted for
``--epochs`` with analytic KL) this script times, on the same test images and the same K:

* ``toolkit``   ``vi_toolkit.evaluation.pointwise_estimates`` (any model and guide: it traces
  them and sums the log-densities, vectorized over a chunk of samples at a time), for
  several ``--chunk-sizes`` (samples drawn at once per batch of ``--batch-size`` images);
* ``torch``     the same estimator written by hand for this VAE: the encoder once per image,
  then per chunk one batched decoder pass over chunk x batch codes and a running log-sum-exp.

It prints (and plots, ``iwae_throughput.png``) images x samples per second, the projected time of 10,000 images with K = 5000,
and the two estimates side by side (their mean difference in standard errors, since the
draws differ).
"""

import math
import time

import torch

from vi_toolkit.guides.vae import GaussianEncoder
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit import plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.evaluation import pointwise_estimates
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser


@torch.no_grad()
def torch_iwae(model, guide, x, num_samples, batch_size, chunk_size):
    """log 1/K sum_k p(x, z_k) / q(z_k | x) per image, written directly in PyTorch."""
    normal = torch.distributions.Normal
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        loc, log_var = guide.encoder(xb)
        q = normal(loc, (0.5 * log_var).exp())
        flat = xb.flatten(1)
        lse, done = None, 0
        while done < num_samples:
            k = min(chunk_size, num_samples - done)
            z = q.sample((k,))  # (k, B, Z)
            logits, = model.decoder(z.reshape(-1, z.shape[-1]))
            log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
                logits.reshape(k, *flat.shape), flat.expand(k, *flat.shape), reduction="none").sum(-1)
            log_w = log_lik + normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
            chunk = torch.logsumexp(log_w, 0)
            lse = chunk if lse is None else torch.logaddexp(lse, chunk)
            done += k
        out.append(lse - math.log(num_samples))
    return torch.cat(out)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/iwae_throughput"),
                                default="fashion-mnist", binarize="dynamic")
    parser.add_argument("--hidden", type=int, default=400)
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2, help="training epochs before evaluation")
    parser.add_argument("--points", type=int, default=200, help="test images evaluated")
    parser.add_argument("--num-samples", type=int, default=5000, help="K")
    parser.add_argument("--batch-size", type=int, default=100, help="images per evaluation batch")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[100, 500, 1000],
                        help="samples drawn at once")
    args = parse_args(parser, argv)
    if args.quick:
        args.hidden, args.epochs, args.points, args.num_samples, args.chunk_sizes = 64, 5, 50, 200, [50, 200]
    data = images_from_args(args)
    torch.manual_seed(args.seed)
    model = DeepLatentGaussian(data.shape, args.latent_dim, hidden=(args.hidden,))
    guide = GaussianEncoder(data.shape, args.latent_dim, hidden=(args.hidden,))
    result = data.fit(model, guide, elbo="meanfield", batch_size=128, num_epochs=args.epochs, seed=args.seed,
                      progress=False)
    x = data.test[:args.points]
    work = x.shape[0] * args.num_samples
    metrics = {"dataset": data.name, "architecture": f"{math.prod(data.shape)}-{args.hidden}-{args.latent_dim}",
               "points": x.shape[0], "num_samples": args.num_samples, "threads": torch.get_num_threads()}
    start = time.perf_counter()
    print(f"{'implementation':<10}{'chunk':>7}{'seconds':>9}{'img*samples/s':>15}{'10k x 5000 (min)':>18}"
          f"{'mean log p(x)':>15}")
    rows = {}
    for chunk in args.chunk_sizes:
        for name, run in (("toolkit", lambda: pointwise_estimates(result, x, num_samples=args.num_samples,
                                                                  batch_size=args.batch_size, chunk_size=chunk,
                                                                  seed=args.seed)["log_likelihood"]),
                          ("torch", lambda: torch_iwae(model, guide, x, args.num_samples, args.batch_size,
                                                       chunk))):
            values, seconds = timed(run)
            rows[name, chunk] = values
            rate = work / seconds
            metrics[f"{name}_chunk{chunk}_samples_per_second"] = rate
            print(f"{name:<10}{chunk:>7}{seconds:>9.2f}{rate:>15.3g}{1e4 * 5000 / rate / 60:>18.1f}"
                  f"{float(values.mean()):>15.3f}", flush=True)
    best = {name: max(metrics[f"{name}_chunk{c}_samples_per_second"] for c in args.chunk_sizes)
            for name in ("toolkit", "torch")}
    metrics["best_toolkit_samples_per_second"], metrics["best_torch_samples_per_second"] = best["toolkit"], best["torch"]
    metrics["toolkit_over_torch_time"] = best["torch"] / best["toolkit"]
    metrics["minutes_for_10k_images_k5000"] = 1e4 * 5000 / best["toolkit"] / 60
    save_figure(plots.bar_chart({f"{name} (chunk {c})": metrics[f"{name}_chunk{c}_samples_per_second"]
                                 for name in ("toolkit", "torch") for c in args.chunk_sizes},
                                ylabel="images x samples per second", title=f"IWAE evaluation, K = {args.num_samples}"),
                args.out, "iwae_throughput")
    a, b = rows["toolkit", args.chunk_sizes[-1]], rows["torch", args.chunk_sizes[-1]]
    diff = a - b
    metrics["toolkit_iwae"], metrics["torch_iwae"] = float(a.mean()), float(b.mean())
    metrics["difference_in_standard_errors"] = float(diff.mean() / (diff.std() / math.sqrt(diff.numel())))
    return finish(args.out, "IWAE evaluation throughput (images x samples per second)", metrics, start)


if __name__ == "__main__":
    main()
