"""Denoising auto-encoders: restore corrupted images, and the blur of E[x | x~].

A denoising auto-encoder is ``vi_toolkit.models.vae.DeepLatentGaussian`` (flat prior, Bernoulli
likelihood of the *clean* x) with a point-mass guide that encodes a corrupted x~ ~ c(x~ | x),
drawn afresh at every step (``vi_toolkit.guides.vae.DeltaEncoder(..., corruption=Corruption(kind, level))``).
For each corruption (Gaussian noise, masking, salt-and-pepper) the script shows corrupted,
restored h(x~) = g(f(x~)) and clean test images.

Then the lecture's weakness of denoising AEs: under heavy masking the posterior p(x | x~)
is multi-modal, and the cross-entropy (or quadratic) loss makes h(x~) the conditional mean
E[x | x~], a blur of the candidates. The figure puts beside each restoration the training
images most consistent with the visible pixels (several modes) and their mean; the metric
``blur`` is the mean of 4 x (1 - x) over pixels (0 for black-and-white images, 1 for grey 0.5).
"""

import time

import torch

from vi_toolkit.guides.vae import Corruption, DeltaEncoder
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit import plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser

CORRUPTIONS = {"gaussian": 0.5, "mask": 0.5, "salt_pepper": 0.25}


def blur(images):
    """Mean of 4 x (1 - x): 0 for black-and-white images, 1 for uniform grey."""
    return float((4 * images * (1 - images)).mean())


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/denoising"),
                                default="fashion-mnist", binarize="static")
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--heavy-mask", type=float, default=0.8,
                        help="masking probability of the ambiguous corruption")
    args = parse_args(parser, argv)
    data = images_from_args(args)
    epochs = 60 if args.quick else args.epochs
    hidden = (256,) if args.quick else (500,)
    shape, x_test = data.shape, data.test
    gen = torch.Generator(device=x_test.device).manual_seed(args.seed)
    metrics, start, n = {"dataset": data.name}, time.perf_counter(), 8

    def denoiser(corruption):
        model = DeepLatentGaussian(shape, args.latent_dim, hidden=hidden, prior="flat")
        guide = DeltaEncoder(shape, args.latent_dim, hidden=hidden, corruption=corruption)
        data.fit(model, guide, batch_size=args.batch_size, num_epochs=epochs, seed=args.seed,
                 progress=not args.quick)
        return lambda x_tilde: model.decode(guide.encode(x_tilde))

    for kind, level in CORRUPTIONS.items():
        restore = denoiser(Corruption(kind, level))
        x_tilde = Corruption(kind, level)(x_test, generator=gen)
        restored = restore(x_tilde)
        metrics[f"{kind}_corrupted_sq_error"] = float(((x_tilde - x_test) ** 2).flatten(1).sum(1).mean())
        metrics[f"{kind}_restored_sq_error"] = float(((restored - x_test) ** 2).flatten(1).sum(1).mean())
        save_figure(plots.image_grid(torch.cat([x_tilde[:n].clamp(0, 1), restored[:n], x_test[:n]]), nrow=n,
                                     row_labels=["corrupted", "restored", "clean"],
                                     title=f"Denoising auto-encoder, {kind} corruption (level {level})"),
                    args.out, f"denoise_{kind}")

    # the ambiguous corruption: most pixels masked, so several images fit the visible ones
    level = args.heavy_mask
    restore = denoiser(Corruption("mask", level))
    keep = (torch.rand(x_test.shape, generator=gen, device=x_test.device) >= level).to(x_test.dtype)
    x_tilde = x_test * keep  # the same masking process, with the mask at hand
    restored = restore(x_tilde)
    k, cols = 3, 6
    # training images closest to each test image on its visible pixels: (cols, k, C, H, W)
    neighbours = torch.stack([
        data.train[(((data.train - x_test[i]) * keep[i]) ** 2).flatten(1).sum(1).topk(k, largest=False).indices]
        for i in range(cols)])
    rows = [x_tilde[:cols], restored[:cols], neighbours.mean(1)] + [neighbours[:, j] for j in range(k)]
    rows.append(x_test[:cols])
    save_figure(plots.image_grid(torch.cat(rows), nrow=cols,
                                 row_labels=["masked", "h(x~)", "mean of fits"] + [f"fit {j + 1}" for j in range(k)]
                                 + ["clean"],
                                 title=f"{int(100 * level)}% masked: h(x~) ~ E[x | x~] blurs the candidates"),
                args.out, "ambiguous")
    metrics["ambiguous_blur_restored"] = blur(restored)
    metrics["ambiguous_blur_clean"] = blur(x_test)
    metrics["ambiguous_blur_nearest_training"] = blur(neighbours[:, 0])
    return finish(args.out, f"Denoising auto-encoders on {data.name} ({epochs} epochs)", metrics, start)


if __name__ == "__main__":
    main()
