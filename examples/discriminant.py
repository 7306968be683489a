"""Linear discriminant analysis as a latent variable model, fitted with all, no and a few labels.

Three classes of 2-D points with one shared covariance are simulated from
``vi_toolkit.models.discriminant`` itself, and the one model (its label mask says which labels
are observed; the classes are summed out elsewhere) is fitted by MAP
(``vi_toolkit.recipes.fit_discriminant``) three ways:

* supervised, every label observed: beside scikit-learn's ``LinearDiscriminantAnalysis``
  (class means, shared covariance, ``predict_proba`` on the test points);
* unsupervised, no label: held-out log-likelihood beside a tied-covariance EM (scikit-learn's
  ``GaussianMixture(covariance_type="tied")``) and the true parameters;
* semi-supervised, ``--labels`` labels a class: accuracy on the unlabelled points beside the
  supervised fit on the labelled points alone and the true parameters (the Bayes classifier).

``regions.png`` draws each fit's decision regions over the training points.
"""

import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.mixture import GaussianMixture

from vi_toolkit.recipes import fit_discriminant
from vi_toolkit.models.discriminant import LinearDiscriminant, label_data
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser

TRUE = {"weights": torch.tensor([0.5, 0.3, 0.2]),
        "locs": torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, 3.0]]),
        "scales": torch.tensor([1.0, 1.5]),
        "corr_cholesky": torch.linalg.cholesky(torch.tensor([[1.0, 0.6], [0.6, 1.0]]))}


def estimate(lda, data, args):
    """theta_hat of a MAP fit of ``lda`` to ``data``, on the CPU."""
    result, guide = fit_discriminant(lda, data, restarts=1 if args.quick else args.restarts, seed=args.seed,
                                     device=args.device)
    return {k: v.cpu() for k, v in guide.point_estimate(result).items()}


def draw_regions(ax, lda, params, x, labels, title, labelled=None):
    """The fit's most probable class over the points' range, the points coloured by ``labels``
    (-1: grey) and the ``labelled`` ones (a mask) drawn large."""
    colours = np.array(["tab:red", "tab:blue", "tab:green", "0.6"])
    lo, hi = x.min(0).values - 1, x.max(0).values + 1
    u, v = torch.meshgrid(torch.linspace(lo[0], hi[0], 200), torch.linspace(lo[1], hi[1], 200), indexing="xy")
    classes = lda.predict(torch.stack([u.flatten(), v.flatten()], -1), params).reshape(u.shape)
    ax.contourf(u, v, classes, levels=np.arange(lda.K + 1) - 0.5, colors=colours[:lda.K], alpha=0.2)
    ax.scatter(x[:, 0], x[:, 1], c=colours[labels], s=5)
    if labelled is not None:
        ax.scatter(x[labelled, 0], x[labelled, 1], c=colours[labels[labelled]], s=60, edgecolors="black")
    ax.set_title(title, fontsize=9)


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/discriminant")
    parser.add_argument("--n", type=int, default=2000, help="simulated points (train and test each)")
    parser.add_argument("--labels", type=int, default=2, help="labels a class in the semi-supervised fit")
    parser.add_argument("--restarts", type=int, default=2, help="fits from different k-means seedings")
    args = parse_args(parser, argv)
    start = time.perf_counter()
    lda = LinearDiscriminant(3, 2)
    gen = torch.Generator().manual_seed(args.seed)
    n = 600 if args.quick else args.n
    x, z = lda.simulate(TRUE, n, generator=gen)
    x_test, _ = lda.simulate(TRUE, n, generator=gen)

    supervised = estimate(lda, label_data(x, z), args)
    sk = LinearDiscriminantAnalysis(solver="lsqr").fit(x.double().numpy(), z.numpy())

    unsupervised = estimate(lda, label_data(x), args)
    em = GaussianMixture(3, covariance_type="tied", n_init=5, tol=1e-8, max_iter=2000,
                         random_state=args.seed).fit(x.double().numpy())

    known = torch.cat([(z == k).nonzero().flatten()[:args.labels] for k in range(lda.K)])
    y = torch.full_like(z, -1)
    y[known] = z[known]
    semi_data = label_data(x, y)
    semi = estimate(lda, semi_data, args)
    labelled_only = estimate(lda, label_data(x[known], z[known]), args)
    unlabelled = ~semi_data[2]

    def accuracy(params):
        return float((lda.predict(x[unlabelled], params) == z[unlabelled]).float().mean())

    def heldout(params):
        return float(lda.log_likelihood(*label_data(x_test), params).mean())

    metrics = {
        "num_train": n, "num_test": n, "num_labelled": len(known),
        "supervised_max_loc_diff_vs_sklearn": float(np.abs(supervised["locs"].numpy() - sk.means_).max()),
        "supervised_cov_rel_diff_vs_sklearn": float(np.linalg.norm(lda.covariance(supervised).numpy()
                                                                   - sk.covariance_) / np.linalg.norm(sk.covariance_)),
        "supervised_max_proba_diff_vs_sklearn": float(np.abs(
            lda.predict_proba(x_test, supervised).numpy() - sk.predict_proba(x_test.double().numpy())).max()),
        "unsupervised_heldout_loglik": heldout(unsupervised),
        "tied_em_heldout_loglik": float(em.score(x_test.double().numpy())),
        "true_params_heldout_loglik": heldout(TRUE),
        "semi_supervised_accuracy": accuracy(semi),
        "labelled_only_accuracy": accuracy(labelled_only),
        "true_params_accuracy": accuracy(TRUE),
    }
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharex=True, sharey=True)
    shown = torch.where(semi_data[2], z, -1)
    draw_regions(axes[0], lda, supervised, x, z, "supervised (all labels)")
    draw_regions(axes[1], lda, unsupervised, x, lda.predict(x, unsupervised), "unsupervised (no label)")
    draw_regions(axes[2], lda, semi, x, shown, f"semi-supervised ({len(known)} labels; grey: unlabelled)",
                 semi_data[2])
    draw_regions(axes[3], lda, labelled_only, x, shown, f"the {len(known)} labelled points alone", semi_data[2])
    fig.tight_layout()
    save_figure(fig, args.out, "regions")
    return finish(args.out, "Linear discriminant analysis: supervised, unsupervised, semi-supervised",
                  metrics, start)


if __name__ == "__main__":
    main()
