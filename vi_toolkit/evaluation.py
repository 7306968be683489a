"""Held-out evaluation of a fitted model and guide, per data point.

For a model p(x, z, theta) with global latents theta (possibly none: a VAE's
weights are parameters, not latents), local latents z_i and a guide
q(theta) prod_i q(z_i | x_i, theta), draw K joint samples (theta_k, z_ik) from
the guide and form the per-point log importance weights

    log w_ik = log p(x_i, z_ik | theta_k) - log q(z_ik | x_i, theta_k).

Discrete local latents that the model marks for enumeration (``infer={"enumerate":
"parallel"}``, as a Gaussian mixture's assignments or an HMM's states) are summed
out exactly inside p(x_i, z_ik | theta_k), by variable elimination over Pyro's
packed tensors, so they never enter the importance weights.

* The held-out **ELBO** of point i is E_q[log w_i] ~ 1/K sum_k log w_ik.
* The **importance-sampled log-likelihood** of point i is
  log 1/K sum_k w_ik, the IWAE bound L_K (Burda et al. 2016): E[L_K] <= log p(x_i),
  increasing in K and tending to log p(x_i) as K grows.

With no global latents these bound log p(x_i) itself. With global latents, theta_k
is drawn from the fitted q(theta) and the estimates are of the predictive density
log E_q(theta)[p(x_i | theta)] of a new point; the global term
log p(theta) - log q(theta) belongs to the fit, not to held-out points, and is left out.

A guide whose per-point latents live inside one joint site outside the data plate
(``AutoMultivariateNormal``) has no factor q(z_i | x_i, theta): its per-point weights
would lack log q altogether. Such a Gaussian guide is evaluated through its per-point
conditionals q(theta) q(z_i | theta) on the data it was fitted to
(:mod:`vi_toolkit.joint_guides`); any other joint guide is refused with a ``ValueError``.

Both come out of one pass that is batched over data points (``batch_size``) and
chunked over samples (``chunk_size``), with sum_k log w and log-sum-exp_k log w
accumulated across chunks, all vectorized on the device the fit ran on. Memory grows
with ``batch_size * chunk_size``, not with K. For a 784-400-20 VAE on two AMD CPU cores,
K = 5000 runs at about 150,000 images x samples per second (10,000 Fashion-MNIST test
images in about 5.5 minutes; ``benchmarks/iwae_throughput.py``); a GPU runs each chunk
of 500 x 100 decoder passes as one batch.
"""

import inspect
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites

from .data import FitData
from .devices import resolve_device
from .session import FitSession
from .traces import positive_int
from .weights import is_local

@torch.no_grad()
def pointwise_estimates(result, data, *, num_samples=5000, batch_size=100, chunk_size=500,
                        device=None, seed=None):
    """Per-point ELBO and IWAE log-likelihood of ``data`` under a fit, in one pass.

    Returns a dict of CPU tensors of shape (N,): ``elbo`` = 1/K sum_k log w_ik and
    ``log_likelihood`` = log 1/K sum_k w_ik (see the module docstring), from the same
    K = ``num_samples`` guide draws, ``chunk_size`` of them at a time for
    ``batch_size`` points at a time.
    """
    positive_int(num_samples, "num_samples")
    positive_int(batch_size, "batch_size")
    positive_int(chunk_size, "chunk_size")
    session = FitSession(result, data, device)
    if seed is not None:
        pyro.set_rng_seed(seed)
    elbos, lls = [], []
    with session.scope():
        for tensors, guide in session.pointwise_batches(batch_size):
            elbo, ll = session.estimates(tensors, num_samples, chunk_size, guide)
            elbos.append(elbo.cpu())
            lls.append(ll.cpu())
    return {"elbo": torch.cat(elbos), "log_likelihood": torch.cat(lls)}


def elbo_per_point(result, data, *, num_samples=100, batch_size=100, chunk_size=500, device=None,
                   seed=None):
    """Held-out ELBO of each point, 1/K sum_k log w_ik, as a tensor of shape (N,)."""
    return pointwise_estimates(result, data, num_samples=num_samples, batch_size=batch_size,
                               chunk_size=chunk_size, device=device, seed=seed)["elbo"]


def log_likelihood_per_point(result, data, *, num_samples=5000, batch_size=100, chunk_size=500,
                             device=None, seed=None):
    """IWAE estimate log 1/K sum_k w_ik of log p(x_i) for each point, shape (N,)."""
    return pointwise_estimates(result, data, num_samples=num_samples, batch_size=batch_size,
                               chunk_size=chunk_size, device=device, seed=seed)["log_likelihood"]


def _mean_se(values):
    values = values.double()
    se = values.std() / math.sqrt(values.numel()) if values.numel() > 1 else float("nan")
    return float(values.mean()), float(se)


def exact_log_likelihood(exact, result, tensors):
    """The exact log p(x_i) of each point of the data's ``tensors``, shape (N,), from ``exact``:

    * a classic model (``vi_toolkit.models.gmm.GaussianMixture``, ``vi_toolkit.models.hmm.HiddenMarkovModel``,
      ``vi_toolkit.models.ppca.PPCA``: an object with ``log_likelihood(*tensors, params)``) is evaluated
      at the fit's point estimate, ``params = result.guide.point_estimate(result)``: the
      marginal log p(x_i | theta_hat) with the local latents summed out in closed form (a
      mixture's log sum_k w_k N(x_i | mu_k, Sigma_k), an HMM's forward algorithm, PPCA's
      log N(x_i | mu, W W^T + sigma^2 I)). The IWAE estimate converges to exactly this when
      q(theta) is a point mass (MAP guides) or the model has no global latents (PPCA); for
      a mean-field q(theta) it estimates log E_q[p(x_i | theta)] instead, a different number;
    * a callable is called as ``exact(*tensors)``.

    Either runs inside the fit's parameter scope, without gradients.
    """
    if hasattr(exact, "log_likelihood"):
        point_estimate = getattr(result.guide, "point_estimate", None)
        if point_estimate is None:
            raise ValueError(f"exact: {exact!r} is evaluated at the fit's point estimate, but "
                             f"the guide {type(result.guide).__name__} has no point_estimate(result)")
        params = point_estimate(result)
        try:
            inspect.signature(exact.log_likelihood).bind(*tensors, params)
        except TypeError as err:
            raise ValueError(f"exact: {exact!r}.log_likelihood does not take the data's "
                             f"{len(tensors)} tensors and params ({err}); pass a callable of "
                             "the data's tensors instead") from err

        def fn(*tensors):
            return exact.log_likelihood(*tensors, params)
    elif callable(exact):
        fn = exact
    else:
        raise ValueError("exact must be a callable of the data's tensors or a model with "
                         f"log_likelihood(*data, params), got {type(exact).__name__}")
    with result.scope(), torch.no_grad():
        values = torch.as_tensor(fn(*tensors)).detach().cpu().reshape(-1)
    if values.numel() != len(tensors[0]):
        raise ValueError(f"exact returned {values.numel()} values for {len(tensors[0])} data points")
    return values


def evaluate(result, data, *, num_samples=5000, batch_size=100, chunk_size=500, exact=None,
             device=None, seed=None):
    """Held-out ELBO and IWAE log-likelihood per data point, averaged, with standard errors.

    ``exact``, if given, adds the mean exact log p(x_i) (``exact``, ``exact_se``) and its
    gap to the IWAE estimate (``exact_minus_iwae``, >= 0 up to Monte Carlo error): a
    classic model evaluated at the fit's point estimate, as in
    ``evaluate(result, x_test, exact=mixture)`` for ``result, guide = fit_gmm(mixture, x)``,
    or a callable of the data's tensors (see :func:`exact_log_likelihood`).
    """
    estimates = pointwise_estimates(result, data, num_samples=num_samples, batch_size=batch_size,
                                    chunk_size=chunk_size, device=device, seed=seed)
    elbo, elbo_se = _mean_se(estimates["elbo"])
    ll, ll_se = _mean_se(estimates["log_likelihood"])
    report = {"num_data": int(estimates["elbo"].numel()), "num_samples": num_samples,
              "elbo": elbo, "elbo_se": elbo_se, "iwae": ll, "iwae_se": ll_se}
    if exact is not None:
        fit_data = FitData(data, device=resolve_device(device) if device else result.device)
        report["exact"], report["exact_se"] = _mean_se(
            exact_log_likelihood(exact, result, fit_data.tensors))
        report["exact_minus_iwae"] = report["exact"] - ll
    return report


class _Override(Messenger):
    """Replace the distribution of one sample site by ``fn`` (a refined local guide)."""

    def __init__(self, site, fn):
        super().__init__()
        self.site, self.fn = site, fn

    def _pyro_sample(self, msg):
        if msg["name"] == self.site:
            msg["fn"] = self.fn


def _normal_parts(fn, site):
    """(loc, scale, reinterpreted event dims) of a Normal or Independent(Normal) site."""
    event = 0
    while isinstance(fn, (dist.Independent, torch.distributions.Independent)):
        event += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    if not isinstance(fn, torch.distributions.Normal):
        raise ValueError(f"site: the guide's distribution at {site!r} is "
                         f"{type(fn).__name__}; the refinement needs a (diagonal) Normal")
    return fn.loc, fn.scale, event


def inference_gaps(result, data, *, site=None, refine_steps=300, lr=0.02, num_particles=8,
                   elbo_samples=1000, num_samples=5000, batch_size=100, chunk_size=500,
                   exact=None, device=None, seed=None):
    """The approximation and amortization gaps of an amortized guide (Cremer et al. 2018).

    For each point, q = q(z_i | x_i) is the encoder's Gaussian and q* the best Gaussian
    of the same (diagonal) family for that point alone, found by ``refine_steps`` Adam
    steps on its own (mu_i, log sigma_i), initialised at the encoder's output, maximising
    the ELBO with ``num_particles`` reparameterized draws, the learning rate ``lr``
    decaying to zero on a cosine (so the last iterate is not left jittering at the
    noise floor of the gradient); the model is fixed. Then

        log p(x_i) - L[q]  =  (log p(x_i) - L[q*])  +  (L[q*] - L[q])
        inference gap         approximation gap      amortization gap

    where L is the ELBO (``elbo_samples`` draws) and log p(x_i) is exact if ``exact`` is
    given (a classic model or a callable, see :func:`exact_log_likelihood`), else the IWAE
    estimate with ``num_samples`` draws from q* (a lower bound: then the approximation gap
    is underestimated by its slack).
    ``site`` names the local latent (default: the guide's only site in the data plate).
    Returns per-point tensors (N,) under ``points`` and their means at the top level.
    """
    for value, name in ((refine_steps, "refine_steps"), (num_particles, "num_particles"),
                        (elbo_samples, "elbo_samples"), (num_samples, "num_samples"),
                        (batch_size, "batch_size"), (chunk_size, "chunk_size")):
        positive_int(value, name)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    session = FitSession(result, data, device)
    session.require_factorized("inference_gaps")
    if seed is not None:
        pyro.set_rng_seed(seed)
    points = {k: [] for k in ("log_px", "elbo_q_star", "elbo_q")}
    with session.scope():
        for tensors in session.data.batches(batch_size):
            args, kwargs = session.call_args(tensors)
            with torch.no_grad(), session.device_context():
                guide_trace = prune_subsample_sites(
                    poutine.trace(session.guide).get_trace(*args, **kwargs))
            local_sites = [n for n, s in guide_trace.nodes.items()
                           if s["type"] == "sample" and is_local(s)]
            name = site if site is not None else (local_sites[0] if len(local_sites) == 1 else None)
            if name not in local_sites:
                raise ValueError(f"site must name one of the guide's local latent sites "
                                 f"{local_sites}, got {site!r}")
            loc, scale, event = _normal_parts(guide_trace.nodes[name]["fn"], name)
            mu = loc.detach().clone().requires_grad_()
            log_sigma = scale.detach().log().clone().requires_grad_()

            def refined():
                return dist.Normal(mu, log_sigma.exp()).to_event(event)

            override = _Override(name, None)
            guide_star = override(session.guide)
            optim = torch.optim.Adam([mu, log_sigma], lr=lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, refine_steps)
            with torch.enable_grad():
                for _ in range(refine_steps):
                    override.fn = refined()
                    local, _ = session.log_weights(tensors, num_particles, guide_star)
                    loss = -local.mean(0).sum()
                    mu.grad, log_sigma.grad = torch.autograd.grad(loss, [mu, log_sigma])
                    optim.step()
                    schedule.step()
            with torch.no_grad():
                override.fn = refined()
                elbo_q, _ = session.estimates(tensors, elbo_samples, chunk_size)
                elbo_star, _ = session.estimates(tensors, elbo_samples, chunk_size, guide_star)
                if exact is None:
                    _, log_px = session.estimates(tensors, num_samples, chunk_size, guide_star)
                else:
                    log_px = exact_log_likelihood(exact, result, tensors)
            points["elbo_q"].append(elbo_q.cpu())
            points["elbo_q_star"].append(elbo_star.cpu())
            points["log_px"].append(log_px.detach().cpu())
    points = {k: torch.cat(v) for k, v in points.items()}
    points["approximation_gap"] = points["log_px"] - points["elbo_q_star"]
    points["amortization_gap"] = points["elbo_q_star"] - points["elbo_q"]
    points["inference_gap"] = points["log_px"] - points["elbo_q"]
    report = {k: float(v.double().mean()) for k, v in points.items()}
    report.update(points=points, exact=exact is not None, refine_steps=refine_steps)
    return report
