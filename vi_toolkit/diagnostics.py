"""Can this variational fit be trusted? PSIS k-hat and simulation-based calibration.

**PSIS k-hat** (Yao, Vehtari, Simpson and Gelman 2018, "Yes, but did it work?").
Draw z_s ~ q and form the importance ratios r_s = p(x, z_s) / q(z_s). Pareto-smoothed
importance sampling fits a generalized Pareto distribution to the largest ratios;
its shape k estimates how heavy the tail of r is, i.e. how badly q misses mass of the
posterior (the ratio has finite variance only for k < 1/2):

* k < 0.5: good, q is close to the posterior and importance sampling can correct it;
* 0.5 <= k <= 0.7: usable, with care;
* k > 0.7: unreliable, q is far from the posterior (too narrow, wrong shape).

For a model with global latents the ratio is joint over the whole data set; for a
model whose latents are all local (an amortized VAE, a mixture's assignments) each
data point has its own ratio p(x_i, z_i) / q(z_i | x_i) and its own k.

**Simulation-based calibration** (Talts et al. 2018; for VI: VSBC, Yao et al. 2018).
Draw theta_j ~ p(theta) and x_j ~ p(x | theta_j), fit q_j to x_j, and take L draws
theta_jl ~ q_j. For an exact posterior the rank r_j = #{l : theta_jl < theta_j} is
uniform on {0, ..., L}; a q that is too narrow piles ranks at both ends, a biased q
at one end. VSBC looks at p_j = r_j / L, whose distribution is symmetric about 1/2
when the marginal of q is right on average; asymmetry (tested by comparing p_j with
1 - p_j, Kolmogorov-Smirnov) reveals bias in the direction of the fit.
"""

import numpy as np
import pyro
import pyro.poutine as poutine
import torch

from .data import FitData
from .engine import fit
from .session import FitSession
from .traces import accepts_keyword, positive_int, trace_pair
from .weights import is_local, sample_traces

KHAT_GOOD, KHAT_OK = 0.5, 0.7


def khat_reading(khat):
    """``"good"`` (k < 0.5), ``"usable"`` (0.5 <= k <= 0.7) or ``"unreliable"`` (k > 0.7)."""
    if np.isnan(khat) or khat > KHAT_OK:
        return "unreliable"
    return "good" if khat < KHAT_GOOD else "usable"


def _psis_khat(log_w):
    """k-hat of each row of ``log_w`` (..., S) by ArviZ's ``psislw`` (r_eff = 1: iid draws)."""
    import arviz as az

    _, khat = az.psislw(np.asarray(log_w, dtype=np.float64), reff=1.0)
    return np.asarray(khat)


@torch.no_grad()
def psis_khat(result, data, *, num_samples=1000, pointwise="auto", batch_size=100, chunk_size=500,
              device=None, seed=None):
    """PSIS k-hat of a fitted guide against its model's posterior given ``data``.

    ``pointwise``: ``True`` for one k per data point (all latents local), ``False`` for
    one k of the joint ratio over all the data (in one batch), ``"auto"`` for per point
    exactly when the guide has no global latent site (per point, a joint Gaussian guide such
    as ``AutoMultivariateNormal`` is conditioned per point, as in :mod:`vi_toolkit.evaluation`).
    Returns a dict with ``khat`` (a float, or the mean over points), ``reading`` (see
    :func:`khat_reading`), and per point ``khat_points``, ``khat_max`` and
    ``fraction_unreliable``.
    """
    positive_int(num_samples, "num_samples")
    positive_int(chunk_size, "chunk_size")
    if pointwise not in (True, False, "auto"):
        raise ValueError(f"pointwise must be True, False or 'auto', got {pointwise!r}")
    session = FitSession(result, data, device)
    if seed is not None:
        pyro.set_rng_seed(seed)
    with session.scope():
        if pointwise == "auto":
            args, kwargs = session.call_args(session.data.batch(torch.arange(1, device=session.device)))
            guide_trace, _ = trace_pair(session.model, session.guide, args, kwargs)
            pointwise = not any(site["type"] == "sample" and not is_local(site)
                                for site in guide_trace.nodes.values())
        batches = (session.pointwise_batches(positive_int(batch_size, "batch_size")) if pointwise
                   else [(session.data.tensors, session.guide)])
        rows = []
        for tensors, guide in batches:
            chunks, done = [], 0
            while done < num_samples:
                k = min(chunk_size, num_samples - done)
                local, global_ = session.log_weights(tensors, k, guide)
                chunks.append(local.T if pointwise else (local.sum(1) + global_)[None])
                done += k
            rows.append(torch.cat(chunks, 1).cpu())
    khat = _psis_khat(torch.cat(rows, 0).numpy())
    if not pointwise:
        value = float(khat[0])
        return {"khat": value, "reading": khat_reading(value), "pointwise": False,
                "num_samples": num_samples}
    mean = float(khat.mean())
    return {"khat": mean, "reading": khat_reading(mean), "pointwise": True,
            "khat_points": khat, "khat_max": float(khat.max()),
            "fraction_unreliable": float((khat > KHAT_OK).mean()), "num_samples": num_samples}


def _observed_arguments(model, fit_data, args, kwargs):
    """Map each observed site of ``model`` to the index of the data tensor it observes."""
    trace = poutine.trace(model).get_trace(*args, **kwargs)
    mapping = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or site["infer"].get("_deterministic"):
            continue
        index = next((i for i, t in enumerate(fit_data.tensors) if site["value"] is t or (
            site["value"].shape == t.shape and site["value"].data_ptr() == t.data_ptr())), None)
        if index is None:
            raise ValueError(f"simulation_based_calibration: cannot tell which data tensor the "
                             f"observed site {name!r} observes (it must be passed as obs= "
                             "unchanged)")
        mapping[name] = index
    if not mapping:
        raise ValueError("simulation_based_calibration: the model has no observed site")
    return mapping


def simulation_based_calibration(model, guide, data, *, num_simulations=100, num_draws=99,
                                 sites=None, fit_kwargs=None, seed=0):
    """SBC ranks and VSBC probabilities of the global latents of a VI fit (module docstring).

    ``data`` fixes the design and shapes: each simulation draws the latents from the
    prior and the observed sites from the model, with the covariates of ``data`` kept,
    then fits the guide with ``fit(model, guide, simulated, **fit_kwargs)``.
    ``sites`` names the latents to check (default: every guide site outside the data
    plate). Returns ``{"ranks": {site: int array (num_simulations, *shape)},
    "vsbc": {site: p array}, "num_draws": L, "uniformity_pvalue": {site: chi-square
    p-value per component}, "symmetry_pvalue": {site: KS p-value of p vs 1 - p}}``.
    """
    from scipy import stats

    positive_int(num_simulations, "num_simulations")
    positive_int(num_draws, "num_draws")
    fit_kwargs = {"progress": False, **(fit_kwargs or {})}
    fit_data = FitData(data, name="data")
    num_data = fit_data.num_data if accepts_keyword(model, "num_data") else None
    args, kwargs = fit_data.call_args(fit_data.tensors, num_data)
    with pyro.get_param_store().scope(), torch.no_grad():  # leave the caller's parameters be
        observed = _observed_arguments(model, fit_data, args, kwargs)
        guide_trace, _ = trace_pair(model, guide, args, kwargs)
    if sites is None:
        sites = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not is_local(s)]
    if not sites:
        raise ValueError("simulation_based_calibration: no global latent sites to check; "
                         "name them with sites=")
    unknown = [s for s in sites if s not in guide_trace.nodes]
    if unknown:
        raise ValueError(f"sites: {unknown} are not sample sites of the guide")
    gen = torch.Generator().manual_seed(seed)
    ranks = {s: [] for s in sites}
    for j in range(num_simulations):
        pyro.set_rng_seed(int(torch.randint(2**31 - 1, (), generator=gen)))
        with pyro.get_param_store().scope(), torch.no_grad():
            prior = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
        tensors = list(fit_data.tensors)
        for name, index in observed.items():
            tensors[index] = prior.nodes[name]["value"].detach()
        simulated = (dict(zip(fit_data.keys, tensors)) if fit_data.kind == "dict"
                     else tuple(tensors) if fit_data.kind == "tuple" else tensors[0])
        result = fit(model, guide, simulated, seed=int(torch.randint(2**31 - 1, (), generator=gen)),
                     **fit_kwargs)
        session = FitSession(result, simulated, None)
        with session.scope(), torch.no_grad():
            draws, _ = sample_traces(session.model, session.guide,
                                     *session.call_args(session.data.tensors), num_draws,
                                     session.nesting)
        for s in sites:
            truth = prior.nodes[s]["value"].detach().reshape(-1)
            values = draws.nodes[s]["value"].detach().reshape(num_draws, -1)
            ranks[s].append((values < truth).sum(0).numpy())
    report = {"ranks": {}, "vsbc": {}, "num_draws": num_draws, "uniformity_pvalue": {},
              "symmetry_pvalue": {}}
    bins = max(2, min(num_draws + 1, num_simulations // 5))
    expected = np.histogram(np.arange(num_draws + 1), bins=bins, range=(-0.5, num_draws + 0.5))[0]
    expected = expected / expected.sum() * num_simulations
    for s in sites:
        r = np.stack(ranks[s])  # (num_simulations, components)
        p = r / num_draws
        report["ranks"][s], report["vsbc"][s] = r, p
        counts = [np.histogram(r[:, c], bins=bins, range=(-0.5, num_draws + 0.5))[0]
                  for c in range(r.shape[1])]
        report["uniformity_pvalue"][s] = np.array([stats.chisquare(c, expected).pvalue
                                                   for c in counts])
        report["symmetry_pvalue"][s] = np.array([stats.ks_2samp(p[:, c], 1 - p[:, c]).pvalue
                                                 for c in range(p.shape[1])])
    return report


__all__ = ["khat_reading", "psis_khat", "simulation_based_calibration"]
