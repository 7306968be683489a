"""Hidden Markov model fitted by MAP with the states summed out; Viterbi and forward-backward.

By default a batch of sequences of different lengths is simulated from ``vi_toolkit.models.hmm``
itself (3 states, Gaussian or, with ``--emission categorical``, categorical emissions).
``--data FILE`` (.csv or .npy) fits your own sequences: one time step per row, the
first column an integer sequence id (rows of a sequence consecutive, in time order),
the other columns the observation (Gaussian: standardised per column; categorical: one
column of integer codes 0..C-1). Sequences are split 80/20 into training and held-out
ones. The fit maximises log p(x | theta) + log p(theta) (the exact forward algorithm),
then reports the held-out log-likelihood per step, draws sequences coloured by their
Viterbi paths with their posterior state marginals (forward-backward).
"""

import itertools
import time

import numpy as np
import torch

from vi_toolkit.recipes import fit_hmm
from vi_toolkit.models.hmm import HiddenMarkovModel, pad_sequences
from vi_toolkit import plots
from vi_toolkit.io import load_array
from vi_toolkit.scripts import finish, parse_args, save_figure, script_parser

TRUE = {"initial": torch.tensor([0.6, 0.3, 0.1]),
        "transition": torch.tensor([[0.90, 0.05, 0.05], [0.10, 0.80, 0.10], [0.05, 0.15, 0.80]]),
        "locs": torch.tensor([[-2.0], [0.0], [2.5]]), "scales": torch.tensor([[0.7], [0.5], [0.8]]),
        "emission_probs": torch.tensor([[0.65, 0.2, 0.1, 0.05], [0.1, 0.6, 0.2, 0.1],
                                        [0.05, 0.05, 0.2, 0.7]])}


def read_sequences(path, emission):
    """The user's file as a list of sequences (see the module docstring)."""
    table = load_array(path, ndim=2)
    if table.shape[1] < 2:
        raise ValueError(f"{path}: need a sequence-id column and at least one observation column, "
                         f"got {table.shape[1]} column(s)")
    ids, values = table[:, 0], table[:, 1:]
    if emission == "categorical":
        if values.shape[1] != 1 or (values != np.round(values)).any() or (values < 0).any():
            raise ValueError(f"{path}: categorical emissions need one column of integer codes >= 0")
        values = values[:, 0].astype(np.int64)
    else:
        values = (values - values.mean(0)) / np.maximum(values.std(0), 1e-12)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return [values[a:b] for a, b in zip(starts, np.r_[starts[1:], len(ids)])]


def load_data(args):
    """(train, test, hmm, truth): each of train and test a (sequences, lengths) pair."""
    gen = torch.Generator().manual_seed(args.seed)
    if args.data is None:
        hmm = HiddenMarkovModel(3, args.emission, num_categories=4)
        n = 40 if args.quick else args.num_sequences
        split = []
        for _ in range(2):
            lengths = torch.randint(30, 121, (n,), generator=gen)
            x, z = hmm.simulate(TRUE, lengths, generator=gen)
            split.append((x, lengths, z))
        return split[0], split[1], hmm, TRUE
    seqs = read_sequences(args.data, args.emission)
    if len(seqs) < 2:
        raise ValueError(f"{args.data}: {len(seqs)} sequence(s); need at least 2 (train and test)")
    dtype = torch.long if args.emission == "categorical" else torch.get_default_dtype()
    perm = torch.randperm(len(seqs), generator=gen).tolist()
    cut = max(1, int(0.8 * len(seqs)))
    train, test = (pad_sequences([seqs[i] for i in part], dtype=dtype) for part in (perm[:cut], perm[cut:]))
    if args.emission == "categorical":
        hmm = HiddenMarkovModel(args.K, "categorical",
                                num_categories=max(int(train[0].max()), int(test[0].max())) + 1)
    else:
        hmm = HiddenMarkovModel(args.K, "gaussian", D=train[0].shape[-1])
    return (*train, None), (*test, None), hmm, None


def state_accuracy(paths, states, K):
    """Agreement of decoded and true states under the best relabelling of the states."""
    valid = states >= 0
    return max(float((torch.tensor(perm)[paths[valid]] == states[valid]).float().mean())
               for perm in itertools.permutations(range(K)))


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/hmm")
    parser.add_argument("--data", help="your own sequences: .csv or .npy, rows (sequence id, observation...)")
    parser.add_argument("--emission", choices=("gaussian", "categorical"), default="gaussian")
    parser.add_argument("--K", type=int, default=3, help="hidden states (for --data)")
    parser.add_argument("--num-sequences", type=int, default=200, help="simulated sequences (train and test each)")
    parser.add_argument("--restarts", type=int, default=3)
    args = parse_args(parser, argv)
    start = time.perf_counter()
    (x, lengths, z), (x_test, lengths_test, z_test), hmm, truth = load_data(args)
    result, guide = fit_hmm(hmm, x, lengths, seed=args.seed, device=args.device,
                            restarts=1 if args.quick else args.restarts)
    est = {k: v.cpu() for k, v in guide.point_estimate(result).items()}
    steps = int(lengths_test.sum())
    metrics = {"data": args.data or "simulated", "emission": hmm.emission, "K": hmm.K,
               "num_train_sequences": len(lengths), "num_test_sequences": len(lengths_test),
               "train_elbo_per_sequence": result.elbo,
               "heldout_loglik_per_step": float(hmm.log_likelihood(x_test, lengths_test, est).sum()) / steps}
    paths = hmm.viterbi(x_test, lengths_test, est)
    marginals, _ = hmm.posterior_marginals(x_test, lengths_test, est)
    if truth is not None:
        metrics["true_params_heldout_loglik_per_step"] = float(
            hmm.log_likelihood(x_test, lengths_test, truth).sum()) / steps
        metrics["viterbi_state_accuracy"] = state_accuracy(paths, z_test, hmm.K)
        metrics["viterbi_state_accuracy_true_params"] = state_accuracy(
            hmm.viterbi(x_test, lengths_test, truth), z_test, hmm.K)
    title = f"Held-out sequences: Viterbi states (colours) and p(z_t | x), K = {hmm.K}"
    save_figure(plots.state_sequences(x_test, lengths_test, paths, marginals, title=title),
                args.out, "states")
    return finish(args.out, f"HMM ({hmm.emission} emissions) on {metrics['data']} sequences", metrics, start)


if __name__ == "__main__":
    main()
