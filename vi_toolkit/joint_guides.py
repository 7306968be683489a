"""Guides whose per-point latents live inside one joint site, and their per-point conditionals.

Per-point evaluation (:mod:`vi_toolkit.evaluation`) needs the guide to factor as
q(theta) prod_i q(z_i | x_i, theta), with the density of z_i inside the plate over data
points: the per-point log weight is then

    log w_ik = log p(x_i, z_ik | theta_k) - log q(z_ik | x_i, theta_k).

A joint guide such as Pyro's ``AutoMultivariateNormal`` draws instead one vector u of
every latent, unconstrained, from a single site outside the data plate,

    u = (u_G, u_1, ..., u_N) ~ N(m, S),      theta = T_G(u_G),  z_i = T_i(u_i),

and places its slices at the model's sites as point masses (``Delta``). The whole of
log q then sits in the global term and the per-point weights lack it: taken as they
are, they are log p(x_i, z_ik | theta_k) alone, a wrong number (on z_i ~ N(0, 1),
x_i ~ N(z_i, 1) the "IWAE" fell a nat below the fit's own ELBO). :func:`joint_local_sites`
finds such sites, from the dependence of their values on the draws (by autograd).

For a Gaussian joint q (``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``,
``AutoDiagonalNormal``) the marginal of q over (u_G, u_i) factors into the Gaussian
marginal and conditional (Bishop 2006, *Pattern Recognition and Machine Learning*,
eqs. 2.81-2.82 and 2.92-2.93):

    q(u_G)        = N(m_G, S_GG)
    q(u_i | u_G)  = N(m_i + S_iG S_GG^-1 (u_G - m_G),  S_ii - S_iG S_GG^-1 S_Gi)

and with the Jacobians of the bijections T (as in the autoguide itself) these give
q(theta) and q(z_i | theta), the per-point proposal :class:`GaussianConditionals`
draws from. The estimates are then those of a factorized guide: the ELBO of point i
under the marginal q(theta, z_i), and the IWAE bound of log E_q(theta)[p(x_i | theta)].
The joint q covers the points it was fitted to, so this evaluates the fit's own data.
"""

import contextlib

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous
from torch.distributions import biject_to

from .plates import DATA_PLATE


def _in_plate(site, data_plate):
    return any(f.name == data_plate for f in site["cond_indep_stack"])


def joint_local_sites(guide_trace, model_trace, data_plate: str = DATA_PLATE) -> list:
    """The model's local latent sites that the guide draws from a joint site outside the data plate.

    A site is joint when the guide gives it a point mass (``Delta``) whose value depends
    on a draw outside the data plate that the model does not have (an auxiliary site) and
    on no draw inside the data plate: its density is then not per point (see the module).

    Args:
        guide_trace: the guide's trace, recorded with gradients enabled.
        model_trace: the model's trace replayed against it.
        data_plate: the name of the plate over data points.

    Returns:
        The names of those sites, in the guide's order (empty for a factorized guide).
    """
    sites = [(n, s) for n, s in guide_trace.nodes.items() if s["type"] == "sample"]
    model_latent = {n for n, s in model_trace.nodes.items()
                    if s["type"] == "sample" and not s["is_observed"]}
    auxiliary = [s["value"] for n, s in sites if n not in model_trace.nodes
                 and not _in_plate(s, data_plate) and s["value"].requires_grad]
    local_draws = [s["value"] for n, s in sites if _in_plate(s, data_plate)
                   and not isinstance(s["fn"], dist.Delta) and s["value"].requires_grad]
    if not auxiliary:
        return []
    joint = []
    for name, site in sites:
        if (name not in model_latent or not _in_plate(site, data_plate)
                or not isinstance(site["fn"], dist.Delta) or not site["value"].requires_grad):
            continue
        grads = torch.autograd.grad(site["value"].sum(), auxiliary + local_draws,
                                    allow_unused=True, retain_graph=True)
        on_auxiliary = any(g is not None for g in grads[:len(auxiliary)])
        on_local = any(g is not None for g in grads[len(auxiliary):])
        if on_auxiliary and not on_local:
            joint.append(name)
    return joint


def gaussian_moments(posterior):
    """(mean, covariance) of a Gaussian over a vector, or None for any other distribution."""
    if isinstance(posterior, (dist.MultivariateNormal, dist.LowRankMultivariateNormal)):
        return posterior.loc, posterior.covariance_matrix
    if (isinstance(posterior, torch.distributions.Independent)
            and isinstance(posterior.base_dist, torch.distributions.Normal)
            and posterior.reinterpreted_batch_ndims == 1):
        return posterior.mean, torch.diag_embed(posterior.variance)
    return None


class GaussianConditionals:
    """A guide drawing q(theta) and q(z_i | theta) from a Gaussian joint autoguide (module).

    Called like the model, inside the plate over vectorized draws, it samples the
    unconstrained global latents u_G outside the data plate and each point's u_i inside
    it (two auxiliary sites) and places T(u) at the model's sites as point masses
    carrying the log-Jacobians, so that the per-point log weights are those of
    q(z_i | theta) for the points ``index`` of the data the joint q was fitted to.

    Args:
        guide: the fitted ``AutoContinuous`` guide (its parameters active).
        index: the positions of the batch's points in the fitted data (a LongTensor).
        args, kwargs: the model's arguments, for ``guide.get_posterior``.
        data_plate: the name of the plate over data points.

    Raises:
        ValueError: the guide's joint q is not Gaussian, or a latent site is subsampled or
            lacks the data plate's dimension.
    """

    def __init__(self, guide, index, args, kwargs, data_plate: str = DATA_PLATE):
        name = type(guide).__name__
        moments = (gaussian_moments(guide.get_posterior(*args, **kwargs))
                   if isinstance(guide, AutoContinuous) else None)
        if moments is None:
            raise ValueError(
                f"the guide {name} draws the data points' latents as slices of one joint latent "
                "outside the data plate, so it has no per-point density q(z_i | x_i) and "
                "per-point estimates would be wrong. Only a Gaussian joint q "
                "(AutoMultivariateNormal, AutoLowRankMultivariateNormal, AutoDiagonalNormal) "
                "can be conditioned per point; use one of those or a guide that factorizes over "
                "data points (AutoNormal, an encoder)")
        mean, cov = moments[0].detach(), moments[1].detach().double()  # conditioning in float64
        self.index, self.data_plate = index, data_plate
        self.sites, self.frames = [], {}
        global_cols, local_cols, pos, size = [], [], 0, None
        for site_name, site in guide.prototype_trace.iter_stochastic_nodes():
            unconstrained = biject_to(site["fn"].support).inv(site["value"])
            shape = tuple(unconstrained.shape)
            event = site["fn"].event_dim + len(shape) - site["value"].dim()
            cols = torch.arange(pos, pos + unconstrained.numel(), device=mean.device).reshape(shape)
            pos += unconstrained.numel()
            frame = next((f for f in site["cond_indep_stack"] if f.name == data_plate), None)
            for f in site["cond_indep_stack"]:
                if f.size != (f.full_size or f.size):
                    raise ValueError(f"site {site_name!r}: the guide {name} was fitted on a "
                                     f"subsample of plate {f.name!r}; its joint latent does not "
                                     "cover the data")
                self.frames[f.name] = f
            if frame is None:
                self.sites.append((site_name, site, shape, event, None, sum(map(len, global_cols))))
                global_cols.append(cols.reshape(-1))
                continue
            axis = len(shape) - event + frame.dim
            if axis < 0 or (size is not None and shape[axis] != size):
                raise ValueError(f"site {site_name!r} of the guide {name} does not span the "
                                 f"data plate {data_plate!r} (shape {shape})")
            size = shape[axis]
            per_point = cols.movedim(axis, 0).reshape(size, -1)
            offset = sum(c.shape[1] for c in local_cols)
            self.sites.append((site_name, site, shape, event, axis, offset))
            local_cols.append(per_point)
        g = (torch.cat(global_cols) if global_cols
             else torch.zeros(0, dtype=torch.long, device=mean.device))
        rows = torch.cat(local_cols, 1)[index]                       # (B, m)
        self.m_g, self.m_l = mean[g], mean[rows]
        s_lg = cov[rows[:, :, None], g]                               # (B, m, g)
        s_ll = cov[rows[:, :, None], rows[:, None, :]]                # (B, m, m)
        self.num_global = g.numel()
        if self.num_global:
            s_gg = cov[g[:, None], g]
            gain = torch.linalg.solve(s_gg, s_lg.transpose(-1, -2)).transpose(-1, -2)
            s_ll = s_ll - gain @ s_lg.transpose(-1, -2)
            self.scale_g = torch.linalg.cholesky(s_gg).to(mean.dtype)
            self.gain = gain.to(mean.dtype)
        self.scale_l = torch.linalg.cholesky(s_ll).to(mean.dtype)

    def __call__(self, *args, **kwargs):
        plates = {name: pyro.plate(name, f.size, dim=f.dim,
                                   subsample=self.index if name == self.data_plate else None)
                  for name, f in self.frames.items()}
        frame = self.frames[self.data_plate]
        batch = self.index.numel()
        points = (batch,) + (1,) * (-frame.dim - 1)                 # B at the data plate's dim
        loc = self.m_l                                                # (B, m)
        if self.num_global:
            u_g = pyro.sample("_global_unconstrained", dist.MultivariateNormal(
                self.m_g, scale_tril=self.scale_g), infer={"is_auxiliary": True})
            draws = u_g.reshape(-1, self.num_global)                 # (K, g)
            loc = loc + torch.einsum("bmg,kg->kbm", self.gain, draws - self.m_g)
            between = (1,) * (u_g.dim() - 2 + frame.dim)              # plates left of the data's
            loc = loc.reshape(loc.shape[:1] + between + points + loc.shape[-1:])
        else:
            loc = loc.reshape(points + loc.shape[-1:])
        scale = self.scale_l.reshape(points + self.scale_l.shape[-2:])
        with plates[self.data_plate]:
            u_l = pyro.sample("_local_unconstrained", dist.MultivariateNormal(loc, scale_tril=scale),
                              infer={"is_auxiliary": True})
        nesting = u_l.dim() - 2                                       # the plates' batch dims
        lead = u_l[..., 0].numel() // batch                          # K, the vectorized draws
        u_l = u_l.reshape(lead, batch, -1)
        values = {}
        for name, site, shape, event, axis, offset in self.sites:
            if axis is None:
                size = int(torch.Size(shape).numel())
                u = u_g.reshape(lead, -1)[:, offset:offset + size].reshape((lead,) + shape)
            else:
                rest = shape[:axis] + shape[axis + 1:]
                width = int(torch.Size(rest).numel())
                u = u_l[:, :, offset:offset + width].reshape((lead, batch) + rest).movedim(1, 1 + axis)
            u = u.reshape((lead,) + (1,) * (nesting - (len(shape) - event)) + u.shape[1:])
            transform = biject_to(site["fn"].support)
            value = transform(u)
            log_density = transform.inv.log_abs_det_jacobian(value, u)
            log_density = sum_rightmost(log_density, log_density.dim() - value.dim()
                                        + site["fn"].event_dim)
            with contextlib.ExitStack() as stack:
                for f in site["cond_indep_stack"]:
                    stack.enter_context(plates[f.name])
                values[name] = pyro.sample(name, dist.Delta(value, log_density=log_density,
                                                            event_dim=site["fn"].event_dim))
        return values
