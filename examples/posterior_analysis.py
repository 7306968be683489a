"""Posterior analysis and evaluation of variational fits: ArviZ, LOO, k-hat, SBC, held-out IWAE.

1. Gaussian mixtures with K = 1..5 components, fitted by VI with the assignments summed
   out, on data simulated with K = 3: each fit becomes an ArviZ ``InferenceData``
   (posterior, posterior predictive, pointwise log-likelihood, observed data, sample
   stats; written as netCDF), ``az.compare`` ranks them by PSIS-LOO, and the chosen fit
   gets its PSIS k-hat, its held-out ELBO and IWAE log-likelihood per point on fresh
   data, posterior densities and a posterior predictive check.
2. Simulation-based calibration of the conjugate Normal model's VI fit: rank histogram.
3. A VAE on images: held-out ELBO and IWAE log-likelihood (K importance samples) on
   test images, per-image PSIS k-hat of the encoder, and the approximation and
   amortization gaps (Cremer et al. 2018) on a test subset.
"""

import os
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex
from torch.distributions import constraints

from guides import conjugate as conjugate_guide
from guides.vae import GaussianEncoder
from models import conjugate
from models.vae import DeepLatentGaussian
from vi_toolkit import data_plate, fit, plots
from vi_toolkit.analysis import to_inference_data
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.diagnostics import psis_khat, simulation_based_calibration
from vi_toolkit.evaluation import evaluate, inference_gaps
from vi_toolkit.scripts import print_summary, script_parser, write_metrics

TRUE_LOCS = (-4.0, 0.0, 4.0)


def bayesian_gmm(K):
    """A Bayesian mixture of K unit-variance Normals and its mean-field guide.

    weights ~ Dir(1) (fixed at 1 for K = 1), locs_k ~ N(0, 5^2), z_i ~ Cat(weights)
    (summed out by enumeration), x_i | z_i ~ N(locs_{z_i}, 1); the guide is
    q(weights) q(locs) = Dir(alpha) prod_k N(m_k, s_k^2), the means started at the
    data's K quantiles.
    """

    def model(x, num_data=None):
        weights = pyro.sample("weights", dist.Dirichlet(x.new_ones(K))) if K > 1 else x.new_ones(1)
        with pyro.plate("components", K):
            locs = pyro.sample("locs", dist.Normal(x.new_zeros(()), 5.0))
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(Vindex(locs.unsqueeze(-2))[..., z], 1.0), obs=x)

    def guide(x, num_data=None):
        if K > 1:
            concentration = pyro.param("concentration", x.new_full((K,), x.shape[0] / K),
                                       constraint=constraints.positive)
            pyro.sample("weights", dist.Dirichlet(concentration))
        quantiles = torch.quantile(x, (torch.arange(K, dtype=x.dtype, device=x.device) + 0.5) / K)
        loc = pyro.param("loc", quantiles)
        scale = pyro.param("scale", x.new_full((K,), 0.1), constraint=constraints.positive)
        with pyro.plate("components", K):
            pyro.sample("locs", dist.Normal(loc, scale))

    return model, guide


def simulate_mixture(n, seed):
    gen = torch.Generator().manual_seed(seed)
    locs = torch.tensor(TRUE_LOCS)
    return locs[torch.randint(len(TRUE_LOCS), (n,), generator=gen)] + torch.randn(n, generator=gen)


def mixture_section(args, out, metrics):
    import arviz as az

    n, steps = (150, 200) if args.quick else (500, 1500)
    x, x_test = simulate_mixture(n, args.seed), simulate_mixture(n, args.seed + 1)
    fits, idatas = {}, {}
    for K in range(1, 6):
        model, guide = bayesian_gmm(K)
        fits[K] = fit(model, guide, x, num_steps=steps, lr=0.05, num_particles=4, seed=args.seed,
                      device=args.device, progress=False)
        idatas[f"K={K}"] = to_inference_data(fits[K], x, num_samples=300 if args.quick else 1000,
                                             seed=args.seed, path=os.path.join(out, f"gmm_k{K}.nc"))
    table = az.compare(idatas)
    best = int(table.index[0].split("=")[1])
    metrics["gmm"] = {"true_K": len(TRUE_LOCS), "chosen_K": best,
                      "loo": {name: {"rank": int(row["rank"]), "elpd_loo": float(row["elpd_loo"]),
                                     "se": float(row["se"]), "elpd_diff": float(row["elpd_diff"]),
                                     "dse": float(row["dse"])} for name, row in table.iterrows()}}
    chosen, idata = fits[best], idatas[f"K={best}"]
    khat = psis_khat(chosen, x, num_samples=2000, seed=args.seed)
    held_out = evaluate(chosen, x_test, num_samples=1000 if args.quick else 5000, seed=args.seed)
    metrics["gmm"].update(khat=khat["khat"], khat_reading=khat["reading"],
                          heldout_elbo=held_out["elbo"], heldout_iwae=held_out["iwae"],
                          heldout_iwae_se=held_out["iwae_se"])
    plots.posterior_densities(idata, os.path.join(out, "gmm_posterior.png"), var_names=["locs"],
                              title=f"GMM, K = {best}: posterior of the component means")
    plots.posterior_predictive(idata, os.path.join(out, "gmm_ppc.png"),
                               title=f"GMM, K = {best}: posterior predictive check")
    plots.elbo_curves({f"K={K}": r.history for K, r in fits.items()}, os.path.join(out, "gmm_elbo.png"))
    ax = az.plot_compare(table, show=False)
    plots.save(ax.get_figure(), os.path.join(out, "gmm_loo_compare.png"))


def calibration_section(args, out, metrics):
    x = 3.0 + torch.randn(20, generator=torch.Generator().manual_seed(args.seed))
    report = simulation_based_calibration(
        conjugate.model, conjugate_guide.guide, x, num_simulations=20 if args.quick else 200,
        num_draws=99, seed=args.seed,
        fit_kwargs=dict(elbo="meanfield", num_steps=150, lr=0.2, num_particles=4, device=args.device))
    metrics["sbc_conjugate"] = {"num_simulations": len(report["ranks"]["mu"]),
                                "uniformity_pvalue": float(report["uniformity_pvalue"]["mu"][0]),
                                "symmetry_pvalue": float(report["symmetry_pvalue"]["mu"][0])}
    plots.sbc_ranks(report["ranks"], report["num_draws"], os.path.join(out, "sbc_conjugate.png"),
                    title="SBC: Normal mean, mean-field Normal guide")


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
    plots.khat_histogram(khat["khat_points"], os.path.join(out, "vae_khat.png"),
                         title=f"VAE encoder on {n_test} test images: PSIS k-hat")
    plots.elbo_curves(result.history, os.path.join(out, "vae_elbo.png"))


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/posterior_analysis"))
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=50, help="VAE training epochs")
    parser.add_argument("--test-points", type=int, default=10000, help="test images to evaluate")
    parser.add_argument("--iwae-samples", type=int, default=5000, help="K of the IWAE estimate")
    args = parser.parse_args(argv)
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
