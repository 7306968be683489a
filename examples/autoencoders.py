"""Auto-encoders as one model family fitted by ``fit``: linear AE vs PCA, deep AEs, interpolation.

Every auto-encoder here is ``vi_toolkit.models.vae.DeepLatentGaussian`` with a point-mass guide
q(z | x) = delta(z - f(x)) (``vi_toolkit.guides.vae.DeltaEncoder``) and a flat prior, so the ELBO is
exactly minus the reconstruction loss; the VAE is the same model with a N(0, I) prior and
a Gaussian guide.

1. Linear auto-encoder f(x) = U^T x + b, g(z) = W z + c with squared error
   sum_i ||x_i - g(f(x_i))||^2, fitted by full-batch L-BFGS on ``--linear-points`` training
   images, against PCA of the same images. Its optimum is PCA: g(f(x)) is the orthogonal
   projection of x onto the top-d principal subspace around the mean (the column space of W
   is that subspace; W itself is any basis of it). PCA here is ``vi_toolkit.models.ppca.PPCA(D, d)``'s
   closed-form maximum-likelihood solution (Tipping & Bishop): mu = mean(x) and
   W_ppca = U_d (L_d - sigma^2 I)^(1/2) with U_d, L_d the top-d eigenvectors and eigenvalues
   of the sample covariance, so span(W_ppca) is the principal subspace and PCA's
   reconstruction is x^ = mu + Q Q^T (x - mu) with Q = U_d (the sigma -> 0 limit of PPCA's
   posterior-mean reconstruction). Compared: the test squared error of both, and the largest
   principal angle between span(W) and span(W_ppca); PPCA's L_max per training image and its
   exact test log-likelihood per image are reported too. PPCA needs d < rank of the centred
   images (pixels constant over the training images, such as the digits' borders, add zero
   eigenvalues: sigma^2, the mean of the D - d smallest, reaches 0 when d >= the rank).
2. MLP and convolutional auto-encoders: reconstructions of test images.
3. Interpolation g((1 - t) f(x) + t f(x')) between random test pairs, auto-encoder and VAE
   side by side.
"""

import math
import time

import torch

from vi_toolkit.guides.vae import DeltaEncoder, GaussianEncoder
from vi_toolkit.models.ppca import PPCA
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit import fit, plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser


def ppca_pca(x, dim):
    """PCA of the rows of ``x`` (N, D) through PPCA's maximum-likelihood solution.

    Returns the PPCA ``params`` (``W``, ``mu``, ``sigma``), L_max per point, and Q (D, dim),
    the orthonormal top-``dim`` principal directions: closed_form's W = U_d (L_d - sigma^2 I)^(1/2)
    has orthogonal columns of norms (l_j - sigma^2)^(1/2), so Q = W / its column norms (the
    norms are positive unless l_d equals every smaller eigenvalue, where the subspace is not
    identified). ``closed_form`` raises a ValueError when ``dim`` is not below the rank of the
    centred ``x`` (then sigma^2 = 0 and the maximum-likelihood solution degenerates).
    """
    params, L_max = PPCA(x.shape[-1], dim).closed_form(x)
    norms = params["W"].norm(dim=0)
    return params, L_max, params["W"] / norms


def max_principal_angle(a, b):
    """Largest principal angle (degrees) between the column spaces of ``a`` and ``b``."""
    qa, qb = torch.linalg.qr(a)[0], torch.linalg.qr(b)[0]
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return math.degrees(float(torch.arccos(cosines.min())))


def reconstruct(model, guide, x):
    return model.decode(guide.encode(x))


def interpolate(model, guide, a, b, steps):
    """Decoded codes along the segment from f(a) to f(b), for each pair: (pairs * steps, ...)."""
    t = torch.linspace(0, 1, steps, device=a.device)[None, :, None]
    za, zb = guide.encode(a)[:, None], guide.encode(b)[:, None]
    z = (1 - t) * za + t * zb
    return model.decode(z.reshape(-1, z.shape[-1]))


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/autoencoders"),
                                default="fashion-mnist", binarize="none")
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--linear-dim", type=int, default=8, help="latent size of the linear AE and PCA")
    parser.add_argument("--linear-points", type=int, default=5000, help="training images of the linear AE and PCA")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parse_args(parser, argv)
    data = images_from_args(args)
    epochs = 40 if args.quick else args.epochs
    hidden = (128,) if args.quick else (400,)
    common = dict(batch_size=args.batch_size, num_epochs=epochs, seed=args.seed, progress=not args.quick)
    shape, x_test = data.shape, data.test
    metrics, start = {"dataset": data.name}, time.perf_counter()

    # 1. linear auto-encoder vs PCA (PPCA's closed form), both on the first --linear-points
    # training images; PCA on the CPU (vi_toolkit.models.ppca builds its identity matrices there)
    subset = data.train[:args.linear_points]
    flat_train, flat_test = subset.flatten(1).cpu(), x_test.flatten(1).cpu()
    ppca, L_max, directions = ppca_pca(flat_train, args.linear_dim)
    pca_rec = ppca["mu"] + (flat_test - ppca["mu"]) @ directions @ directions.T
    # Gaussian likelihood of fixed variance = squared error; the loss is deterministic
    # (point-mass guide), so full-batch L-BFGS reaches the optimum
    lin_model = DeepLatentGaussian(shape, args.linear_dim, likelihood="gaussian_fixed", hidden=(),
                                   prior="flat")
    lin_guide = DeltaEncoder(shape, args.linear_dim, hidden=())
    fit(lin_model, lin_guide, subset, optimizer="lbfgs", lr=1.0, num_steps=30 if args.quick else 150,
        seed=args.seed, progress=False, device=subset.device)
    lin_rec = reconstruct(lin_model, lin_guide, x_test).flatten(1).cpu()
    decoder_weight = lin_model.decoder.body[0].weight.detach().cpu()  # (D, d): g(z) = W z + c
    metrics["linear_ae_test_sq_error"] = float(((flat_test - lin_rec) ** 2).sum(1).mean())
    metrics["pca_test_sq_error"] = float(((flat_test - pca_rec) ** 2).sum(1).mean())
    metrics["linear_ae_vs_pca_max_angle_deg"] = max_principal_angle(decoder_weight, directions)
    metrics["ppca_train_loglik_per_point"] = L_max
    metrics["ppca_test_loglik_per_point"] = float(PPCA(*directions.shape).log_likelihood(flat_test, ppca).mean())
    n = 8
    save_figure(plots.image_grid(torch.cat([flat_test[:n], lin_rec[:n], pca_rec[:n]]).reshape(3 * n, *shape),
                                 nrow=n, row_labels=["test", "linear AE", "PCA"],
                                 title=f"Linear auto-encoder vs PCA, d = {args.linear_dim}"),
                args.out, "linear_ae_vs_pca")

    # 2. deep auto-encoders (cross-entropy reconstruction loss)
    recs, fits = {}, {}
    for arch in ("mlp", "conv"):
        model = DeepLatentGaussian(shape, args.latent_dim, arch=arch, hidden=hidden, prior="flat")
        guide = DeltaEncoder(shape, args.latent_dim, arch=arch, hidden=hidden)
        result = data.fit(model, guide, **common)
        recs[arch], fits[f"{arch} AE"] = reconstruct(model, guide, x_test), result.history
        metrics[f"{arch}_ae_test_sq_error"] = float(((x_test - recs[arch]) ** 2).flatten(1).sum(1).mean())
        metrics[f"{arch}_ae_val_elbo"] = result.val_elbo  # = -cross-entropy per validation image
        if arch == "mlp":
            ae = (model, guide)
    save_figure(plots.image_grid(torch.cat([x_test[:n], recs["mlp"][:n], recs["conv"][:n]]), nrow=n,
                                 row_labels=["test", "MLP AE", "conv AE"], title="Reconstructions of test images"),
                args.out, "reconstructions")

    # 3. interpolation, auto-encoder and VAE side by side
    vae = (DeepLatentGaussian(shape, args.latent_dim, hidden=hidden),
           GaussianEncoder(shape, args.latent_dim, hidden=hidden))
    fits["MLP VAE"] = data.fit(*vae, elbo="meanfield", **common).history
    gen = torch.Generator().manual_seed(args.seed)
    pairs, steps = 3, 10
    idx = torch.randperm(x_test.shape[0], generator=gen)[:2 * pairs].to(x_test.device)
    a, b = x_test[idx[:pairs]], x_test[idx[pairs:]]
    rows, labels = [], []
    for p in range(pairs):
        for label, (model, guide) in (("AE", ae), ("VAE", vae)):
            rows.append(interpolate(model, guide, a[p:p + 1], b[p:p + 1], steps))
            labels.append(f"{label} {p + 1}")
    save_figure(plots.image_grid(torch.cat(rows), nrow=steps, row_labels=labels,
                                 title="Latent interpolation: auto-encoder vs VAE"),
                args.out, "interpolation")
    save_figure(plots.elbo_curves(fits, x="epoch", title="Training (solid) and validation (dashed) ELBO"),
                args.out, "elbo")
    return finish(args.out, f"Auto-encoders on {data.name} (latent {args.latent_dim}, {epochs} epochs)", metrics, start)


if __name__ == "__main__":
    main()
