"""Probabilistic PCA by variational inference against Tipping & Bishop's closed form.

By default the data are simulated from ``vi_toolkit.models.ppca`` itself (D = 10, q = 2);
``--data FILE`` (.csv or .npy, one point per row) fits your own data. The model
x = W z + mu + eps is fitted twice with ``vi_toolkit.fit``: with the amortized linear
encoder q(z | x) = N(A x + c, L L^T) (the linear auto-encoder; it contains the exact
posterior, so its ELBO can reach the maximum log-likelihood L_max) and with per-point
mean-field factors q(z_i) = N(m_i, diag s_i^2) (the data then carry an index). Both
are compared with the closed-form maximum-likelihood solution: the ELBO's gap to L_max,
sigma^2, and the angle between the fitted and the principal subspaces.
"""

import time

import torch

from vi_toolkit.guides.ppca import LinearEncoder, PointwiseGuide
from vi_toolkit.models.ppca import PPCA
from vi_toolkit import fit, plots
from vi_toolkit.io import load_array
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser


def load_data(args):
    gen = torch.Generator().manual_seed(args.seed)
    if args.data is None:
        D, n = (5, 500) if args.quick else (10, args.n)
        W = 2.0 * torch.randn(D, args.q, generator=gen)
        z = torch.randn(n, args.q, generator=gen)
        return z @ W.T + 1.0 + 0.5 * torch.randn(n, D, generator=gen)
    x = torch.as_tensor(load_array(args.data, ndim=2), dtype=torch.get_default_dtype())
    if x.shape[1] <= args.q:
        raise ValueError(f"{args.data}: {x.shape[1]} column(s); PPCA with q={args.q} needs more "
                         "than q columns")
    return x


def max_angle_deg(A, B):
    """The largest principal angle between the column spaces of A and B, in degrees."""
    cos = torch.linalg.svdvals(torch.linalg.qr(A).Q.T @ torch.linalg.qr(B).Q).clamp(max=1.0)
    return float(torch.rad2deg(torch.arccos(cos.min())))


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/ppca")
    parser.add_argument("--data", help="your own data: a .csv or .npy file, one point per row")
    parser.add_argument("--q", type=int, default=2, help="latent dimension")
    parser.add_argument("--n", type=int, default=2000, help="simulated points")
    parser.add_argument("--steps", type=int, default=3000)
    args = parse_args(parser, argv)
    start = time.perf_counter()
    x = load_data(args)
    N, D = x.shape
    ppca = PPCA(D, args.q)
    ml, L_max = ppca.closed_form(x)
    steps = 1000 if args.quick else args.steps
    common = dict(lr=0.05, lr_schedule="cosine", seed=args.seed, device=args.device, progress=False)
    amortized = fit(ppca.model, LinearEncoder(ppca), x, num_steps=steps, num_particles=16, **common)
    pointwise = fit(ppca.model, PointwiseGuide(ppca, N), (x, torch.arange(N)), num_steps=steps,
                    num_particles=4, **common)
    metrics = {"data": args.data or "simulated", "N": N, "D": D, "q": args.q, "L_max": L_max,
               "sigma2_ml": float(ml["sigma"] ** 2)}
    C_ml = ml["W"] @ ml["W"].T
    for label, result in (("amortized", amortized), ("pointwise", pointwise)):
        p = {k: v.cpu() for k, v in PPCA.params(result).items()}
        C = p["W"] @ p["W"].T
        metrics.update({
            f"{label}_elbo": result.elbo,
            f"{label}_gap_to_L_max": L_max - result.elbo,
            f"{label}_loglik": float(ppca.log_likelihood(x, p).mean()),
            f"{label}_sigma2": float(p["sigma"] ** 2),
            f"{label}_WWt_rel_error": float((C - C_ml).norm() / C_ml.norm()),
            f"{label}_subspace_angle_deg": max_angle_deg(p["W"], ml["W"]),
        })
    evecs = torch.linalg.eigh(torch.cov(x.T))[1].flip(1)
    save_figure(plots.subspace_comparison(x, evecs[:, :2], PPCA.params(amortized)["W"].cpu(), x.mean(0),
                                          title="PCA axes and the columns of PPCA's W (amortized guide)"),
                args.out, "subspace")
    save_figure(plots.gap_to_bound({"amortized linear encoder": amortized.history,
                                    "per-point mean field": pointwise.history}, L_max,
                                   title="PPCA: L_max - ELBO per data point"),
                args.out, "elbo_gap")
    return finish(args.out, f"PPCA (q = {args.q}) on {metrics['data']} data: VI against the closed form", metrics, start)


if __name__ == "__main__":
    main()
