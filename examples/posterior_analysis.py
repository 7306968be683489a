"""Posterior analysis and evaluation of variational fits: ArviZ, LOO, k-hat, SBC, held-out IWAE.

1. Gaussian mixtures (``vi_toolkit.models.gmm``) with K = 1..5 components on 2-D data simulated with
   K = 3, fitted by ``vi_toolkit.guides.gmm``'s mean-field guide with the assignments summed out:
   each fit becomes an ArviZ ``InferenceData`` (posterior with the assignments drawn from
   p(z_i | x_i, theta), posterior predictive, pointwise log-likelihood log p(x_i | theta),
   observed data, sample stats; written as netCDF) and ``az.compare`` ranks them by PSIS-LOO.
   The chosen fit gets its PSIS k-hat, posterior densities, a posterior predictive check
   and its held-out ELBO and IWAE log-likelihood per point on fresh data; a MAP fit of the
   same K shows the exact held-out log p(x | theta_hat) = log sum_k w_k N(x | mu_k, Sigma_k)
   (``GaussianMixture.log_likelihood``) beside its IWAE estimate, which equals it: with the
   assignments summed out and a point mass on theta, every importance weight is exact.
2. Simulation-based calibration of the conjugate Normal model's VI fit: rank histogram.
3. A VAE on images: held-out ELBO and IWAE log-likelihood (K importance samples) on
   test images, per-image PSIS k-hat of the encoder, and the approximation and
   amortization gaps (Cremer et al. 2018) on a test subset.
"""

import os
import time
import warnings

import pyro
import torch

from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.recipes import fit_gmm
from vi_toolkit.guides.vae import GaussianEncoder
from vi_toolkit.models import conjugate
from vi_toolkit.models.gmm import GaussianMixture
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit import plots
from vi_toolkit.analysis import to_inference_data
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.diagnostics import psis_khat, simulation_based_calibration
from vi_toolkit.evaluation import evaluate, inference_gaps
from vi_toolkit.scripts import parse_args, print_summary, save_figure, script_parser, write_metrics

TRUE = {"weights": torch.tensor([0.5, 0.3, 0.2]),
        "locs": torch.tensor([[-4.0, 0.0], [3.0, 3.0], [3.0, -3.0]]),
        "scales": torch.tensor([[1.0, 0.6], [0.7, 1.2], [0.8, 0.8]])}


def mixture_section(args, out, metrics):
    import arviz as az

    n, steps, draws = (300, 150, 300) if args.quick else (1000, 800, 1000)
    truth = GaussianMixture(3, 2)
    gen = torch.Generator().manual_seed(args.seed)
    x, _ = truth.simulate(TRUE, n, generator=gen)
    x_test, _ = truth.simulate(TRUE, n, generator=gen)
    fits, guides, idatas = {}, {}, {}
    for K in range(1, 6):
        fits[K], guides[K] = fit_gmm(GaussianMixture(K, 2), x, guide="meanfield", num_steps=steps,
                             seed=args.seed, device=args.device)
        idatas[f"K={K}"] = to_inference_data(fits[K], x, num_samples=draws, seed=args.seed,
                                             path=os.path.join(out, f"gmm_k{K}.nc"))
    table = az.compare(idatas)
    best = int(table.index[0].split("=")[1])
    chosen, idata = fits[best], idatas[f"K={best}"]
    khat = psis_khat(chosen, x, num_samples=2000, seed=args.seed)
    held_out = evaluate(chosen, x_test, num_samples=1000 if args.quick else 5000, seed=args.seed)
    mixture = GaussianMixture(best, 2)
    map_fit, _ = fit_gmm(mixture, x, restarts=2, seed=args.seed, device=args.device)
    map_held_out = evaluate(map_fit, x_test, num_samples=100, exact=mixture, seed=args.seed)
    metrics["gmm"] = {
        "true_K": truth.K, "chosen_K": best,
        "loo": {name: {"rank": int(row["rank"]), "elpd_loo": float(row["elpd_loo"]),
                       "se": float(row["se"]), "elpd_diff": float(row["elpd_diff"]),
                       "dse": float(row["dse"])} for name, row in table.iterrows()},
        "khat": khat["khat"], "khat_reading": khat["reading"],
        "heldout_elbo": held_out["elbo"], "heldout_iwae": held_out["iwae"],
        "heldout_iwae_se": held_out["iwae_se"],
        "map_heldout_iwae": map_held_out["iwae"], "map_heldout_exact": map_held_out["exact"],
        "true_params_heldout": float(truth.log_likelihood(x_test, TRUE).mean())}
    save_figure(plots.posterior_densities(idata, var_names=["locs"],
                                          title=f"GMM, K = {best}: posterior of the component means"),
                out, "gmm_posterior")
    save_figure(plots.posterior_predictive(idata, title=f"GMM, K = {best}: posterior predictive check "
                                                        "(both coordinates)"),
                out, "gmm_ppc")
    save_figure(plots.elbo_curves({f"K={K}": r.history for K, r in fits.items()}), out, "gmm_elbo")
    save_figure(az.plot_compare(table, show=False).get_figure(), out, "gmm_loo_compare")
    theta = {k: v.cpu() for k, v in guides[best].point_estimate(chosen).items()}
    modal_z = torch.as_tensor(idata.posterior["z"].values[0]).mode(0).values  # most drawn component
    save_figure(plots.mixture_ellipses(x, theta["locs"], mixture.covariances(theta), labels=modal_z,
                                       weights=theta.get("weights"),
                                       title=f"K = {best}: posterior means, points by their most drawn z"),
                out, "gmm_components")


def calibration_section(args, out, metrics):
    x = 3.0 + torch.randn(20, generator=torch.Generator().manual_seed(args.seed))
    report = simulation_based_calibration(
        conjugate.model, conjugate_guide.guide, x, num_simulations=20 if args.quick else 200,
        num_draws=99, seed=args.seed,
        fit_kwargs=dict(elbo="meanfield", num_steps=150, lr=0.2, num_particles=4, device=args.device))
    metrics["sbc_conjugate"] = {"num_simulations": len(report["ranks"]["mu"]),
                                "uniformity_pvalue": float(report["uniformity_pvalue"]["mu"][0]),
                                "symmetry_pvalue": float(report["symmetry_pvalue"]["mu"][0])}
    save_figure(plots.sbc_ranks(report["ranks"], report["num_draws"],
                                title="SBC: Normal mean, mean-field Normal guide"),
                out, "sbc_conjugate")


def vae_section(args, out, metrics):
    data = images_from_args(args)
    model = DeepLatentGaussian(data.shape, args.latent_dim, likelihood="bernoulli")
    guide = GaussianEncoder(data.shape, args.latent_dim)
    result = data.fit(model, guide, elbo="meanfield", batch_size=128, lr=1e-3, seed=args.seed,
                      num_epochs=20 if args.quick else args.epochs, progress=False)
    n_test = min(data.test.shape[0], 200 if args.quick else args.test_points)
    test = data.test[:n_test]
    start = time.perf_counter()
    held_out = evaluate(result, test, num_samples=args.iwae_samples if not args.quick else 200,
                        batch_size=100, chunk_size=500, seed=args.seed)
    seconds = time.perf_counter() - start
    khat = psis_khat(result, test, num_samples=1000 if args.quick else 5000, seed=args.seed)
    n_gaps = min(n_test, 20 if args.quick else 100)
    gaps = inference_gaps(result, test[:n_gaps], refine_steps=50 if args.quick else 300,
                          num_samples=200 if args.quick else args.iwae_samples, seed=args.seed)
    idata = to_inference_data(result, test[:16], num_samples=100, seed=args.seed,
                              path=os.path.join(out, "vae_test16.nc"))
    metrics["vae"] = {
        "dataset": data.name, "test_points": n_test, "iwae_samples": held_out["num_samples"],
        "heldout_elbo": held_out["elbo"], "heldout_iwae": held_out["iwae"],
        "heldout_iwae_se": held_out["iwae_se"], "evaluation_seconds": seconds,
        "khat_mean": khat["khat"], "khat_max": khat["khat_max"],
        "khat_fraction_unreliable": khat["fraction_unreliable"],
        "gaps_points": n_gaps, "log_px": gaps["log_px"], "elbo_q_star": gaps["elbo_q_star"],
        "elbo_q": gaps["elbo_q"], "approximation_gap": gaps["approximation_gap"],
        "amortization_gap": gaps["amortization_gap"],
        "posterior_z_shape": list(idata.posterior["z"].shape)}
    save_figure(plots.khat_histogram(khat["khat_points"], title=f"VAE encoder on {n_test} test images: PSIS k-hat"),
                out, "vae_khat")
    save_figure(plots.elbo_curves(result.history), out, "vae_elbo")


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/posterior_analysis"))
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=50, help="VAE training epochs")
    parser.add_argument("--test-points", type=int, default=10000, help="test images to evaluate")
    parser.add_argument("--iwae-samples", type=int, default=5000, help="K of the IWAE estimate")
    args = parse_args(parser, argv)
    warnings.filterwarnings("ignore", message="Shape validation failed")  # one chain of iid draws
    out = args.out
    os.makedirs(out, exist_ok=True)
    pyro.set_rng_seed(args.seed)
    metrics = {}
    mixture_section(args, out, metrics)
    calibration_section(args, out, metrics)
    vae_section(args, out, metrics)
    write_metrics(out, metrics)
    g, v = metrics["gmm"], metrics["vae"]
    print_summary("Posterior analysis", {
        "GMM: K chosen by LOO (true 3)": g["chosen_K"],
        "GMM: PSIS k-hat": f"{g['khat']:.3f} ({g['khat_reading']})",
        "GMM: held-out ELBO / point": g["heldout_elbo"],
        "GMM: held-out IWAE / point": g["heldout_iwae"],
        "GMM (MAP): held-out IWAE / point": g["map_heldout_iwae"],
        "GMM (MAP): held-out exact / point": g["map_heldout_exact"],
        "GMM: true parameters, exact / point": g["true_params_heldout"],
        "SBC (conjugate): uniformity p": metrics["sbc_conjugate"]["uniformity_pvalue"],
        f"VAE: test ELBO / image ({v['test_points']})": v["heldout_elbo"],
        f"VAE: test IWAE, K={v['iwae_samples']}": v["heldout_iwae"],
        "VAE: k-hat mean / max": f"{v['khat_mean']:.3f} / {v['khat_max']:.3f}",
        "VAE: approximation gap (nats)": v["approximation_gap"],
        "VAE: amortization gap (nats)": v["amortization_gap"],
    })
    print(f"figures, netCDF files and metrics.json under {out}/")
    return metrics


if __name__ == "__main__":
    main()
