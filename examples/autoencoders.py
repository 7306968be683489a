"""Auto-encoders as one model family fitted by ``fit``: linear AE vs PCA, deep AEs, interpolation.

Every auto-encoder here is ``models.vae.DeepLatentGaussian`` with a point-mass guide
q(z | x) = delta(z - f(x)) (``guides.vae.DeltaEncoder``) and a flat prior, so the ELBO is
exactly minus the reconstruction loss; the VAE is the same model with a N(0, I) prior and
a Gaussian guide.

1. Linear auto-encoder (f(x) = U^T x + b, g(z) = W z + c, squared error; full-batch L-BFGS on
   ``--linear-points`` training images) against PCA by SVD of the same images:
   test reconstruction error and the largest principal angle between the decoder's column
   space and the top principal subspace (PCA is the optimum, so both should match).
2. MLP and convolutional auto-encoders: reconstructions of test images.
3. Interpolation g((1 - t) f(x) + t f(x')) between random test pairs, auto-encoder and VAE
   side by side.
"""

import math
import os
import time

import torch

from guides.vae import DeltaEncoder, GaussianEncoder
from models.vae import DeepLatentGaussian
from vi_toolkit import fit, plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.scripts import finish, parse_args, script_parser


def pca(x, dim):
    """Mean and top-``dim`` principal directions (D, dim) of the rows of ``x``, by SVD."""
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, vh[:dim].T


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

    # 1. linear auto-encoder vs PCA: Gaussian likelihood of fixed variance = squared error
    lin_model = DeepLatentGaussian(shape, args.linear_dim, likelihood="gaussian_fixed", hidden=(),
                                   prior="flat")
    lin_guide = DeltaEncoder(shape, args.linear_dim, hidden=())
    # the loss is deterministic (point-mass guide): full-batch L-BFGS reaches the optimum; both
    # the auto-encoder and PCA see the first --linear-points training images
    subset = data.train[:args.linear_points]
    fit(lin_model, lin_guide, subset, optimizer="lbfgs", lr=1.0, num_steps=30 if args.quick else 150,
        seed=args.seed, progress=False, device=subset.device)
    flat_train, flat_test = subset.flatten(1), x_test.flatten(1)
    mean, directions = pca(flat_train, args.linear_dim)
    pca_rec = mean + (flat_test - mean) @ directions @ directions.T
    lin_rec = reconstruct(lin_model, lin_guide, x_test).flatten(1)
    decoder_weight = lin_model.decoder.body[0].weight.detach()  # (D, d): g(z) = W z + c
    metrics["linear_ae_test_sq_error"] = float(((flat_test - lin_rec) ** 2).sum(1).mean())
    metrics["pca_test_sq_error"] = float(((flat_test - pca_rec) ** 2).sum(1).mean())
    metrics["linear_ae_vs_pca_max_angle_deg"] = max_principal_angle(decoder_weight, directions)
    n = 8
    plots.image_grid(torch.cat([x_test[:n], lin_rec[:n].reshape(n, *shape), pca_rec[:n].reshape(n, *shape)]),
                     os.path.join(args.out, "linear_ae_vs_pca.png"), nrow=n,
                     row_labels=["test", "linear AE", "PCA"],
                     title=f"Linear auto-encoder vs PCA, d = {args.linear_dim}")

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
    plots.image_grid(torch.cat([x_test[:n], recs["mlp"][:n], recs["conv"][:n]]),
                     os.path.join(args.out, "reconstructions.png"), nrow=n,
                     row_labels=["test", "MLP AE", "conv AE"], title="Reconstructions of test images")

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
    plots.image_grid(torch.cat(rows), os.path.join(args.out, "interpolation.png"), nrow=steps,
                     row_labels=labels, title="Latent interpolation: auto-encoder vs VAE")
    plots.elbo_curves(fits, os.path.join(args.out, "elbo.png"), x="epoch",
                      title="Training (solid) and validation (dashed) ELBO")
    return finish(args.out, f"Auto-encoders on {data.name} (latent {args.latent_dim}, {epochs} epochs)", metrics, start)


if __name__ == "__main__":
    main()
