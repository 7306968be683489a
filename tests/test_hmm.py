"""Hidden Markov models against an independent numpy forward algorithm, Viterbi and Baum-Welch."""

import numpy as np
import pytest
import torch
from pyro import poutine

from vi_toolkit.recipes import fit_hmm
from vi_toolkit.models.hmm import HiddenMarkovModel, pad_sequences

TRUE = {"initial": torch.tensor([0.6, 0.3, 0.1]),
        "transition": torch.tensor([[0.90, 0.05, 0.05], [0.10, 0.80, 0.10], [0.05, 0.15, 0.80]]),
        "locs": torch.tensor([[-2.0], [0.0], [2.5]]), "scales": torch.tensor([[0.7], [0.5], [0.8]]),
        "emission_probs": torch.tensor([[0.65, 0.2, 0.1, 0.05], [0.1, 0.6, 0.2, 0.1],
                                        [0.05, 0.05, 0.2, 0.7]])}


# -- independent references in numpy, one sequence at a time ---------------------------------
def np_emission(x, params, emission):
    """(T, K) emission densities p(x_t | z = k) of one unpadded sequence."""
    if emission == "categorical":
        return params["emission_probs"][:, x].T
    mu, sd = params["locs"][:, 0], params["scales"][:, 0]
    return np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2) / (np.sqrt(2 * np.pi) * sd)


def np_forward_backward(e, pi, A):
    """Scaled forward-backward: log p(x), the state marginals (T, K), and the pair sums."""
    T, K = e.shape
    alpha, c = np.zeros((T, K)), np.zeros(T)
    alpha[0] = pi * e[0]
    c[0] = alpha[0].sum()
    alpha[0] /= c[0]
    for t in range(1, T):
        alpha[t] = (alpha[t - 1] @ A) * e[t]
        c[t] = alpha[t].sum()
        alpha[t] /= c[t]
    beta = np.ones((T, K))
    for t in range(T - 2, -1, -1):
        beta[t] = A @ (e[t + 1] * beta[t + 1]) / c[t + 1]
    xi = sum(np.outer(alpha[t], e[t + 1] * beta[t + 1]) * A / c[t + 1] for t in range(T - 1))
    return np.log(c).sum(), alpha * beta, xi


def np_viterbi(e, pi, A):
    T, K = e.shape
    delta, back = np.log(pi) + np.log(e[0]), np.zeros((T, K), dtype=int)
    for t in range(1, T):
        scores = delta[:, None] + np.log(A)
        back[t] = scores.argmax(0)
        delta = scores.max(0) + np.log(e[t])
    path = [int(delta.argmax())]
    for t in range(T - 1, 0, -1):
        path.insert(0, int(back[t][path[0]]))
    return np.array(path)


def np_baum_welch(seqs, K, *, iterations=200, restarts=2, tol=1e-7, seed=0):
    """Maximum-likelihood EM for 1-D Gaussian emissions from random starts; the best.

    Each start iterates until the relative change of the log-likelihood is below ``tol``.
    """
    rng = np.random.default_rng(seed)
    allx = np.concatenate(seqs)
    best = None
    for _ in range(restarts):
        p = {"initial": np.full(K, 1.0 / K), "transition": rng.dirichlet(np.ones(K) * 5, K),
             "locs": rng.choice(allx, K, replace=False)[:, None], "scales": np.full((K, 1), allx.std())}
        previous = -np.inf
        for _ in range(iterations):
            g0, xi_sum, gsum, gx, gxx, total = 0, 0, 0, 0, 0, 0.0
            for x in seqs:
                ll, gamma, xi = np_forward_backward(np_emission(x, p, "gaussian"), p["initial"],
                                                    p["transition"])
                g0, xi_sum, total = g0 + gamma[0], xi_sum + xi, total + ll
                gsum, gx, gxx = gsum + gamma.sum(0), gx + gamma.T @ x, gxx + gamma.T @ x ** 2
            mu = gx / gsum
            p = {"initial": g0 / g0.sum(), "transition": xi_sum / xi_sum.sum(1, keepdims=True),
                 "locs": mu[:, None], "scales": np.sqrt(gxx / gsum - mu ** 2)[:, None]}
            if total - previous < tol * abs(total):
                break
            previous = total
        if best is None or total > best[0]:
            best = (total, p)
    return best[1]


def np_params(params):
    return {k: v.double().numpy() for k, v in params.items()}


def unpadded(x, lengths):
    return [x[n, :int(lengths[n])].numpy().astype(float if x.is_floating_point() else int).squeeze(-1)
            if x.dim() == 3 else x[n, :int(lengths[n])].numpy() for n in range(len(lengths))]


def simulate(emission, n, seed, low=5, high=40):
    hmm = HiddenMarkovModel(3, emission, num_categories=4)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=gen)
    x, z = hmm.simulate(TRUE, lengths, generator=gen)
    return hmm, x, lengths, z


@pytest.mark.parametrize("emission", ["gaussian", "categorical"])
def test_marginal_likelihood_marginals_and_viterbi_match_numpy(emission):
    hmm, x, lengths, _ = simulate(emission, 30, seed=1)
    p = np_params(TRUE)
    refs = [np_forward_backward(np_emission(s, p, emission), p["initial"], p["transition"])
            for s in unpadded(x, lengths)]
    ll_np = np.array([r[0] for r in refs])
    # the model's own marginal likelihood: the observed site's log-density, theta fixed
    global_sites = ("initial", "transition") + (
        ("locs", "scales") if emission == "gaussian" else ("emission_probs",))
    conditioned = poutine.condition(hmm.model, data={s: TRUE[s] for s in global_sites})
    ll_model = poutine.trace(conditioned).get_trace(x, lengths).nodes["x"]["fn"].log_prob(x)
    assert np.allclose(ll_model.numpy(), ll_np, rtol=1e-4, atol=0)
    gamma, log_px = hmm.posterior_marginals(x, lengths, TRUE)
    assert np.allclose(log_px.numpy(), ll_np, rtol=1e-4, atol=0)
    paths = hmm.viterbi(x, lengths, TRUE)
    for n, (s, ref) in enumerate(zip(unpadded(x, lengths), refs)):
        T = int(lengths[n])
        assert np.allclose(gamma[n, :T].numpy(), ref[1], atol=1e-4)
        assert (gamma[n, T:] == 0).all() and (paths[n, T:] == -1).all()
        assert np.array_equal(paths[n, :T].numpy(), np_viterbi(np_emission(s, p, emission),
                                                                p["initial"], p["transition"]))


def test_learned_parameters_match_baum_welch_on_held_out_sequences():
    hmm, x, lengths, _ = simulate("gaussian", 60, seed=2, low=20, high=60)
    _, x_test, lengths_test, _ = simulate("gaussian", 60, seed=3, low=20, high=60)
    result, guide = fit_hmm(hmm, x, lengths, seed=0)
    est = guide.point_estimate(result)
    steps = int(lengths_test.sum())
    heldout = float(hmm.log_likelihood(x_test, lengths_test, est).sum()) / steps
    bw = np_baum_welch(unpadded(x, lengths), 3)
    bw_heldout = sum(np_forward_backward(np_emission(s, bw, "gaussian"), bw["initial"], bw["transition"])[0]
                     for s in unpadded(x_test, lengths_test)) / steps
    assert abs(heldout - bw_heldout) < 0.02
    order = est["locs"][:, 0].argsort()
    assert torch.allclose(est["locs"][order], TRUE["locs"], atol=0.2)
    assert torch.allclose(est["transition"][order][:, order], TRUE["transition"], atol=0.08)


def test_pad_sequences_and_categorical_fit():
    hmm, x, lengths, _ = simulate("categorical", 40, seed=4, low=20, high=50)
    padded, lens = pad_sequences(unpadded(x, lengths))
    assert torch.equal(lens, lengths) and torch.equal(padded, x[:, :padded.shape[1]])
    result, guide = fit_hmm(hmm, x, lengths, seed=0)
    est = guide.point_estimate(result)
    fitted = hmm.log_likelihood(x, lengths, est).sum()
    assert fitted >= hmm.log_likelihood(x, lengths, TRUE).sum() - 1.0  # MAP ~ ML: at least as good
    assert torch.allclose(est["transition"].sum(-1), torch.ones(3))


def test_bad_input_is_a_value_error_naming_it():
    hmm, x, lengths, _ = simulate("gaussian", 5, seed=5)
    nan = x.clone()
    nan[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"sequences has 1 NaN .* index \(1, 2, 0\)"):
        fit_hmm(hmm, nan, lengths)
    too_long = lengths.clone()
    too_long[3] = x.shape[1] + 1
    with pytest.raises(ValueError, match=rf"lengths must lie in 1..{x.shape[1]} .* sequence 3 has "
                                         rf"length {x.shape[1] + 1}"):
        hmm.log_likelihood(x, too_long, TRUE)
    with pytest.raises(ValueError, match=r"sequences must have shape \(N, T, 2\)"):
        HiddenMarkovModel(3, "gaussian", D=2).viterbi(x, lengths, TRUE)
    with pytest.raises(ValueError, match="K .*must be an integer >= 1"):
        HiddenMarkovModel(0)
    with pytest.raises(ValueError, match="codes in 0..3"):
        HiddenMarkovModel(3, "categorical", num_categories=4).log_likelihood(
            torch.full((2, 4), 7), torch.tensor([4, 4]), TRUE)
