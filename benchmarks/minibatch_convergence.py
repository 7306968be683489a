"""Bayesian logistic regression in minibatches: fixed schedules against a fit run until converged.

The model is w ~ N(0, I_D), y_i | x_i, w ~ Bernoulli(sigmoid(x_i^T w)), i = 1..N, on
simulated data, and the guide the full-rank Gaussian q(w) = N(m, L L^T) of
``vi_toolkit.guides.regression``. Three fits with the same batch size (256), learning rate
and particles:

* ``schedule``: a fixed number of epochs (40) with a cosine learning-rate schedule, the fit
  of issue 12, which ends where its epochs run out and says nothing of its accuracy;
* ``until converged``: ``fit(..., until="converged")`` (:mod:`vi_toolkit.stationarity`):
  split R-hat for stationarity, Polyak-Ruppert averaging, the Monte Carlo standard error of
  the average and the learning rate halved at each accurate phase, within a budget of epochs;
* ``schedule, same steps``: the cosine schedule over as many steps as the converging fit
  took, to tell apart what the extra steps buy from what the averaging buys.

The reference is the exact posterior's mean and standard deviations, by self-normalised
importance sampling: draws from a Student-t (5 degrees of freedom) centred at the posterior
mode (Newton's method) with the inverse Hessian as scale, weighted by
p(w) p(y | X, w) / t(w); its effective sample size is printed. Each fit is scored by the
largest |m_j - E[w_j | y]| / sd_j and the largest |s_j / sd_j - 1| (s_j the guide's
standard deviations), as issue 12 states them.

With one particle a step the gradient of L carries the minibatch noise times the guide's
draw, and the converging fit's scale entries need about a million steps to reach the default
tolerance: it says so (``converged`` false, its reason) rather than stopping early; the
default is therefore 16 particles, which cost little more per step at D = 5.
"""

import math
import time

import pyro
import pyro.distributions as dist
import torch

from vi_toolkit import data_plate, fit, plots
from vi_toolkit.guides.regression import guide
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser


def model(X, y, num_data=None):
    """w ~ N(0, I_D);  y_i | x_i, w ~ Bernoulli(sigmoid(x_i^T w))."""
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
    with data_plate(X, num_data):
        pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1)), obs=y)


def log_joint(X, y, W):
    """log p(w) + log p(y | X, w) for each row of ``W`` (S, D)."""
    logits = X @ W.T  # (N, S)
    return (dist.Normal(0.0, 1.0).log_prob(W).sum(-1)
            + (y[:, None] * logits - torch.nn.functional.softplus(logits)).sum(0))


def exact_posterior(X, y, num_draws, gen, chunk=1000):
    """Posterior mean, standard deviations and the importance sampler's ESS (see the module)."""
    w = torch.zeros(X.shape[1], dtype=torch.float64)
    X, y = X.double(), y.double()
    for _ in range(50):  # Newton's method for the mode
        p = torch.sigmoid(X @ w)
        grad = X.T @ (y - p) - w
        hessian = -(X.T * (p * (1 - p))) @ X - torch.eye(len(w), dtype=X.dtype)
        step = torch.linalg.solve(hessian, grad)
        w = w - step
        if step.abs().max() < 1e-10:
            break
    proposal = dist.MultivariateStudentT(5.0, w, torch.linalg.cholesky(torch.linalg.inv(-hessian)))
    draws = torch.cat([proposal.sample((chunk,)) for _ in range(math.ceil(num_draws / chunk))])
    log_w = torch.cat([log_joint(X, y, d) for d in draws.split(chunk)]) - proposal.log_prob(draws)
    weights = torch.softmax(log_w, 0)
    mean = weights @ draws
    sd = (weights @ (draws - mean) ** 2).sqrt()
    return mean, sd, float(1.0 / (weights**2).sum())


def errors(result, mean, sd):
    """Largest location error in posterior sds and largest relative error of the sds."""
    params = result.params
    scale_tril = params["w_scale_tril"].double()
    s = (scale_tril @ scale_tril.T).diag().sqrt()
    return (float(((params["w_loc"].double() - mean) / sd).abs().max()),
            float((s / sd - 1).abs().max()))


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/minibatch_convergence")
    parser.add_argument("--n", type=int, default=20_000, help="data points")
    parser.add_argument("--d", type=int, default=5, help="features")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of all fits")
    parser.add_argument("--particles", type=int, default=16, help="Monte Carlo draws a step, all fits")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the scheduled fit")
    parser.add_argument("--budget", type=int, default=2000, help="epochs the converging fit may use")
    parser.add_argument("--draws", type=int, default=20_000, help="importance draws of the reference")
    args = parse_args(parser, argv)
    start = time.perf_counter()
    n, epochs, budget, draws = (2000, 5, 20, 2000) if args.quick else (args.n, args.epochs, args.budget, args.draws)
    gen = torch.Generator().manual_seed(args.seed)
    X = torch.randn(n, args.d, generator=gen)
    y = torch.bernoulli(torch.sigmoid(X @ torch.randn(args.d, generator=gen)), generator=gen)
    torch.manual_seed(args.seed)
    mean, sd, ess = exact_posterior(X, y, draws, gen)
    common = dict(batch_size=256, lr=args.lr, num_particles=args.particles, seed=args.seed,
                  device=args.device, progress=False)
    fits, seconds = {}, {}

    def run(label, **settings):
        began = time.perf_counter()
        fits[label] = fit(model, guide, (X, y), **settings, **common)
        seconds[label] = time.perf_counter() - began

    run("schedule", num_epochs=epochs, lr_schedule="cosine")
    run("until converged", num_epochs=budget, until="converged")
    run("schedule, same steps", num_steps=len(fits["until converged"].history["loss"]), lr_schedule="cosine")
    metrics = {"N": n, "D": args.d, "lr": args.lr, "particles": args.particles, "budget_epochs": budget,
               "reference_ess": ess}
    keys = {label: label.replace(",", "").replace(" ", "_") for label in fits}
    for label, key in keys.items():
        result = fits[label]
        metrics[f"{key}_mean_error_sds"], metrics[f"{key}_sd_error"] = errors(result, mean, sd)
        metrics[f"{key}_epochs"] = len(result.history["loss"]) / math.ceil(n / 256)
        metrics[f"{key}_seconds"] = seconds[label]
        metrics[f"{key}_stopped"] = result.stopped
    diagnostics = fits["until converged"].diagnostics
    metrics.update({"converged": diagnostics["converged"], "reason": diagnostics["reason"],
                    "final_lr": diagnostics["lr"], "mcse": diagnostics["mcse"],
                    "change": diagnostics["change"], "accurate_rates": len(diagnostics["levels"])})
    save_figure(plots.elbo_curves({label: r.history for label, r in fits.items()}, x="step",
                                  title="Logistic regression, batch 256: ELBO per data point"),
                args.out, "elbo")
    save_figure(plots.bar_chart({f"{label}: mean": metrics[f"{key}_mean_error_sds"] for label, key in keys.items()}
                                | {f"{label}: sd": metrics[f"{key}_sd_error"] for label, key in keys.items()},
                                ylabel="largest error (posterior sds / relative)",
                                title="Distance to the exact posterior"), args.out, "errors")
    return finish(args.out, f"Bayesian logistic regression, N = {n}, D = {args.d}: schedules vs until converged",
                  metrics, start)


if __name__ == "__main__":
    main()
