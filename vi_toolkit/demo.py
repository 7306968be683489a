"""The demo: fit models with exact answers, then run the example scripts in quick mode.

Each section fits a model with :func:`vi_toolkit.fit` and prints the fitted
posterior beside the closed form; the example scripts (``examples/``, present in
a checkout of the repository) then run with ``--quick`` and write their figures
and ``metrics.json`` under the output folder.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .engine import fit

# example scripts the demo runs with --quick, in this order (added by each model family)
DEMO_EXAMPLES = ["posterior_analysis", "autoencoders", "denoising", "latent_sampling", "vae_kl",
                 "kingma_welling", "latent_walk", "gmm", "hmm", "ppca", "discriminant", "bayesnet",
                 "topics", "ssvae"]


def conjugate_section(seed, device, quick):
    from vi_toolkit.guides import conjugate as conjugate_guide
    from vi_toolkit.models import conjugate

    gen = torch.Generator().manual_seed(seed)
    x = 3.0 + torch.randn(200, generator=gen)
    mean, sd = conjugate.posterior(x)
    rows = []
    for label, batch in (("full batch", None), ("minibatch 20", 20)):
        steps = {"num_steps": 2000} if batch is None else {"num_epochs": 200}
        result = fit(conjugate.model, conjugate_guide.guide, x, elbo="meanfield", lr=0.2,
                     lr_schedule="exponential", num_particles=8, batch_size=batch, seed=seed,
                     device=device, progress=False, **steps)
        p = result.params
        rows.append((f"mu mean ({label})", float(p["mu_loc"]), float(mean)))
        rows.append((f"mu sd   ({label})", float(p["mu_scale"]), float(sd)))
    return "Normal mean, Normal prior, known noise (N=200)", rows


def regression_section(seed, device, quick):
    from vi_toolkit.guides import regression as regression_guide
    from vi_toolkit.models import regression

    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(100, 3, generator=gen)
    X[:, 1] = 0.8 * X[:, 0] + 0.6 * X[:, 1]  # correlated inputs: a correlated posterior
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + torch.randn(100, generator=gen)
    mean, cov = regression.posterior(X, y)
    result = fit(regression.model, regression_guide.guide, (X, y), elbo="meanfield", lr=0.05,
                 lr_schedule="exponential", num_particles=8, num_steps=3000,
                 seed=seed, device=device, progress=False)
    L = result.params["w_scale_tril"].cpu()
    fitted_cov = L @ L.T
    rows = [(f"w[{i}] mean", float(result.params["w_loc"][i]), float(mean[i])) for i in range(3)]
    rows += [(f"w[{i}] sd", float(fitted_cov[i, i].sqrt()), float(cov[i, i].sqrt()))
             for i in range(3)]
    rows += [("corr(w0, w1)", float(fitted_cov[0, 1] / (fitted_cov[0, 0] * fitted_cov[1, 1]).sqrt()),
              float(cov[0, 1] / (cov[0, 0] * cov[1, 1]).sqrt()))]
    return "Bayesian linear regression, full-rank Gaussian guide (N=100, D=3, correlated inputs)", rows


SECTIONS = [conjugate_section, regression_section]


def print_table(title, rows, file=sys.stdout):
    print(f"\n{title}", file=file)
    print(f"  {'quantity':<26}{'fitted (SVI)':>14}{'closed form':>14}{'rel. error':>12}", file=file)
    for name, fitted, exact in rows:
        rel = abs(fitted - exact) / max(abs(exact), 1e-12)
        print(f"  {name:<26}{fitted:>14.4f}{exact:>14.4f}{rel:>11.2%}", file=file)


def run_demo(out, seed=0, device="auto", quick=True):
    """Print the exact-posterior sections, then run each demo example; return metrics."""
    os.makedirs(out, exist_ok=True)
    metrics = {}
    for section in SECTIONS:
        title, rows = section(seed, device, quick)
        print_table(title, rows)
        metrics[section.__name__] = {name: {"fitted": f, "exact": e} for name, f, e in rows}
    examples = Path(__file__).resolve().parents[1] / "examples"
    for name in DEMO_EXAMPLES:
        script = examples / f"{name}.py"
        if not script.exists():
            print(f"\n(skipping examples/{name}.py: run the demo from a checkout of the repository)")
            continue
        print(f"\n== examples/{name}.py --quick ==", flush=True)
        cmd = [sys.executable, str(script), "--quick", "--out", os.path.join(out, name),
               "--seed", str(seed), "--device", str(device)]
        subprocess.run(cmd, check=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"\nfigures and metrics under {out}/")
    return metrics
