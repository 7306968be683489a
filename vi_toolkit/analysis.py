"""A variational posterior as ArviZ ``InferenceData``.

ArviZ's ``from_pyro`` reads MCMC runs only. :func:`to_inference_data` draws S joint
samples (theta_s, z_s) ~ q from a fitted guide (vectorized, in chunks), runs the
model against them and fills the groups ArviZ works with:

* ``posterior`` (one chain of S independent draws): every latent site of the model
  (drawn by the guide), the model's enumerated discrete sites (a mixture's assignments),
  drawn from their exact conditional p(z_i | x_i, theta_s) by ``infer_discrete``, and
  its ``pyro.deterministic`` sites; the guide's own internals (an autoguide's
  ``*_unconstrained`` or joint ``_Auto*_latent`` sites) are not model quantities and are
  left out. A deterministic site's dims are read against the plates it lies in (Pyro's
  default ``event_dim`` counts every dim of the value, plates included);
* ``posterior_predictive``: every observed site redrawn from the model given the draw,
  x_s^rep ~ p(x | theta_s, z_s), with deterministic sites recomputed from the draw;
* ``log_likelihood``: the pointwise log p(x_i | theta_s, z_is) per observed site and
  data point (dims of inner plates and events summed), and where discrete latents
  are enumerated the marginal log p(x_i | theta_s) = log sum_{z_i} p(z_i, x_i | theta_s)
  over all observed sites of the point jointly (one variable, named after the single
  observed site, or ``"joint"``), so that ``az.loo`` and ``az.compare`` apply;
* ``observed_data``;
* ``sample_stats``: ``lp`` = log p(x, z_s) and ``log_weight`` = log p(x, z_s) - log q(z_s),
  the importance weight of each draw (see :mod:`vi_toolkit.diagnostics` for PSIS).

Dimensions are named after the model's plates (``data`` for the data plate); other
dimensions of a site are ``{site}_dim_{j}``. The draws of every data point share
their global latents, so the data are analysed in one batch.
"""

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import infer_discrete
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from pyro.poutine.util import prune_subsample_sites

from .session import FitSession
from .traces import positive_int
from .weights import PARTICLE_PLATE, contract_log_density, sample_traces, trace_log_densities
from .plates import DATA_PLATE


def _named(value, site, nesting, draws=None):
    """``value`` of ``site`` as a numpy array with dims named from its plates.

    With ``draws`` (their number) the batch dim of the sample plate becomes dim 0 (the draw); the
    dims of other plates take their names; remaining batch and event dims of size
    other than one become ``{site}_dim_{j}`` and singleton ones are dropped.
    """
    value = torch.as_tensor(value).detach()
    event_dim = site["fn"].event_dim if site["fn"] is not None else 0
    batch_dims = nesting + 1 if draws is not None else nesting
    if site["infer"].get("_deterministic"):  # its event_dim defaults to value.dim(), plates too
        event_dim = min(event_dim, max(value.dim() - batch_dims, 0))
    extra = value.dim() - event_dim - batch_dims
    if extra > 0:
        value = value.reshape(value.shape[extra:])
    elif extra < 0:
        value = value.reshape((1,) * -extra + value.shape)
    frames = {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized}
    names, keep, j = [], [], 0
    for pos in range(value.dim()):
        dim = pos - batch_dims
        frame = frames.get(dim) if pos < batch_dims else None
        if frame == PARTICLE_PLATE and draws is not None:
            names.append("draw")
        elif frame is not None and frame != PARTICLE_PLATE:
            names.append(frame)
        elif value.shape[pos] != 1:
            names.append(f"{site['name']}_dim_{j}")
            j += 1
        else:
            continue
        keep.append(pos)
    array = value.reshape([value.shape[p] for p in keep]).cpu().numpy()
    if draws is not None and "draw" not in names:  # a site the sample plate did not reach
        array = np.broadcast_to(array, (draws,) + array.shape)
        names.insert(0, "draw")
    return array, names


class _Redraw(UnconditionMessenger):
    """Draw the observed sites ``names`` anew from the model (deterministic sites, observed in
    Pyro's terms, stay functions of the draw)."""

    def __init__(self, names):
        super().__init__()
        self.names = set(names)

    def _pyro_sample(self, msg):
        if msg["name"] in self.names:
            super()._pyro_sample(msg)


def _store(groups, dims, group, name, array_names):
    array, names = array_names
    groups[group].setdefault(name, []).append(array)
    dims[group][name] = [n for n in names if n != "draw"]


def _chunk(session, tensors, num_samples, data_plate, predictive, groups, dims):
    """Draw ``num_samples`` joint samples and add their arrays to ``groups``."""
    args, kwargs = session.call_args(tensors)
    model, guide, nesting = session.model, session.guide, session.nesting
    guide_trace, model_trace = sample_traces(model, guide, args, kwargs, num_samples, nesting)
    densities = trace_log_densities(guide_trace, model_trace, num_samples, data_plate=data_plate)
    (model_local, model_global), (guide_local, guide_global) = densities["model"], densities["guide"]
    lp = model_local.sum(1) + model_global
    _store(groups, dims, "sample_stats", "lp", (lp.cpu().numpy(), ["draw"]))
    _store(groups, dims, "sample_stats", "log_weight",
           ((lp - guide_local.sum(1) - guide_global).cpu().numpy(), ["draw"]))

    sites = {name: site for name, site in model_trace.nodes.items() if site["type"] == "sample"}
    observed = [n for n, s in sites.items() if s["is_observed"] and not s["infer"].get("_deterministic")]
    enumerated = [n for n, s in sites.items() if s["infer"].get("_enumerate_dim") is not None]
    num_points = model_local.shape[1]
    if enumerated:
        local = [n for n in observed if any(f.name == data_plate for f in sites[n]["cond_indep_stack"])]
        name = local[0] if len(local) == 1 else "joint"
        ll, _ = contract_log_density(model_trace, local + enumerated, num_samples, num_points,
                                     data_plate=data_plate)
        _store(groups, dims, "log_likelihood", name, (ll.cpu().numpy(), ["draw", data_plate]))
        observed_global = [n for n in observed if n not in local]
    else:
        observed_global = observed
    for name in observed_global:
        ll_local, ll_global = contract_log_density(model_trace, [name], num_samples, num_points,
                                                   data_plate=data_plate)
        if any(f.name == data_plate for f in sites[name]["cond_indep_stack"]):
            _store(groups, dims, "log_likelihood", name, (ll_local.cpu().numpy(), ["draw", data_plate]))
        else:
            _store(groups, dims, "log_likelihood", name, (ll_global.cpu().numpy(), ["draw"]))

    replayed = poutine.replay(pyro.plate(PARTICLE_PLATE, num_samples, dim=-(nesting + 1))(model),
                              trace=guide_trace)
    if enumerated:
        replayed = infer_discrete(replayed, first_available_dim=-(nesting + 2), temperature=1,
                                  strict_enumeration_warning=False)  # K = 1 sums out nothing
    latent_trace = prune_subsample_sites(poutine.trace(replayed).get_trace(*args, **kwargs))
    for name, site in latent_trace.nodes.items():
        if site["type"] != "sample" or (
                site["is_observed"] and not site["infer"].get("_deterministic")):
            continue
        _store(groups, dims, "posterior", name, _named(site["value"], site, nesting, num_samples))
    if predictive:
        kept = poutine.Trace()
        for name, site in latent_trace.nodes.items():
            if site["type"] == "sample" and name not in observed:
                kept.add_node(name, **site)
        rep = poutine.trace(_Redraw(observed)(poutine.replay(
            pyro.plate(PARTICLE_PLATE, num_samples, dim=-(nesting + 1))(model), trace=kept)))
        rep_trace = rep.get_trace(*args, **kwargs)
        for name in observed:
            site = rep_trace.nodes[name]
            _store(groups, dims, "posterior_predictive", name, _named(site["value"], site, nesting, num_samples))
    if not groups["observed_data"]:  # the same in every chunk
        for name in observed:
            site = sites[name]
            array, names = _named(site["value"], site, nesting)
            groups["observed_data"][name] = array
            dims["observed_data"][name] = names


@torch.no_grad()
def to_inference_data(result, data, *, num_samples=500, chunk_size=None, posterior_predictive=True,
                      data_plate=DATA_PLATE, device=None, seed=None, path=None):
    """An ``arviz.InferenceData`` of ``num_samples`` draws from a fitted guide (see the module).

    Args:
        result: the :class:`~vi_toolkit.FitResult` of the model and guide.
        data: the data to condition on (a tensor, tuple or dict, as for ``fit``).
        num_samples: posterior draws S (one chain); ``chunk_size`` of them are drawn at
            once (default: all), to bound memory.
        posterior_predictive: also redraw the observed sites (memory S x data size).
        data_plate: the name of the plate over data points.
        seed: seeds Pyro's random number generators first.
        path: if given, also write the result to this netCDF file.
    """
    import arviz as az

    positive_int(num_samples, "num_samples")
    chunk_size = positive_int(chunk_size or num_samples, "chunk_size")
    session = FitSession(result, data, device)
    if seed is not None:
        pyro.set_rng_seed(seed)
    names = ("posterior", "posterior_predictive", "log_likelihood", "sample_stats", "observed_data")
    groups, dims = {g: {} for g in names}, {g: {} for g in names}
    tensors = session.data.tensors
    with session.scope(), session.device_context():
        done = 0
        while done < num_samples:
            k = min(chunk_size, num_samples - done)
            _chunk(session, tensors, k, data_plate, posterior_predictive, groups, dims)
            done += k
    datasets = {}
    for group in names:
        if not groups[group]:
            continue
        if group == "observed_data":
            datasets[group] = az.dict_to_dataset(groups[group], library=pyro, dims=dims[group],
                                                 default_dims=[])
        else:
            arrays = {k: np.concatenate(v, axis=0)[None] for k, v in groups[group].items()}
            datasets[group] = az.dict_to_dataset(arrays, library=pyro, dims=dims[group])
    idata = az.InferenceData(**datasets)
    idata.posterior.attrs["inference"] = "variational"
    idata.posterior.attrs["guide"] = getattr(result.guide, "__name__", type(result.guide).__name__)
    if path is not None:
        idata.to_netcdf(str(path))
    return idata
