"""The semi-supervised VAE (M2, Kingma et al. 2014): a classifier from a few labels and many images.

A balanced subset of the training images keeps its labels (``--labelled-fraction``, 10% of
the 8x8 digits by default, or ``--labels N``); the M2 model (``vi_toolkit.models.ssvae``) is
fitted by ``vi_toolkit.fit`` on the two sets at once, ``DataSets(labelled=(x_l, y_l),
unlabelled=x_u)``, each minibatched and scaled by its own N / B, the classes of the
unlabelled images summed out by enumeration. The test accuracy of its classifier q(y | x)
is printed beside scikit-learn's ``LogisticRegression`` trained on the labelled images
alone. ``--dataset fashion-mnist --labels 1000 --alpha 200`` runs it on Fashion-MNIST (Debian's
``dataset-fashion-mnist`` package, or ``--data-root``; with 49 unlabelled images a label, the
default alpha = 10 lets the unlabelled ELBO pull the classifier off the labels: the README has
the figures). Figures: ``elbo.png`` (each set's
ELBO per image and the total, per epoch) and ``analogies.png`` (codes z from the prior, one
a row, drawn as every class: Kingma et al.'s analogies).
"""

import time

import torch
from sklearn.linear_model import LogisticRegression

from vi_toolkit import DataSets, fit, plots
from vi_toolkit.datasets import DATASETS, load_images
from vi_toolkit.guides.ssvae import SemiSupervisedGuide
from vi_toolkit.models.ssvae import SemiSupervisedVAE
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser


def balanced_split(labels, num_labelled, generator):
    """Indices of ``num_labelled`` points taken in turn from each class (random within it), and
    of the others."""
    perm = torch.randperm(len(labels), generator=generator)
    rank = torch.empty_like(perm)
    for c in labels.unique():
        members = perm[labels[perm] == c]
        rank[members] = torch.arange(len(members))
    order = perm[torch.argsort(rank[perm], stable=True)]
    return order[:num_labelled], order[num_labelled:]


def accuracy(predicted, labels):
    return float((torch.as_tensor(predicted).cpu() == labels.cpu()).float().mean())


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/ssvae")
    parser.add_argument("--dataset", default="digits", choices=DATASETS)
    parser.add_argument("--data-root", default=None, help="folder with the IDX files (MNIST, Fashion-MNIST)")
    parser.add_argument("--labels", type=int, default=None, help="labelled training images (overrides the fraction)")
    parser.add_argument("--labelled-fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=128,
                        help="images a step: both sets together, split in proportion to their sizes")
    parser.add_argument("--labelled-batch-size", type=int, default=None,
                        help="labelled images a step (the labels then cycle faster than the other "
                             "images); --batch-size is then the unlabelled images a step")
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=10.0, help="weight of log q(y | x) per labelled image")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parse_args(parser, argv)
    start = time.perf_counter()
    data = load_images("digits" if args.quick else args.dataset, root=args.data_root, binarize="none",
                       seed=args.seed, device=args.device)
    num_labelled = args.labels or round(args.labelled_fraction * len(data.train))
    labelled, unlabelled = balanced_split(data.train_labels.cpu(), num_labelled,
                                          torch.Generator().manual_seed(args.seed))
    x_l, y_l = data.train[labelled.to(data.train.device)], data.train_labels[labelled.to(data.train.device)]
    x_u = data.train[unlabelled.to(data.train.device)]
    num_classes = len(data.classes)

    hidden = (64,) if args.quick else (args.hidden,)
    model = SemiSupervisedVAE(data.shape, num_classes, args.latent_dim, hidden=hidden, alpha=args.alpha)
    guide = SemiSupervisedGuide(model, hidden=hidden)
    batch_size = args.batch_size if args.labelled_batch_size is None else {
        "labelled": min(args.labelled_batch_size, len(x_l)), "unlabelled": args.batch_size}
    result = fit(model, guide, DataSets(labelled=(x_l, y_l), unlabelled=x_u), batch_size=batch_size,
                 num_epochs=10 if args.quick else args.epochs, lr=args.lr, seed=args.seed, device=args.device,
                 progress=False, options={"val_batch_size": 1000})
    with result.scope():
        m2_accuracy = accuracy(torch.cat([model.predict(x) for x in data.test.split(1000)]), data.test_labels)
        analogies = model.sample(torch.randn(8, args.latent_dim, device=data.train.device))

    flat = lambda x: x.reshape(len(x), -1).cpu().numpy()  # noqa: E731
    baseline = LogisticRegression(max_iter=5000).fit(flat(x_l), y_l.cpu().numpy())
    h = result.history
    save_figure(plots.elbo_curves({"labelled: L + alpha log q(y | x)": {"epoch": h["epoch"], "elbo": h["elbo_labelled"]},
                                   "unlabelled: U": {"epoch": h["epoch"], "elbo": h["elbo_unlabelled"]},
                                   "total": h}, x="epoch", title="M2: ELBO per image of each set"),
                args.out, "elbo")
    save_figure(plots.image_grid(analogies.transpose(0, 1).flatten(0, 1), nrow=num_classes,
                                 title="each row: one z ~ N(0, I) drawn as every class"), args.out, "analogies")
    metrics = {"dataset": data.name, "num_labelled": len(x_l), "num_unlabelled": len(x_u),
               "num_test": len(data.test), "epochs": h["epoch"][-1],
               "ssvae_test_accuracy": m2_accuracy,
               "logistic_regression_test_accuracy": accuracy(baseline.predict(flat(data.test)), data.test_labels),
               "elbo_labelled": h["elbo_labelled"][-1], "elbo_unlabelled": h["elbo_unlabelled"][-1],
               "elbo": h["elbo"][-1]}
    return finish(args.out, f"M2 on {data.name} with {len(x_l)} labels: test accuracy of q(y | x) beside "
                  "logistic regression on the labels alone", metrics, start)


if __name__ == "__main__":
    main()
