"""Log importance weights of vectorized guide draws, per data point and global.

For a model p(x, z, theta) and a guide q(theta) prod_i q(z_i | x_i, theta), K joint draws
(theta_k, z_ik) of the guide, taken in one vectorized pass along a plate of size K, give

    local_ik  = log p(x_i, z_ik | theta_k) - log q(z_ik | x_i, theta_k)      (K, B)
    global_k  = log p(theta_k) - log q(theta_k)                              (K,)

so that the log weight of the whole batch is sum_i local_ik + global_k. Discrete local
latents that the model marks for enumeration (a mixture's assignments, an HMM's states)
are summed out of p(x_i, z_ik | theta_k) exactly, by variable elimination over Pyro's
packed tensors. The IWAE objective (:mod:`vi_toolkit.elbo`) and the held-out estimates
(:mod:`vi_toolkit.evaluation`) are both built on :func:`log_weights`.
"""

from collections import OrderedDict

import pyro
import pyro.poutine as poutine
import torch
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.util import prune_subsample_sites

from .plates import DATA_PLATE

PARTICLE_PLATE = "_samples"  # the plate over vectorized guide samples


def sample_traces(model, guide, args, kwargs, num_samples, max_plate_nesting):
    """Guide and model traces for ``num_samples`` joint draws, vectorized in one pass.

    The draws run along a plate named ``"_samples"`` at dim ``-(max_plate_nesting + 1)``;
    the model is replayed against the guide and its sites marked for enumeration are
    enumerated to the left of it. Subsample sites are pruned.
    """
    dim = -(max_plate_nesting + 1)
    guide_trace = poutine.trace(pyro.plate(PARTICLE_PLATE, num_samples, dim=dim)(guide)).get_trace(
        *args, **kwargs)
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and site["infer"].get("enumerate"):
            raise ValueError(f"guide site {name!r} is marked for enumeration; evaluation "
                             "enumerates discrete latents in the model only")
    model_fn = poutine.replay(pyro.plate(PARTICLE_PLATE, num_samples, dim=dim)(model),
                              trace=guide_trace)
    model_fn = poutine.enum(model_fn, first_available_dim=dim - 1)
    model_trace = poutine.trace(model_fn).get_trace(*args, **kwargs)
    return prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)


def is_local(site, data_plate=DATA_PLATE):
    """Whether a sample site lies inside the plate over data points."""
    return any(f.name == data_plate for f in site["cond_indep_stack"])


def _align(tensor, symbols, shape):
    """A packed tensor whose dims are among ``symbols``, as a plain tensor of ``shape``."""
    dims = tensor._pyro_dims
    present = [s for s in symbols if s in dims]
    tensor = tensor.permute([dims.index(s) for s in present])
    return tensor.reshape([tensor.shape[present.index(s)] if s in present else 1
                           for s in symbols]).expand(shape)


def contract_log_density(trace, names, num_samples, num_points, *, data_plate=DATA_PLATE):
    """Sum of the log-densities of the sites ``names`` of a packed ``trace``, per sample and point.

    Returns ``(local, global_)``: ``local`` of shape (K, B) holds the terms inside the
    data plate, with enumerated discrete sites summed out (log-sum-exp over their values,
    by variable elimination, so an HMM's chain costs O(T S^2)) and inner plates summed;
    ``global_`` of shape (K,) the terms outside it. Log-densities are unscaled: a
    minibatch's N/B is not applied. ``trace`` must have had ``compute_log_prob`` and
    ``pack_tensors`` called.
    """
    symbols = trace.plate_to_symbol
    sample_sym, data_sym = symbols[PARTICLE_PLATE], symbols.get(data_plate)
    plate_syms = set(symbols.values())
    trees = {True: OrderedDict(), False: OrderedDict()}
    sum_dims = {True: set(), False: set()}
    sizes = {sample_sym: num_samples}
    if data_sym is not None:
        sizes[data_sym] = num_points
    for name in names:
        site = trace.nodes[name]
        ordinal = frozenset(symbols[f.name] for f in site["cond_indep_stack"] if f.vectorized)
        term = packed.scale_and_mask(site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"])
        local = data_sym is not None and data_sym in ordinal
        trees[local].setdefault(ordinal, []).append(term)
        sizes.update(zip(term._pyro_dims, term.shape))
        sum_dims[local].update(set(term._pyro_dims) - plate_syms)
    if sum_dims[False]:
        raise ValueError("a discrete latent outside the data plate is marked for enumeration; "
                         "it couples every data point, so per-point log-densities do not exist")
    shape_kb, shape_k = (num_samples, num_points), (num_samples,)
    like = next((trace.nodes[name]["packed"]["unscaled_log_prob"] for name in names), torch.zeros(()))
    local = like.new_zeros(shape_kb)  # the terms' dtype and device, also where there are none
    if trees[True]:
        local = _align(contract_to_tensor(trees[True], sum_dims[True],
                                          target_ordinal=frozenset({sample_sym, data_sym}),
                                          ring=LogRing(dim_to_size=sizes)),
                       (sample_sym, data_sym), shape_kb)
    global_ = like.new_zeros(shape_k)
    if trees[False]:
        global_ = _align(contract_to_tensor(trees[False], set(),
                                            target_ordinal=frozenset({sample_sym}),
                                            ring=LogRing(dim_to_size=sizes)),
                         (sample_sym,), shape_k)
    return local, global_


def sample_sites(trace):
    """The names of the sample sites of ``trace``."""
    return [name for name, site in trace.nodes.items() if site["type"] == "sample"]


def batch_size(guide_trace, model_trace, *, data_plate=DATA_PLATE):
    """The size B of the plate over data points in the traces (the batch's points)."""
    num_points = next((f.size for tr in (model_trace, guide_trace) for site in tr.nodes.values()
                       if site["type"] == "sample" for f in site["cond_indep_stack"]
                       if f.name == data_plate), None)
    if num_points is None:
        raise ValueError(f"the model has no plate named {data_plate!r}; open the plate over "
                         "data points with vi_toolkit.data_plate(x, num_data)")
    return num_points


def trace_log_densities(guide_trace, model_trace, num_samples, *, data_plate=DATA_PLATE):
    """Log-densities of the traces of :func:`sample_traces`, split into per-point and global.

    Returns ``{"model": (local, global_), "guide": (local, global_)}`` with ``local`` of
    shape (K, B) and ``global_`` of shape (K,) (see :func:`contract_log_density`):
    model local_ik = log p(x_i, z_ik | theta_k) with enumerated sites summed out, model
    global_k = log p(theta_k), and the guide's log q likewise.
    """
    num_points = batch_size(guide_trace, model_trace, data_plate=data_plate)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    guide_trace.pack_tensors()
    model_trace.pack_tensors(guide_trace.plate_to_symbol)
    guide_trace.plate_to_symbol = model_trace.plate_to_symbol
    return {role: contract_log_density(trace, sample_sites(trace), num_samples, num_points,
                                       data_plate=data_plate)
            for role, trace in (("model", model_trace), ("guide", guide_trace))}


def log_weights(model, guide, args, kwargs, num_samples, max_plate_nesting, *,
                data_plate=DATA_PLATE):
    """Per-point and global log importance weights of ``num_samples`` vectorized guide draws.

    Returns ``(local, global_)`` of shapes (K, B) and (K,):
    local_ik = log p(x_i, z_ik | theta_k) - log q(z_ik | x_i, theta_k) (enumerated discrete
    latents summed out) and global_k = log p(theta_k) - log q(theta_k), so that the
    joint log weight of the batch is ``local.sum(1) + global_``.
    """
    traces = sample_traces(model, guide, args, kwargs, num_samples, max_plate_nesting)
    return trace_log_weights(*traces, num_samples, data_plate=data_plate)


def trace_log_weights(guide_trace, model_trace, num_samples, *, data_plate=DATA_PLATE):
    """:func:`log_weights` of the traces of :func:`sample_traces`: ``(local, global_)``."""
    densities = trace_log_densities(guide_trace, model_trace, num_samples, data_plate=data_plate)
    (model_local, model_global), (guide_local, guide_global) = densities["model"], densities["guide"]
    return model_local - guide_local, model_global - guide_global
