"""``fit`` against an idiomatic Pyro training loop for the same MLP VAE.

Both train the Bernoulli-MLP VAE of ``vi_toolkit.models.vae`` / ``vi_toolkit.guides.vae`` (784-H-Z, one hidden
layer, softplus as in Pyro's VAE tutorial) from the same initial weights, with Adam at the
same learning rate, the same batch size and number of epochs, on binarized images:

* the toolkit: ``vi_toolkit.fit(..., elbo=ELBO, batch_size=B, num_epochs=E)``, ELBO set by
  ``--fit-elbo``: ``trace`` (the default: the same single-sample estimator as the loop, so
  both do equal work), or ``meanfield``, the toolkit's recommendation for a VAE, whose
  estimate E_q[log p(x | z)] - KL(q(z | x) || p(z)) takes the Gaussian KL in closed form
  (the same ELBO, its gradient usually of lower variance);
* Pyro's VAE tutorial loop: ``SVI(model, guide, pyro.optim.Adam, Trace_ELBO())`` and
  ``for x, in DataLoader(TensorDataset(train), batch_size=B, shuffle=True): svi.step(x)``
  (validation off: the baseline's fastest setting), whatever ``--fit-elbo``.

With dynamic binarization both resample x ~ Bernoulli(x) for every training batch. The
test ELBO per image of each is computed by the same function (``--eval-particles``
vectorized samples of the Monte Carlo estimate, the same seed), so the two are scored alike
however they were trained. Reports test ELBOs and seconds per epoch.
"""

import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.utils.data import DataLoader, TensorDataset

from vi_toolkit.guides.vae import GaussianEncoder
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit import plots
from vi_toolkit.datasets import add_data_arguments, images_from_args
from vi_toolkit.elbo import TraceELBO
from vi_toolkit.scripts import print_summary, save_figure, script_parser, write_metrics


@torch.no_grad()
def test_elbo(model, guide, x, *, num_particles, batch_size=1000, seed=0):
    """ELBO per point of ``x``: the mean over points of a ``num_particles``-sample estimate."""
    pyro.set_rng_seed(seed)
    elbo = TraceELBO(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)
    total = 0.0
    with pyro.get_param_store().scope(), pyro.validation_enabled(False):
        for start in range(0, x.shape[0], batch_size):
            total += float(elbo.differentiable_loss(model, guide, x[start:start + batch_size]))
    return -total / x.shape[0]


def pyro_loop(model, guide, train, *, epochs, batch_size, lr, dynamic, seed, device, clock=time.perf_counter):
    """Pyro's VAE tutorial training loop (batches from a DataLoader over CPU tensors, moved to
    ``device``); returns the training ELBO per point and the time (by ``clock``) at the end of
    each epoch."""
    pyro.set_rng_seed(seed)
    loader = DataLoader(TensorDataset(train.cpu()), batch_size=batch_size, shuffle=True)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss=Trace_ELBO())
    history = {"epoch": [], "elbo": [], "time": []}
    start = clock()
    with pyro.get_param_store().scope(), pyro.validation_enabled(False):
        for epoch in range(epochs):
            epoch_loss = 0.0
            for x, in loader:
                x = x.to(device)
                epoch_loss += svi.step(torch.bernoulli(x) if dynamic else x)
            history["epoch"].append(epoch + 1)
            history["elbo"].append(-epoch_loss / train.shape[0])
            history["time"].append(clock() - start)
    return history


def main(argv=None):
    parser = add_data_arguments(script_parser(__doc__.splitlines()[0], "out/vae_vs_pyro_loop"),
                                default="fashion-mnist", binarize="dynamic")
    parser.add_argument("--hidden", type=int, default=400)
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fit-elbo", default="trace", choices=("trace", "meanfield"),
                        help="the toolkit's ELBO: trace (as the loop) or meanfield (analytic KL)")
    parser.add_argument("--eval-particles", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default if not given)")
    args = parser.parse_args(argv)
    if args.threads or args.quick:  # --quick: tiny networks, where one thread is fastest
        torch.set_num_threads(1 if args.quick else args.threads)
    data = images_from_args(args)
    epochs, hidden = (5, 64) if args.quick else (args.epochs, args.hidden)
    def fresh():
        torch.manual_seed(args.seed)  # the same initial weights for both
        return (DeepLatentGaussian(data.shape, args.latent_dim, hidden=(hidden,), activation="softplus"),
                GaussianEncoder(data.shape, args.latent_dim, hidden=(hidden,), activation="softplus"))

    fit_model, fit_guide = fresh()
    result = data.fit(fit_model, fit_guide, val_data=None, elbo=args.fit_elbo, batch_size=args.batch_size,
                      num_epochs=epochs, lr=args.lr, seed=args.seed, progress=not args.quick)
    loop_model, loop_guide = fresh()
    device = data.train.device
    loop = pyro_loop(loop_model.to(device), loop_guide.to(device), data.train, epochs=epochs,
                     batch_size=args.batch_size, lr=args.lr, dynamic=data.binarize == "dynamic", seed=args.seed,
                     device=device)
    metrics = {
        "dataset": data.name, "binarize": data.binarize,
        "architecture": f"{data.train[0].numel()}-{hidden}-{args.latent_dim}",
        "epochs": epochs, "batch_size": args.batch_size, "fit_elbo": args.fit_elbo, "device": str(device),
        "threads": torch.get_num_threads(),
        "fit_test_elbo": test_elbo(fit_model, fit_guide, data.test, num_particles=args.eval_particles, seed=args.seed),
        "pyro_loop_test_elbo": test_elbo(loop_model, loop_guide, data.test, num_particles=args.eval_particles,
                                         seed=args.seed),
        "fit_seconds_per_epoch": result.history["time"][-1] / epochs,
        "pyro_loop_seconds_per_epoch": loop["time"][-1] / epochs,
        "fit_train_elbo_last_epoch": result.elbo, "pyro_loop_train_elbo_last_epoch": loop["elbo"][-1],
    }
    metrics["fit_minus_pyro_loop_test_elbo"] = metrics["fit_test_elbo"] - metrics["pyro_loop_test_elbo"]
    save_figure(plots.elbo_curves({f"vi_toolkit.fit ({args.fit_elbo})": result.history, "Pyro SVI loop (trace)": loop},
                                  x="epoch", title="Training ELBO per image"),
                args.out, "train_elbo")
    write_metrics(args.out, metrics)
    print_summary(f"fit ({args.fit_elbo}) vs Pyro SVI loop: MLP VAE on {data.name} ({epochs} epochs)", metrics)
    return metrics


if __name__ == "__main__":
    main()
