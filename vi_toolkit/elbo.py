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
                   latents are summed out of the weights; guide sites without a
                   reparameterized sampler get VIMCO's score-function term (below).
* ``"stl"``        the ``"trace"`` ELBO with the sticking-the-landing gradient (Roeder et
                   al. 2017), for fully reparameterized guides (see below).
* ``"iwae-dreg"``  the ``"iwae"`` bound with doubly reparameterized gradients (Tucker et
                   al. 2018), for fully reparameterized guides (see below).
* ``"auto"``       ``"enum"`` when the model or the guide has sites marked for
                   enumeration, otherwise ``"trace"``.

Gradient estimators. With z = z(eps, phi) drawn by reparameterization, the gradient of
log w = log p_theta(x, z) - log q_phi(z | x) with respect to the guide's parameters phi has
two parts: the path derivative through z and the score term at z held fixed::

    d/dphi log w = d/dz [log p(x, z) - log q_phi(z)] dz/dphi  -  d/dphi log q_phi(z) |_z fixed.

The score term has mean zero (E_q[d/dphi log q_phi(z)] = 0) but not variance zero.
*Sticking the landing* drops it: its gradient is the path derivative alone, still unbiased,
and exactly zero when q is the exact posterior (then log p(x, z) - log q(z) = log p(x) for
every z). *DReG* applies the same idea to L_K: by the reparameterization identity
E[f(z) d/dphi log q(z)] = E[df/dz dz/dphi], the guide's gradient of L_K becomes::

    d L_K / dphi = E[ sum_k w~_k^2  d/dz_k log w_k  dz_k/dphi ],    w~_k = w_k / sum_j w_j,

while the model's gradient stays E[sum_k w~_k d/dtheta log w_k]. Plain IWAE's guide
gradient has a signal-to-noise ratio that falls as 1/sqrt(K) (Rainforth et al. 2018);
DReG's does not. Both estimators compute the score term as the gradient of the guide's
log-density replayed at the drawn values, detached (z-bar): log q_phi(z-bar) depends on phi
only, so log w + log q_phi(z-bar) has the path derivative as its phi-gradient, for guides
whose later sites depend on earlier ones too. Neither changes the value of the objective;
under ``torch.no_grad()`` (held-out evaluation) they compute the plain objective only.

A guide site that cannot be reparameterized (a discrete z) has no path derivative, and
L_K's gradient then needs the score term of the K draws, E[L_K d/dphi sum_k log q_phi(z_k)].
Plain ``"iwae"`` adds it with VIMCO's leave-one-out baselines (Mnih & Rezende 2016)::

    d L_K / dphi  ~=  d/dphi L_K |_z fixed  +  sum_k (L_K - L_K^(-k)) d/dphi log q_phi(z_k),

where L_K^(-k) replaces log w_k by the mean of the other log weights; the baseline does not
depend on z_k, so the estimate stays unbiased (:func:`vimco_signal`). Per data point when
the bound is, else for the batch; q is the draws' own density, not scaled by N/B.

The Trace and mean-field classes below compute the same estimators as Pyro's
``Trace_ELBO`` and ``TraceMeanField_ELBO``; they only avoid reading values back
to the host (``.item()``, NaN warnings) inside the step, so that a fit on a GPU
never waits for the device between steps.
"""

import math

import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

from .plates import DATA_PLATE
from .weights import (batch_size, contract_log_density, is_local, sample_traces, trace_log_densities,
                      trace_log_weights)

ELBO_NAMES = ("auto", "trace", "meanfield", "enum", "iwae", "stl", "iwae-dreg")


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


def _not_reparameterized(guide_trace):
    """The names of the guide's latent sample sites that have no reparameterized sampler."""
    return [name for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_rsample]


def _require_reparameterized(guide_trace, objective):
    """Raise ``ValueError`` naming the first guide sample site that has no reparameterized sampler."""
    names = _not_reparameterized(guide_trace)
    if names:
        name, site = names[0], guide_trace.nodes[names[0]]
        raise ValueError(f"elbo={objective!r} needs a fully reparameterized guide, but guide site "
                         f"{name!r} ({type(site['fn']).__name__}) has no reparameterized sampler "
                         "(rsample); use the plain estimator for this guide")


def vimco_signal(log_w):
    """VIMCO's learning signal L_K - L_K^(-k) of each particle k, detached (Mnih & Rezende 2016).

    ``log_w`` holds K log weights along dim 0 (and any batch dims after it).
    L_K = log 1/K sum_j w_j, and L_K^(-k) is the same bound with log w_k replaced by the
    mean of the other K - 1 log weights, a baseline that does not depend on z_k; with
    K = 1 there is no other particle and the signal is L_1 itself.
    """
    log_w = log_w.detach()
    K = log_w.shape[0]
    bound = torch.logsumexp(log_w, 0) - math.log(K)
    if K == 1:
        return bound.unsqueeze(0)
    others_mean = (log_w.sum(0, keepdim=True) - log_w) / (K - 1)
    eye = torch.eye(K, dtype=torch.bool, device=log_w.device).reshape((K, K) + (1,) * (log_w.dim() - 1))
    held_out = torch.where(eye, others_mean.unsqueeze(1), log_w.unsqueeze(0))  # [k, j]: w_j, w_k replaced
    return bound - (torch.logsumexp(held_out, 1) - math.log(K))


def _replay_fixed(guide, guide_trace):
    """``guide`` replayed at the sample values of ``guide_trace``, detached (z-bar).

    Its log-density log q_phi(z-bar) depends on the guide's parameters phi only, so its
    gradient is the score term d/dphi log q_phi(z) at the drawn z held fixed.
    """
    fixed = poutine.Trace()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            fixed.add_node(name, type="sample", is_observed=site["is_observed"],
                           value=site["value"].detach(), infer=site["infer"])
    return poutine.replay(guide, trace=fixed)


class _LossFromDifferentiable:
    """Pyro's ``loss`` and ``loss_and_grads`` (used by ``pyro.infer.SVI``) from ``differentiable_loss``."""

    def loss(self, model, guide, *args, **kwargs):
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


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


class StickingTheLanding(_LossFromDifferentiable, TraceELBO):
    """The Monte Carlo ELBO with the sticking-the-landing gradient (Roeder et al. 2017).

    Its value is :class:`TraceELBO`'s; its gradient with respect to the guide's parameters
    is the path derivative alone, E[d/dz (log p(x, z) - log q_phi(z)) dz/dphi]: the score
    term d/dphi log q_phi(z) at the drawn z, computed on the guide replayed at the drawn
    values detached, is subtracted. Needs a fully reparameterized guide (a ``ValueError``
    names the first site that is not); the gradient variance vanishes at the exact posterior.
    """

    def _get_trace(self, model, guide, args, kwargs):
        # (model, guide, fixed) triples: differentiable_loss below is their only reader
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        _require_reparameterized(guide_trace, "stl")
        fixed = None
        if torch.is_grad_enabled():
            fixed = prune_subsample_sites(
                poutine.trace(_replay_fixed(guide, guide_trace)).get_trace(*args, **kwargs))
        return model_trace, guide_trace, fixed

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = 0.0
        for model_trace, guide_trace, fixed in self._get_traces(model, guide, args, kwargs):
            elbo = _surrogate_elbo(model_trace, guide_trace, analytic_kl=False)
            if fixed is not None:  # + d/dphi log q_phi(z-bar) cancels the score term of -log q
                score = fixed.log_prob_sum(lambda name, site: not site["is_observed"])
                elbo = elbo + score - score.detach()
            loss = loss - elbo
        return loss / self.num_particles


def _batch_log_weights(traces, local, global_):
    """The log weights the bound takes its log-mean-exp of, and the factor outside it.

    ``(local, N/B)``, per data point, when every sample site of the ``(guide, model)``
    traces lies inside the data plate; otherwise the batch's joint log weights
    ``((N/B) local.sum(-1) + global_, 1)``. Applies as well to either log-density alone.
    """
    sites = [site for trace in traces for site in trace.nodes.values() if site["type"] == "sample"]
    scale = next(((f.full_size or f.size) / f.size for site in sites for f in site["cond_indep_stack"]
                  if f.name == DATA_PLATE), 1.0)
    if all(is_local(site) for site in sites):  # no global terms: a bound per data point
        return local, scale
    return scale * local.sum(-1) + global_, 1.0


class IWAE(_LossFromDifferentiable, Trace_ELBO):
    """Importance-weighted bound L_K = E[log 1/K sum_k w_k], w_k = p(x, z_k) / q(z_k | x).

    L_1 is the ELBO and L_K increases to log p(x) as K grows (Burda et al. 2016).
    The K particles are always vectorized, and discrete local latents that the model
    marks for enumeration are summed out of the weights exactly
    (:func:`vi_toolkit.weights.log_weights`). When every sample site, of the model and
    of the guide, lies inside the plate over data points (``vi_toolkit.data_plate``) the
    bound is taken per data point, (N/B) sum_i log 1/K sum_k w_ik for a minibatch of B of N points; otherwise
    the whole batch is weighted jointly, log 1/K sum_k exp((N/B) sum_i log w_ik + log
    p(theta_k) - log q(theta_k)), as Pyro's ``RenyiELBO(alpha=0)`` does. Guide sites
    without a reparameterized sampler add VIMCO's score term (module docstring).
    """

    def __init__(self, num_particles=8, max_plate_nesting=float("inf")):
        super().__init__(num_particles=num_particles, vectorize_particles=True,
                         max_plate_nesting=max_plate_nesting)

    def sample_traces(self, model, guide, args, kwargs):
        """``(guide_trace, model_trace)`` of K vectorized draws (:func:`vi_toolkit.weights.sample_traces`)."""
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        return sample_traces(model, guide, args, kwargs, self.num_particles, self.max_plate_nesting)

    def bound(self, traces):
        """``(log_w, outer, L)``: the batch's log weights, the factor outside, and the bound L_K."""
        log_w, outer = _batch_log_weights(traces, *trace_log_weights(*traces, self.num_particles))
        return log_w, outer, outer * (torch.logsumexp(log_w, 0) - math.log(self.num_particles)).sum()

    def differentiable_loss(self, model, guide, *args, **kwargs):
        traces = self.sample_traces(model, guide, args, kwargs)
        log_w, outer, bound = self.bound(traces)
        discrete = _not_reparameterized(traces[0])
        if not discrete or not torch.is_grad_enabled():
            return -bound
        local, global_ = contract_log_density(traces[0], discrete, self.num_particles, batch_size(*traces))
        log_q = local if log_w.dim() == 2 else local.sum(-1) + global_  # unscaled: the draws' density
        surrogate = outer * (vimco_signal(log_w) * log_q).sum()
        return -(bound + surrogate - surrogate.detach())


class DReG(IWAE):
    """L_K with doubly reparameterized gradients (Tucker et al. 2018).

    Its value is :class:`IWAE`'s. With self-normalized weights w~_k (held constant), the
    surrogate whose gradient it returns is::

        sum_k w~_k^2 (log w_k + log q_phi(z-bar_k))  +  (w~_k - w~_k^2) log p_theta(x, z-bar_k)

    (per data point and scaled by N/B, or jointly, as the bound): the first term carries
    the guide's gradient, sum_k w~_k^2 d/dz_k log w_k dz_k/dphi (the score term cancelled by
    log q_phi(z-bar), see the module docstring), and both terms together the model's,
    sum_k w~_k d/dtheta log p_theta(x, z_k), which is plain IWAE's. Needs a fully
    reparameterized guide (a ``ValueError`` names the first site that is not).
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        traces = self.sample_traces(model, guide, args, kwargs)
        _require_reparameterized(traces[0], "iwae-dreg")
        log_w, outer, bound = self.bound(traces)
        if not torch.is_grad_enabled():
            return -bound
        fixed = self.sample_traces(model, _replay_fixed(guide, traces[0]), args, kwargs)
        densities = trace_log_densities(*fixed, self.num_particles)
        log_p_fixed = _batch_log_weights(fixed, *densities["model"])[0]
        log_q_fixed = _batch_log_weights(fixed, *densities["guide"])[0]
        w = torch.softmax(log_w.detach(), 0)
        surrogate = outer * (w ** 2 * (log_w + log_q_fixed) + (w - w ** 2) * log_p_fixed).sum()
        return -(bound.detach() + surrogate - surrogate.detach())


def make_elbo(elbo: "str | ELBO", *, num_particles: int = 1, vectorize_particles: bool = True,
              max_plate_nesting: "int | None" = None, enumerated: bool = False) -> ELBO:
    """Build the objective named ``elbo`` (see the module docstring) or pass an ELBO through.

    Args:
        elbo: one of ``ELBO_NAMES`` or a ``pyro.infer.ELBO`` instance (returned as it is).
        num_particles: Monte Carlo particles; K for ``"iwae"`` and ``"iwae-dreg"``.
        vectorize_particles: draw the particles in one vectorized pass (the importance
            weighted objectives always do).
        max_plate_nesting: ``None`` lets Pyro find it by tracing.
        enumerated: whether the model marks sites for enumeration; ``"auto"`` then picks
            ``"enum"``.

    Returns:
        The ELBO object.

    Raises:
        ValueError: an unknown name, or ``num_particles`` not a positive integer.
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
    if elbo in ("iwae", "iwae-dreg"):
        cls = IWAE if elbo == "iwae" else DReG
        return cls(num_particles=num_particles, max_plate_nesting=nesting)
    cls = {"trace": TraceELBO, "meanfield": TraceMeanFieldELBO, "enum": TraceEnum_ELBO,
           "stl": StickingTheLanding}[elbo]
    return cls(num_particles=num_particles, vectorize_particles=vectorize,
               max_plate_nesting=nesting)


__all__ = ["DReG", "ELBO_NAMES", "IWAE", "StickingTheLanding", "TraceELBO", "TraceMeanFieldELBO",
           "make_elbo", "vimco_signal"]
