"""A discrete Bayesian network with a latent node: latent classes behind five survey answers.

The network is declared as a DAG of ``Node(name, cardinality, parents)``
(``vi_toolkit.models.bayesnet``): an observed age group, a latent class that depends on it,
four answers that depend on the class and a fifth that depends on the class and the age
group. Answers are simulated from known CPTs; the CPTs are then fitted by MAP with the latent
class summed out exactly (``vi_toolkit.recipes.fit_bayesnet``). The summary gives the
largest CPT error against the truth (classes matched), the exact held-out log-likelihood at
the fitted and the true CPTs, ``vi_toolkit.evaluation.evaluate``'s IWAE estimate beside the
exact value, and how often the most probable class, argmax p(class | answers), is the true one.
``cpts.png`` plots the fitted CPT entries against the true ones and the exact posterior
p(class | answers) of the first test points.
"""

import itertools
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from vi_toolkit.evaluation import evaluate
from vi_toolkit.recipes import fit_bayesnet
from vi_toolkit.models.bayesnet import BayesianNetwork, Node
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser

ANSWERS = ["q1", "q2", "q3", "q4", "q5"]
NODES = [Node("age", 2), Node("class", 3, ("age",))] + [Node(q, 3, ("class",)) for q in ANSWERS[:4]] \
    + [Node("q5", 2, ("class", "age"))]
TRUE = {"age": torch.tensor([0.6, 0.4]),
        "class": torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]]),
        "q1": torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]),
        "q2": torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6], [0.1, 0.7, 0.2]]),
        "q3": torch.tensor([[0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]]),
        "q4": torch.tensor([[0.5, 0.4, 0.1], [0.1, 0.5, 0.4], [0.4, 0.1, 0.5]]),
        "q5": torch.tensor([[[0.9, 0.1], [0.6, 0.4]], [[0.3, 0.7], [0.5, 0.5]], [[0.2, 0.8], [0.1, 0.9]]])}


def match_classes(fitted):
    """The fitted CPTs with the latent classes relabelled to fit the true ones best."""
    def relabel(perm):
        p = list(perm)
        return {"age": fitted["age"], "class": fitted["class"][:, p],
                **{q: fitted[q][p] for q in ANSWERS}}

    def error(cpts):
        return max(float((cpts[n] - TRUE[n]).abs().max()) for n in TRUE)

    return min((relabel(perm) for perm in itertools.permutations(range(3))), key=error)


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/bayesnet")
    parser.add_argument("--n", type=int, default=5000, help="simulated respondents (train and test each)")
    parser.add_argument("--restarts", type=int, default=3, help="fits from different initialisations")
    args = parse_args(parser, argv)
    start = time.perf_counter()
    net = BayesianNetwork(NODES, observed=["age"] + ANSWERS)
    gen = torch.Generator().manual_seed(args.seed)
    n = 1000 if args.quick else args.n
    train, test = net.simulate(TRUE, n, generator=gen), net.simulate(TRUE, n, generator=gen)
    truth = {"train": train.pop("class"), "test": test.pop("class")}

    result, guide = fit_bayesnet(net, train, restarts=1 if args.quick else args.restarts, seed=args.seed,
                                 device=args.device)
    fitted = match_classes({k: v.cpu() for k, v in guide.point_estimate(result).items()})
    heldout = net.log_likelihood(test, fitted)
    names = list(test)
    report = evaluate(result, test, num_samples=10, seed=args.seed,
                      exact=lambda *tensors: net.log_likelihood({k: t.cpu() for k, t in zip(names, tensors)}, fitted))
    posterior = net.posterior(test, fitted, "class")

    metrics = {"num_train": n, "num_test": n, "nodes": repr(net),
               "max_cpt_error": max(float((fitted[k] - TRUE[k]).abs().max()) for k in TRUE),
               "heldout_loglik": float(heldout.mean()),
               "true_cpts_heldout_loglik": float(net.log_likelihood(test, TRUE).mean()),
               "iwae_heldout_loglik": report["iwae"], "exact_minus_iwae": report["exact_minus_iwae"],
               "class_accuracy": float((posterior.argmax(-1) == truth["test"]).float().mean()),
               "class_accuracy_true_cpts": float(
                   (net.posterior(test, TRUE, "class").argmax(-1) == truth["test"]).float().mean())}

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in TRUE:
        left.scatter(TRUE[name].flatten(), fitted[name].flatten(), s=14, label=name)
    left.plot([0, 1], [0, 1], color="0.5", lw=1)
    left.set(xlabel="true CPT entry", ylabel="fitted CPT entry", title="CPTs (latent classes matched)")
    left.legend(fontsize=8)
    shown = posterior[:40].numpy()
    bottom = np.zeros(len(shown))
    for k in range(3):
        right.bar(np.arange(len(shown)), shown[:, k], bottom=bottom, label=f"class {k}")
        bottom += shown[:, k]
    right.scatter(np.arange(len(shown)), np.full(len(shown), -0.05), marker="s", s=16, clip_on=False,
                  c=[f"C{k}" for k in truth["test"][:40].tolist()])
    right.set(xlabel="test respondent", ylabel="p(class | answers)", ylim=(-0.1, 1.0),
              title="exact p(class | answers) (bars) and the true class (squares)")
    right.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    save_figure(fig, args.out, "cpts")
    return finish(args.out, "Bayesian network with a latent class: CPTs by MAP, the class summed out",
                  metrics, start)


if __name__ == "__main__":
    main()
