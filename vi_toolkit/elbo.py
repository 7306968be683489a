"""Variational objectives, chosen by name.

For a model p(x, z) and a guide q(z | x) every objective here is a stochastic
estimate of a lower bound on log p(x):

* ``"trace"``      ELBO = E_q[log p(x, z) - log q(z | x)], Monte Carlo over z.
* ``"meanfield"``  ELBO = E_q[log p(x | z)] - KL(q(z | x) || p(z)), with the KL term
                   in closed form wherever torch knows it (the lecture's analytic KL).
* ``"enum"``       the ELBO with discrete latent sites marked ``infer={"enumerate": ...}``
                   summed out exactly (Pyro's ``TraceEnum_ELBO``).
* ``"iwae"``       the importance-weighted bound (Burda et al. 2016) with K particles,
                   L_K = E[log 1/K sum_k p(x, z_k) / q(z_k | x)]; per data point when
                   every sample site is local to the data plate, else for the whole
                   batch jointly (the Renyi bound with alpha = 0); enumerated discrete
                   latents are summed out of the weights.
* ``"auto"``       ``"enum"`` when the model or the guide has sites marked for
                   enumeration, otherwise ``"trace"``.

The Trace and mean-field classes below compute the same estimators as Pyro's
``Trace_ELBO`` and ``TraceMeanField_ELBO``; they only avoid reading values back
to the host (``.item()``, NaN warnings) inside the step, so that a fit on a GPU
never waits for the device between steps.
"""

import math

import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from torch.distributions import kl_divergence

from .plates import DATA_PLATE
from .weights import is_local, sample_traces, trace_log_weights

ELBO_NAMES = ("auto", "trace", "meanfield", "enum", "iwae")


def _surrogate_elbo(model_trace, guide_trace, analytic_kl):
    """Differentiable ELBO of one (vectorized) particle whose value is the estimate.

    Reparameterized sites contribute log p - log q directly; the KL term of a latent
    site is taken in closed form when ``analytic_kl`` and torch implements it; sites
    that cannot be reparameterized add the score-function (REINFORCE) surrogate
    log_r * log q, whose value is subtracted again so only its gradient remains.
    """
    elbo = 0.0
    surrogate = 0.0
    log_r = None
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        guide_site = guide_trace.nodes.get(name)
        if analytic_kl and not site["is_observed"] and guide_site is not None:
            try:
                kl = kl_divergence(guide_site["fn"], site["fn"])
            except NotImplementedError:
                kl = None
            if kl is not None:
                kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
                kl_sum = kl.sum() if torch.is_tensor(kl) else kl
                elbo = elbo - kl_sum
                continue
        elbo = elbo + site["log_prob_sum"]
        if guide_site is not None:
            elbo = elbo - guide_site["log_prob_sum"]
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if name not in model_trace.nodes:  # auxiliary guide site
            elbo = elbo - site["log_prob_sum"]
        score_function_term = site["score_parts"].score_function
        if not is_identically_zero(score_function_term):
            if log_r is None:
                log_r = _compute_log_r(model_trace, guide_trace)
            term = (log_r.sum_to(site["cond_indep_stack"]) * score_function_term).sum()
            surrogate = surrogate + term - term.detach()
    return elbo + surrogate


class TraceELBO(Trace_ELBO):
    """Monte Carlo ELBO, E_q[log p(x, z) - log q(z)], without host synchronisation."""

    analytic_kl = False

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss - _surrogate_elbo(model_trace, guide_trace, self.analytic_kl)
        return loss / self.num_particles


class TraceMeanFieldELBO(TraceELBO):
    """ELBO = E_q[log p(x | z)] - KL(q || p) with the KL in closed form where known."""

    analytic_kl = True


class IWAE(Trace_ELBO):
    """Importance-weighted bound L_K = E[log 1/K sum_k w_k], w_k = p(x, z_k) / q(z_k | x).

    L_1 is the ELBO and L_K increases to log p(x) as K grows (Burda et al. 2016).
    The K particles are always vectorized, and discrete local latents that the model
    marks for enumeration are summed out of the weights exactly
    (:func:`vi_toolkit.weights.log_weights`). When every sample site, of the model and
    of the guide, lies inside the plate over data points (``vi_toolkit.data_plate``) the
    bound is taken per data point, (N/B) sum_i log 1/K sum_k w_ik for a minibatch of B of N points; otherwise
    the whole batch is weighted jointly, log 1/K sum_k exp((N/B) sum_i log w_ik + log
    p(theta_k) - log q(theta_k)), as Pyro's ``RenyiELBO(alpha=0)`` does.
    """

    def __init__(self, num_particles=8, max_plate_nesting=float("inf")):
        super().__init__(num_particles=num_particles, vectorize_particles=True,
                         max_plate_nesting=max_plate_nesting)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        K = self.num_particles
        guide_trace, model_trace = sample_traces(model, guide, args, kwargs, K, self.max_plate_nesting)
        sites = [site for trace in (guide_trace, model_trace) for site in trace.nodes.values()
                 if site["type"] == "sample"]
        scale = next(((f.full_size or f.size) / f.size for site in sites for f in site["cond_indep_stack"]
                      if f.name == DATA_PLATE), 1.0)
        local, global_ = trace_log_weights(guide_trace, model_trace, K)
        if all(is_local(site) for site in sites):  # no global terms: a bound per data point
            return -scale * (torch.logsumexp(local, 0) - math.log(K)).sum()
        return -(torch.logsumexp(scale * local.sum(-1) + global_, 0) - math.log(K))

    def loss(self, model, guide, *args, **kwargs):
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


def make_elbo(elbo, *, num_particles=1, vectorize_particles=True, max_plate_nesting=None,
              enumerated=False):
    """Build the objective named ``elbo`` (see the module docstring) or pass an ELBO through.

    ``enumerated`` says whether the model marks sites for enumeration; ``"auto"``
    then picks ``"enum"``. ``max_plate_nesting=None`` lets Pyro find it by tracing.
    """
    if isinstance(elbo, ELBO):
        return elbo
    if not isinstance(elbo, str) or elbo not in ELBO_NAMES:
        raise ValueError(f"unknown elbo {elbo!r}: use one of {', '.join(ELBO_NAMES)} "
                         "or a pyro.infer.ELBO instance")
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    if elbo == "auto":
        elbo = "enum" if enumerated else "trace"
    nesting = float("inf") if max_plate_nesting is None else max_plate_nesting
    vectorize = bool(vectorize_particles) and num_particles > 1
    if elbo == "iwae":
        return IWAE(num_particles=num_particles, max_plate_nesting=nesting)
    cls = {"trace": TraceELBO, "meanfield": TraceMeanFieldELBO, "enum": TraceEnum_ELBO}[elbo]
    return cls(num_particles=num_particles, vectorize_particles=vectorize,
               max_plate_nesting=nesting)


__all__ = ["ELBO_NAMES", "IWAE", "TraceELBO", "TraceMeanFieldELBO", "make_elbo"]
