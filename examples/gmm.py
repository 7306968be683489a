"""Gaussian mixture by variational inference with the assignments summed out; choosing K.

By default the data are simulated from ``vi_toolkit.models.gmm`` itself with three well-separated
2-D components (full covariances). ``--data FILE`` (.csv or .npy, one point per row)
fits your own data instead, standardised per column. For K = 1..Kmax the mixture is
fitted (MAP guide by default, k-means++ initialisation) and scored by its training ELBO
and its exact held-out log-likelihood per point, log p(x) = logsumexp_k (log w_k + log
N(x | mu_k, Sigma_k)); the smallest K within one standard error of the best held-out
score is kept (``vi_toolkit.recipes.select_K``), its points are
coloured by their MAP assignments (``infer_discrete``) and its components drawn as ellipses.
"""

import time

import torch

from vi_toolkit.recipes import select_K
from vi_toolkit.models.gmm import GaussianMixture
from vi_toolkit import plots
from vi_toolkit.io import load_array
from vi_toolkit.scripts import parse_args, print_summary, save_figure, script_parser, write_metrics

TRUE = {"weights": torch.tensor([0.5, 0.3, 0.2]),
        "locs": torch.tensor([[-4.0, 0.0], [3.0, 3.0], [3.0, -3.0]]),
        "scales": torch.tensor([[1.0, 0.6], [0.7, 1.2], [0.8, 0.8]]),
        "corr_cholesky": torch.linalg.cholesky(torch.tensor([[[1.0, 0.5], [0.5, 1.0]],
                                                             [[1.0, -0.3], [-0.3, 1.0]],
                                                             [[1.0, 0.0], [0.0, 1.0]]]))}


def load_data(args):
    """(train, test, truth): simulated from the model, or the user's file split 80/20."""
    gen = torch.Generator().manual_seed(args.seed)
    if args.data is None:
        n = 600 if args.quick else args.n
        mixture = GaussianMixture(3, 2, "full")
        x, _ = mixture.simulate(TRUE, n, generator=gen)
        x_test, _ = mixture.simulate(TRUE, n, generator=gen)
        return x, x_test, mixture
    x = torch.as_tensor(load_array(args.data, ndim=2), dtype=torch.get_default_dtype())
    if len(x) < 10:
        raise ValueError(f"{args.data}: {len(x)} rows; need at least 10 points")
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    perm = torch.randperm(len(x), generator=gen)
    cut = int(0.8 * len(x))
    return x[perm[:cut]], x[perm[cut:]], None


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/gmm")
    parser.add_argument("--data", help="your own data: a .csv or .npy file, one point per row")
    parser.add_argument("--n", type=int, default=2000, help="simulated points (train and test each)")
    parser.add_argument("--kmax", type=int, default=6, help="largest K to try")
    parser.add_argument("--covariance", choices=("diag", "full"), default="full")
    parser.add_argument("--guide", choices=("map", "meanfield"), default="map")
    parser.add_argument("--restarts", type=int, default=2, help="fits per K from different seedings")
    args = parse_args(parser, argv)
    start = time.perf_counter()
    x, x_test, truth = load_data(args)
    kmax = min(args.kmax, 4) if args.quick else args.kmax
    curve = select_K(x, x_test, kmax, covariance=args.covariance, guide=args.guide,
                     restarts=1 if args.quick else args.restarts, seed=args.seed, device=args.device)
    best = curve["chosen_K"] - 1
    mixture, result, guide = curve["fits"][best]
    est = {k: v.cpu() for k, v in guide.point_estimate(result).items()}
    x_cpu, x_test_cpu = x.cpu(), x_test.cpu()
    labels = mixture.map_assignments(x_cpu, est)
    metrics = {"data": args.data or "simulated", "num_train": len(x), "num_test": len(x_test),
               "dim": x.shape[1], "covariance": args.covariance, "guide": args.guide,
               "chosen_K": mixture.K,
               "heldout_loglik": curve["heldout_loglik"][best], "train_elbo": result.elbo,
               "curve_K": curve["K"], "curve_heldout_loglik": curve["heldout_loglik"],
               "curve_elbo": curve["elbo"], "diverged_K": sorted(curve["diverged"])}
    if truth is not None:
        metrics["true_K"] = truth.K
        metrics["true_params_heldout_loglik"] = float(truth.log_likelihood(x_test_cpu, TRUE).mean())
        if mixture.K == truth.K:
            order = torch.cdist(TRUE["locs"], est["locs"]).argmin(-1)
            metrics["max_loc_error"] = float((est["locs"][order] - TRUE["locs"]).abs().max())
            metrics["max_weight_error"] = float((est["weights"][order] - TRUE["weights"]).abs().max())
    save_figure(plots.mixture_ellipses(x_cpu, est["locs"], mixture.covariances(est), labels=labels,
                                       weights=est.get("weights"),
                                       title=f"K = {mixture.K} ({args.covariance} covariances): MAP assignments"),
                args.out, "mixture")
    save_figure(plots.model_selection(curve["K"], {"held-out log-likelihood": curve["heldout_loglik"],
                                                   "training ELBO": curve["elbo"]},
                                      chosen=mixture.K, title="Choosing the number of components"),
                args.out, "select_K")
    metrics["seconds"] = time.perf_counter() - start
    write_metrics(args.out, metrics)
    print_summary(f"Gaussian mixture on {metrics['data']} data: K chosen by held-out likelihood",
                  {k: v for k, v in metrics.items() if not k.startswith("curve_")})
    return metrics


if __name__ == "__main__":
    main()
