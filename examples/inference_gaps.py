"""Approximation and amortization gaps of a VAE (Cremer, Li and Duvenaud 2018).

A VAE's ELBO falls short of log p(x) by the inference gap, which splits into

    log p(x) - L[q]  =  (log p(x) - L[q*])  +  (L[q*] - L[q])
                        approximation gap      amortization gap

q is the encoder's Gaussian q(z | x); q* is the best Gaussian of the same family for each
test point alone, found by Adam on its own (mu, log sigma) started at the encoder's output.
log p(x) is the IWAE estimate with K importance samples from q*. The script trains a VAE,
then reports both gaps averaged over a subset of test images.
"""

from vi_toolkit.guides.vae import GaussianEncoder
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit import plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.evaluation import inference_gaps
from vi_toolkit.scripts import parse_args, print_summary, save_figure, script_parser, write_metrics


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/inference_gaps"),
                                default="fashion-mnist")
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=50, help="VAE training epochs")
    parser.add_argument("--points", type=int, default=1000, help="test images to analyse")
    parser.add_argument("--refine-steps", type=int, default=300, help="Adam steps per q*")
    parser.add_argument("--iwae-samples", type=int, default=5000, help="K for log p(x)")
    args = parse_args(parser, argv)
    if args.quick:
        args.epochs, args.points, args.refine_steps, args.iwae_samples = 20, 50, 100, 500
    data = images_from_args(args)
    model = DeepLatentGaussian(data.shape, args.latent_dim, likelihood="bernoulli")
    guide = GaussianEncoder(data.shape, args.latent_dim)
    result = data.fit(model, guide, elbo="meanfield", batch_size=128, lr=1e-3, seed=args.seed,
                      num_epochs=args.epochs, progress=not args.quick)
    test = data.test[:args.points]
    report = inference_gaps(result, test, refine_steps=args.refine_steps,
                            num_samples=args.iwae_samples, seed=args.seed)
    metrics = {"dataset": data.name, "latent_dim": args.latent_dim, "epochs": args.epochs,
               "test_points": int(test.shape[0]), "refine_steps": args.refine_steps,
               "iwae_samples": args.iwae_samples,
               **{k: report[k] for k in ("log_px", "elbo_q_star", "elbo_q", "approximation_gap",
                                         "amortization_gap", "inference_gap")}}
    write_metrics(args.out, metrics)
    save_figure(plots.inference_gaps(report["points"],
                                     title=f"VAE on {data.name}: inference gaps of {test.shape[0]} test images"),
                args.out, "gaps")
    print_summary(f"Inference gaps, VAE on {data.name} ({test.shape[0]} test images, nats/image)", {
        f"log p(x) (IWAE, K={args.iwae_samples}, from q*)": report["log_px"],
        "L[q*] (refined per point)": report["elbo_q_star"],
        "L[q] (encoder)": report["elbo_q"],
        "approximation gap log p(x) - L[q*]": report["approximation_gap"],
        "amortization gap L[q*] - L[q]": report["amortization_gap"],
    })
    return metrics


if __name__ == "__main__":
    main()
