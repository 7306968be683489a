"""The toolkit against scikit-learn and hmmlearn on mixtures, HMMs and PCA: quality and time.

On the same simulated data and the same number of components / states / dimensions:

* Gaussian mixture (K = 3, full covariances, D = 2): scikit-learn's ``GaussianMixture``
  (EM) vs ``guides.gmm.fit_gmm`` (MAP, enumerated assignments, L-BFGS);
* Gaussian HMM (K = 3, D = 1, sequences of 100 steps): hmmlearn's ``GaussianHMM``
  (Baum-Welch) vs ``guides.hmm.fit_hmm`` (MAP, forward algorithm, L-BFGS);
* PPCA (D = 10, q = 2): scikit-learn's ``PCA`` (its ``score`` is the PPCA log-likelihood)
  vs ``models.ppca`` fitted with the amortized linear encoder (minibatches of 10^4).

For each size N (data points, or time steps for the HMM) the table gives the held-out
log-likelihood per point (per step for the HMM; scikit-learn's ``score`` is already a
mean per sample, hmmlearn's a total that is divided by the number of steps here), the
wall time of the fit (both start from k-means means for the HMM), and the
toolkit/reference ratios. Needs the ``bench`` extra
(scikit-learn, hmmlearn).
"""

import time

import torch

from guides.gmm import fit_gmm
from guides.hmm import fit_hmm, hmm_init
from guides.ppca import LinearEncoder
from models.gmm import GaussianMixture
from models.hmm import HiddenMarkovModel
from models.ppca import PPCA
from vi_toolkit import fit
from vi_toolkit.scripts import print_summary, script_parser, write_metrics

GMM_TRUE = {"weights": torch.tensor([0.5, 0.3, 0.2]),
            "locs": torch.tensor([[-4.0, 0.0], [3.0, 3.0], [3.0, -3.0]]),
            "scales": torch.tensor([[1.0, 0.6], [0.7, 1.2], [0.8, 0.8]]),
            "corr_cholesky": torch.linalg.cholesky(torch.tensor([[[1.0, 0.5], [0.5, 1.0]],
                                                                 [[1.0, -0.3], [-0.3, 1.0]],
                                                                 [[1.0, 0.0], [0.0, 1.0]]]))}
HMM_TRUE = {"initial": torch.tensor([0.6, 0.3, 0.1]),
            "transition": torch.tensor([[0.90, 0.05, 0.05], [0.10, 0.80, 0.10], [0.05, 0.15, 0.80]]),
            "locs": torch.tensor([[-2.0], [0.0], [2.5]]), "scales": torch.tensor([[0.7], [0.5], [0.8]])}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def gmm_rows(n, seed, device, steps):
    from sklearn.mixture import GaussianMixture as SkGMM

    mixture = GaussianMixture(3, 2, "full")
    gen = torch.Generator().manual_seed(seed)
    x, _ = mixture.simulate(GMM_TRUE, n, generator=gen)
    x_test, _ = mixture.simulate(GMM_TRUE, n, generator=gen)
    sk, sk_time = timed(lambda: SkGMM(3, covariance_type="full", random_state=seed).fit(x.numpy()))
    (result, guide), vi_time = timed(lambda: fit_gmm(mixture, x, seed=seed, device=device))
    est = {k: v.cpu() for k, v in guide.point_estimate(result).items()}
    return ("GMM (K=3, full, D=2)", "sklearn GaussianMixture", float(sk.score(x_test.numpy())), sk_time,
            float(mixture.log_likelihood(x_test, est).mean()), vi_time)


def hmm_rows(n, seed, device, steps):
    from hmmlearn.hmm import GaussianHMM

    hmm = HiddenMarkovModel(3, "gaussian")
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.full((max(n // 100, 1),), min(n, 100))
    (x, _), (x_test, _) = (hmm.simulate(HMM_TRUE, lengths, generator=gen) for _ in range(2))
    flat = lambda s: s.reshape(-1, 1).numpy().astype(float)  # noqa: E731 (all lengths equal)
    # Baum-Welch from the toolkit's own starting point (guides.hmm.hmm_init): hmmlearn's
    # default initialisation collapsed all three means onto the data mean on these data
    ref = GaussianHMM(3, covariance_type="diag", n_iter=100, tol=1e-4, init_params="",
                      random_state=seed)
    start = {k: v.double().numpy() for k, v in hmm_init(hmm, x, lengths, seed=seed).items()}
    ref.startprob_, ref.transmat_ = start["initial"], start["transition"]
    ref.means_, ref.covars_ = start["locs"], start["scales"] ** 2
    ref, ref_time = timed(lambda: ref.fit(flat(x), lengths.tolist()))
    (result, guide), vi_time = timed(lambda: fit_hmm(hmm, x, lengths, seed=seed, device=device))
    est = {k: v.cpu() for k, v in guide.point_estimate(result).items()}
    steps = int(lengths.sum())
    return ("HMM (K=3, Gaussian, D=1)", "hmmlearn GaussianHMM",
            float(ref.score(flat(x_test), lengths.tolist())) / steps, ref_time,
            float(hmm.log_likelihood(x_test, lengths, est).sum()) / steps, vi_time)


def ppca_rows(n, seed, device, steps):
    from sklearn.decomposition import PCA

    D, q = 10, 2
    gen = torch.Generator().manual_seed(seed)
    W = 2.0 * torch.randn(D, q, generator=gen)
    x, x_test = (torch.randn(n, q, generator=gen) @ W.T + 1.0 + 0.5 * torch.randn(n, D, generator=gen)
                 for _ in range(2))
    sk, sk_time = timed(lambda: PCA(q).fit(x.numpy()))
    ppca = PPCA(D, q)
    batch = min(n, 10_000)
    result, vi_time = timed(lambda: fit(ppca.model, LinearEncoder(ppca), x, lr=0.05, num_steps=steps,
                                        batch_size=batch, num_particles=4, lr_schedule="cosine",
                                        seed=seed, device=device, progress=False))
    params = {k: v.cpu() for k, v in PPCA.params(result).items()}
    return ("PPCA (D=10, q=2)", "sklearn PCA", float(sk.score(x_test.numpy())), sk_time,
            float(ppca.log_likelihood(x_test, params).mean()), vi_time)


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/bench_classic")
    parser.add_argument("--sizes", default="10000,1000000", help="comma-separated data sizes N")
    parser.add_argument("--models", default="gmm,hmm,ppca", help="comma-separated: gmm, hmm, ppca")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (these models are small: one is usually fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [2000] if args.quick else [int(s) for s in args.sizes.split(",")]
    benches = {"gmm": gmm_rows, "hmm": hmm_rows, "ppca": ppca_rows}
    names = args.models.split(",")
    unknown = set(names) - set(benches)
    if unknown:
        raise ValueError(f"--models: unknown {sorted(unknown)}; use {sorted(benches)}")
    rows = []
    for n in sizes:
        for name in names:
            model, ref, ref_ll, ref_t, vi_ll, vi_t = benches[name](n, args.seed, args.device,
                                                                    300 if args.quick else 2000)
            rows.append({"model": model, "N": n, "reference": ref, "reference_heldout_loglik": ref_ll,
                         "toolkit_heldout_loglik": vi_ll, "loglik_difference": vi_ll - ref_ll,
                         "reference_seconds": ref_t, "toolkit_seconds": vi_t,
                         "time_ratio": vi_t / ref_t})
            print(f"{model:<26}{n:>9} {ref:<24}{ref_ll:>10.4f}{vi_ll:>10.4f}{vi_ll - ref_ll:>+10.4f}"
                  f"{ref_t:>9.2f}s{vi_t:>9.2f}s{vi_t / ref_t:>8.1f}x", flush=True)
    header = (f"\n{'model':<26}{'N':>9} {'reference':<24}{'ref LL':>10}{'toolkit':>10}{'diff':>10}"
              f"{'ref time':>10}{'toolkit':>10}{'ratio':>9}")
    print(header)
    for r in rows:
        print(f"{r['model']:<26}{r['N']:>9} {r['reference']:<24}{r['reference_heldout_loglik']:>10.4f}"
              f"{r['toolkit_heldout_loglik']:>10.4f}{r['loglik_difference']:>+10.4f}"
              f"{r['reference_seconds']:>9.2f}s{r['toolkit_seconds']:>9.2f}s{r['time_ratio']:>8.1f}x")
    metrics = {"rows": rows, "max_abs_loglik_difference": max(abs(r["loglik_difference"]) for r in rows)}
    write_metrics(args.out, metrics)
    print_summary("Held-out log-likelihood per point (HMM: per step); time ratio toolkit / reference",
                  {"max |toolkit - reference| (nats)": metrics["max_abs_loglik_difference"]})
    return metrics


if __name__ == "__main__":
    main()
