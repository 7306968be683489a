"""Time to EM's held-out log-likelihood: the toolkit against scikit-learn and hmmlearn.

On the same simulated data and the same number of components / states / dimensions:

* Gaussian mixture (K = 3, full covariances, D = 2, overlapping components):
  scikit-learn's ``GaussianMixture`` (EM from k-means) vs ``vi_toolkit.recipes.fit_gmm`` (MAP,
  assignments summed out by enumeration, L-BFGS, from k-means);
* Gaussian HMM (K = 4 states, 2-D diagonal Gaussian emissions, sequences of 100 steps):
  hmmlearn's ``GaussianHMM`` (Baum-Welch) vs ``vi_toolkit.recipes.fit_hmm`` (MAP, the forward
  algorithm as a parallel scan in Pyro's ``DiscreteHMM``, L-BFGS), both from
  ``vi_toolkit.initialization.hmm_init`` (hmmlearn's own initialisation can merge states on such data);
* PPCA (D = 10, q = 2): scikit-learn's ``PCA`` (closed form; its ``score`` is the PPCA
  log-likelihood) vs ``vi_toolkit.models.ppca`` with the amortized linear encoder (Adam with a cosine
  schedule over 2000 steps, minibatches of at most 10^4).

The target of each row is the reference run to convergence (tolerance 1e-10): its
held-out log-likelihood per point (per time step for the HMM) L*. Each method's *time to
target* is the wall time from the start of its fit (initialisation included) until the
held-out log-likelihood of its current parameters first reaches L* - ``--tolerance``
(0.01 nats). The held-out scores are computed outside the clock: for EM and Baum-Welch
from parameter snapshots taken after each M-step, for the toolkit by a ``fit``
callback after each step (three L-BFGS iterations; a step of one stalls L-BFGS on
the HMM) that stops its own clock while it runs.
The ratio toolkit / reference is the figure the speed targets are stated in.

``fit (compiled)``: for the GMM and the HMM the same fit again with ``compile=True`` (the
same objective and L-BFGS steps, the loss and its gradients replayed from one compiled graph,
:mod:`vi_toolkit.compiled`). Its time to target excludes the seconds of tracing and compiling,
which are reported beside it (``config["compile"]["seconds"]``); a warm-up compile of a small
fit first keeps importing and starting the compiler out of every row. ``--quick`` leaves the
compiled fits out (a smoke test waits on no compiler). Writes ``seconds_to_target.png`` and
``metrics.json``.
"""

import functools
import time
import warnings

import torch

from vi_toolkit.guides.gmm import MAPGuide as GMMMAPGuide
from vi_toolkit.recipes import fit_gmm
from vi_toolkit.guides.hmm import MAPGuide as HMMMAPGuide
from vi_toolkit.initialization import hmm_init
from vi_toolkit.recipes import fit_hmm
from vi_toolkit.guides.ppca import LinearEncoder
from vi_toolkit.models.gmm import GaussianMixture
from vi_toolkit.models.hmm import HiddenMarkovModel
from vi_toolkit.models.ppca import PPCA
from vi_toolkit import fit, plots
from vi_toolkit.scripts import print_summary, save_figure, script_parser, write_metrics

GMM_TRUE = {"weights": torch.tensor([0.5, 0.3, 0.2]),
            "locs": torch.tensor([[-1.5, 0.0], [1.0, 1.0], [1.0, -1.0]]),
            "scales": torch.tensor([[1.0, 0.6], [0.7, 1.2], [0.8, 0.8]]),
            "corr_cholesky": torch.linalg.cholesky(torch.tensor([[[1.0, 0.5], [0.5, 1.0]],
                                                                 [[1.0, -0.3], [-0.3, 1.0]],
                                                                 [[1.0, 0.0], [0.0, 1.0]]]))}
HMM_TRUE = {"initial": torch.tensor([0.4, 0.3, 0.2, 0.1]),
            "transition": torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.10, 0.80, 0.05, 0.05],
                                        [0.05, 0.10, 0.80, 0.05], [0.05, 0.05, 0.10, 0.80]]),
            "locs": torch.tensor([[-2.0, 0.0], [0.0, 1.5], [2.0, 0.0], [0.0, -1.5]]),
            "scales": torch.tensor([[0.8, 0.8], [0.7, 0.9], [0.9, 0.6], [0.8, 0.8]])}


TOOLKIT_ROWS = {"fit": "toolkit", "fit (compiled)": "compiled"}  # implementation: its metrics' prefix


class Clock:
    """A ``fit`` callback: held-out score after each step, with the clock stopped while it runs.

    ``score(result)`` gives the held-out log-likelihood of a fit's current parameters;
    the fit stops once it reaches ``target``. ``reached`` is the time to target (seconds
    since :meth:`start`, scoring excluded), ``None`` if it was never reached.
    """

    def __init__(self, score, target):
        self.score, self.target = score, target
        self.reached, self.steps, self.last = None, 0, None

    def start(self):
        self.t0, self.paused = time.perf_counter(), 0.0
        return self

    def __call__(self, event):
        now = time.perf_counter()
        self.steps, self.last = self.steps + 1, self.score(event.result)
        if self.reached is None and self.last >= self.target:
            self.reached = now - self.t0 - self.paused
        self.paused += time.perf_counter() - now
        return self.reached is not None


def first_reaching(snapshots, score, target, t0):
    """(seconds, iterations, score) at the first snapshot ``(time, params)`` scoring >= target."""
    for i, (t, params) in enumerate(snapshots):
        value = score(params)
        if value >= target:
            return t - t0, i + 1, value
    return None, len(snapshots), value


def toolkit_fits(fit_once, score, target, compiled):
    """``{implementation: (clock, compile seconds)}`` of ``fit_once(callback, compile)``'s fits:
    eager, and compiled too if ``compiled``; the compiled clock's time to target excludes its
    compile seconds."""
    fits = {}
    for impl, compile in (("fit", False), ("fit (compiled)", True))[:2 if compiled else 1]:
        clock = Clock(score, target)
        result = fit_once(clock.start(), compile)
        seconds = result.config["compile"]["seconds"] if compile else None
        if seconds and clock.reached is not None:
            clock.reached -= seconds
        fits[impl] = (clock, seconds)
    return fits


def gmm_row(n, seed, tolerance, compiled=False):
    from sklearn.mixture import GaussianMixture as SkGMM

    class Recorded(SkGMM):  # EM with a snapshot of the parameters after every M-step
        def _m_step(self, X, log_resp, **kwargs):
            super()._m_step(X, log_resp, **kwargs)
            self.snapshots.append((time.perf_counter(), self._get_parameters()))

    mixture = GaussianMixture(3, 2, "full")
    gen = torch.Generator().manual_seed(seed)
    x, _ = mixture.simulate(GMM_TRUE, n, generator=gen)
    x_test, _ = mixture.simulate(GMM_TRUE, n, generator=gen)
    xn, xn_test = x.numpy(), x_test.numpy()
    converged = SkGMM(3, covariance_type="full", tol=1e-10, max_iter=5000, random_state=seed).fit(xn)
    target = converged.score(xn_test) - tolerance
    em = Recorded(3, covariance_type="full", tol=1e-10, max_iter=200, random_state=seed)
    em.snapshots = []
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: the cap is far past the target
        em.fit(xn)

    def em_score(params):
        em._set_parameters(params)
        return em.score(xn_test)

    ref = first_reaching(em.snapshots, em_score, target, t0)
    estimate = GMMMAPGuide(mixture, init=None).point_estimate
    fits = toolkit_fits(lambda clock, compile: fit_gmm(
        mixture, x, seed=seed, num_steps=500, tol_rel_obj=None, compile=compile,
        options={"log_every": 1, "optimizer_args": {"max_iter": 3}}, callbacks=[clock])[0],
        lambda r: float(mixture.log_likelihood(x_test, estimate(r)).mean()), target, compiled)
    return ("GMM (K=3, full, D=2)", "sklearn GaussianMixture (EM)", target + tolerance, ref, fits)


def hmm_row(n, seed, tolerance, compiled=False):
    from hmmlearn.hmm import GaussianHMM

    class Recorded(GaussianHMM):  # Baum-Welch with a snapshot after every M-step
        def _do_mstep(self, stats):
            super()._do_mstep(stats)
            self.snapshots.append((time.perf_counter(), (self.startprob_.copy(), self.transmat_.copy(),
                                                         self.means_.copy(), self._covars_.copy())))

    hmm = HiddenMarkovModel(4, "gaussian", D=2)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.full((max(n // 100, 1),), min(n, 100))
    (x, _), (x_test, _) = (hmm.simulate(HMM_TRUE, lengths, generator=gen) for _ in range(2))
    flat = lambda s: s.reshape(-1, 2).double().numpy()  # noqa: E731 (all lengths equal)
    steps, lens = int(lengths.sum()), lengths.tolist()

    def baum_welch(n_iter):
        bw = Recorded(4, covariance_type="diag", n_iter=n_iter, tol=1e-10, init_params="",
                      random_state=seed)
        bw.snapshots = []
        start = {k: v.double().numpy() for k, v in hmm_init(hmm, x, lengths, seed=seed).items()}
        bw.startprob_, bw.transmat_ = start["initial"], start["transition"]
        bw.means_, bw.covars_ = start["locs"], start["scales"] ** 2
        return bw

    converged = baum_welch(5000).fit(flat(x), lens)
    target = converged.score(flat(x_test), lens) / steps - tolerance
    t0 = time.perf_counter()
    bw = baum_welch(300)  # the same initialisation as the toolkit's, timed as part of the fit
    bw.fit(flat(x), lens)

    def bw_score(params):
        bw.startprob_, bw.transmat_, bw.means_, bw._covars_ = params
        return bw.score(flat(x_test), lens) / steps

    ref = first_reaching(bw.snapshots, bw_score, target, t0)
    estimate = HMMMAPGuide(hmm, init=None).point_estimate
    fits = toolkit_fits(lambda clock, compile: fit_hmm(
        hmm, x, lengths, seed=seed, num_steps=500, tol_rel_obj=None, compile=compile,
        options={"log_every": 1, "optimizer_args": {"max_iter": 3}}, callbacks=[clock])[0],
        lambda r: float(hmm.log_likelihood(x_test, lengths, estimate(r)).sum()) / steps, target, compiled)
    return ("HMM (K=4, Gaussian, D=2)", "hmmlearn GaussianHMM (Baum-Welch)", target + tolerance, ref, fits)


def ppca_row(n, seed, tolerance):
    from sklearn.decomposition import PCA

    D, q = 10, 2
    gen = torch.Generator().manual_seed(seed)
    W = 2.0 * torch.randn(D, q, generator=gen)
    x, x_test = (torch.randn(n, q, generator=gen) @ W.T + 1.0 + 0.5 * torch.randn(n, D, generator=gen)
                 for _ in range(2))
    t0 = time.perf_counter()
    pca = PCA(q).fit(x.numpy())
    ref_time = time.perf_counter() - t0
    target = float(pca.score(x_test.numpy())) - tolerance
    ppca = PPCA(D, q)
    clock = Clock(lambda r: float(ppca.log_likelihood(x_test, PPCA.params(r)).mean()), target)
    batch = min(n, 10_000)
    fit(ppca.model, LinearEncoder(ppca), x, lr=0.05, num_steps=2000, batch_size=batch, num_particles=4,
        lr_schedule="cosine", seed=seed, progress=False, options={"log_every": 20}, callbacks=[clock.start()])
    return ("PPCA (D=10, q=2)", "sklearn PCA (closed form)", target + tolerance, (ref_time, 1, target),
            {"fit": (clock, None)})


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/bench_classic")
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated data sizes N")
    parser.add_argument("--models", default="gmm,hmm,ppca", help="comma-separated: gmm, hmm, ppca")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="nats per point (per step for the HMM) below the reference's converged "
                             "held-out log-likelihood that count as reaching it")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (these models are small: one is usually fastest)")
    args = parser.parse_args(argv)
    if args.device not in ("auto", "cpu"):
        raise ValueError("--device: the references run on the CPU; this benchmark compares on the CPU")
    torch.set_num_threads(args.threads)
    sizes = [5000] if args.quick else [int(s) for s in args.sizes.split(",")]
    compiled = not args.quick  # a smoke test waits on no compiler
    benches = {"gmm": functools.partial(gmm_row, compiled=compiled),
               "hmm": functools.partial(hmm_row, compiled=compiled), "ppca": ppca_row}
    names = args.models.split(",")
    unknown = set(names) - set(benches)
    if unknown:
        raise ValueError(f"--models: unknown {sorted(unknown)}; use {sorted(benches)}")
    fit_gmm(GaussianMixture(2, 2), torch.randn(200, 2), num_steps=2)  # warm up torch and Pyro
    if compiled:  # and the compiler (imports, Inductor's start-up), on other shapes
        fit_gmm(GaussianMixture(2, 2), torch.randn(200, 2), num_steps=2, compile=True)
    rows = []
    header = (f"{'model':<26}{'N':>9} {'reference':<36}{'L*':>9}{'ref s':>8}{'iters':>6}"
              + "".join(f"{label + ' s':>12}{'steps':>6}{'ratio':>10}" for label in ("fit", "compiled"))
              + f"{'compile s':>10}")
    print(header)
    for n in sizes:
        for name in names:
            model, ref_name, best, (ref_t, ref_iters, _), fits = benches[name](n, args.seed, args.tolerance)
            row = {"model": model, "N": n, "reference": ref_name, "reference_converged_loglik": best,
                   "target_loglik": best - args.tolerance, "reference_seconds_to_target": ref_t,
                   "reference_iterations": ref_iters}
            cells = ""
            for impl, prefix in TOOLKIT_ROWS.items():
                clock, compile_seconds = fits.get(impl, (None, None))
                if clock is None:
                    cells += f"{'-':>12}{'-':>6}{'-':>10}"
                    continue
                ratio = clock.reached / ref_t if clock.reached and ref_t else None
                row.update({f"{prefix}_seconds_to_target": clock.reached, f"{prefix}_steps": clock.steps,
                            f"{prefix}_final_loglik": clock.last, f"{prefix}_time_ratio": ratio})
                cells += (f"{'never' if clock.reached is None else format(clock.reached, '.3f'):>12}"
                          f"{clock.steps:>6}{'-' if ratio is None else format(ratio, '.2f') + 'x':>10}")
                if compile_seconds is not None:
                    row[f"{prefix}_compile_seconds"] = compile_seconds
            rows.append(row)
            compile_seconds = row.get("compiled_compile_seconds")
            print(f"{model:<26}{n:>9} {ref_name:<36}{best:>9.4f}{'never' if ref_t is None else format(ref_t, '.3f'):>8}{ref_iters:>6}{cells}"
                  f"{'-' if compile_seconds is None else format(compile_seconds, '.1f'):>10}", flush=True)
    metrics = {"tolerance": args.tolerance, "rows": rows}
    save_figure(plots.bar_chart({f"{r['model'].split(' ')[0]} N={r['N']:.0e} {who}":
                                 r[f"{key}_seconds_to_target"] or float("nan")
                                 for r in rows for who, key in (("reference", "reference"), *TOOLKIT_ROWS.items())
                                 if f"{key}_seconds_to_target" in r},
                                ylabel="seconds to target",
                                title=f"Time to the reference's held-out log-likelihood - {args.tolerance} nats"),
                args.out, "seconds_to_target")
    write_metrics(args.out, metrics)
    print_summary("Time to the reference's held-out log-likelihood (within the tolerance); "
                  "ratio toolkit / reference",
                  {f"{r['model'].split(' ')[0]} N={r['N']} {impl}": r[f"{prefix}_time_ratio"]
                   for r in rows for impl, prefix in TOOLKIT_ROWS.items() if f"{prefix}_time_ratio" in r})
    return metrics


if __name__ == "__main__":
    main()
