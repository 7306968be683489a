"""A random walk in a VAE's latent space, rendered as an animated GIF.

A VAE (``vi_toolkit.models.vae.DeepLatentGaussian`` + ``vi_toolkit.guides.vae.GaussianEncoder``) is fitted, then
the codes follow the autoregressive walk

    z_{t+1} = sqrt(1 - a^2) z_t + a eps_t,   eps_t ~ N(0, I),   z_0 ~ N(0, I),

whose stationary distribution is the prior p(z) = N(0, I), so the walk wanders through the
region the decoder was trained on; the frames are the decoded means of p(x | z_t). Small
``--step`` a gives smooth morphing. Writes ``latent_walk.gif`` and a strip of frames
``latent_walk.png``.
"""

import math
import os
import time

import torch

from vi_toolkit.guides.vae import GaussianEncoder
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit import plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.scripts import finish, parse_args, save_figure, save_gif, script_parser


def latent_walk(num_frames, latent_dim, step, generator=None):
    """The stationary N(0, I) autoregressive walk: (num_frames, latent_dim) codes."""
    z = torch.randn(latent_dim, generator=generator)
    frames = [z]
    for _ in range(num_frames - 1):
        z = math.sqrt(1 - step ** 2) * z + step * torch.randn(latent_dim, generator=generator)
        frames.append(z)
    return torch.stack(frames)


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/latent_walk"),
                                default="fashion-mnist", binarize="dynamic")
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--step", type=float, default=0.15, help="a in (0, 1): the walk's step")
    args = parse_args(parser, argv)
    if not 0 < args.step < 1:
        parser.error(f"--step must lie in (0, 1), got {args.step}")
    data = images_from_args(args)
    epochs = 40 if args.quick else args.epochs
    hidden = (128,) if args.quick else (500,)
    frames = 40 if args.quick else args.frames
    start = time.perf_counter()
    model = DeepLatentGaussian(data.shape, args.latent_dim, hidden=hidden)
    guide = GaussianEncoder(data.shape, args.latent_dim, hidden=hidden)
    result = data.fit(model, guide, elbo="meanfield", batch_size=args.batch_size, num_epochs=epochs,
                      seed=args.seed, progress=not args.quick)
    z = latent_walk(frames, args.latent_dim, args.step, torch.Generator().manual_seed(args.seed))
    images = model.decode(z.to(data.train.device))
    gif = save_gif(images, args.out, "latent_walk")
    save_figure(plots.image_grid(images[:: max(1, frames // 20)][:20], nrow=10,
                                 title=f"Random walk in latent space (every {max(1, frames // 20)}th frame)"),
                args.out, "latent_walk")
    metrics = {"dataset": data.name, "frames": frames, "gif": os.path.basename(gif),
               "mean_code_step": float((z[1:] - z[:-1]).norm(dim=1).mean()),
               "mean_frame_change": float((images[1:] - images[:-1]).abs().mean()),
               "vae_val_elbo": result.val_elbo}
    return finish(args.out, f"Latent random walk on {data.name} (latent {args.latent_dim})", metrics, start)


if __name__ == "__main__":
    main()
