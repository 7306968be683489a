"""The fitted posterior a user keeps: :class:`FitResult`, its file, and :func:`load`.

A fit of a model p(x, z; theta) and a guide q(z | x; phi) ends with parameters
(theta, phi). A :class:`FitResult` owns a copy of them (Pyro's parameter store and the
weights of ``nn.Module`` model or guide), so that a later fit which trains the same
modules does not change it, and runs its model and guide with them inside
:meth:`FitResult.scope`. On top of that scope it offers what one does with a posterior:

* :meth:`~FitResult.sample`: draws z ~ q(z | x) of every latent site of the model;
* :meth:`~FitResult.median`, :meth:`~FitResult.quantiles`: where the guide defines them
  (Pyro's autoguides);
* :meth:`~FitResult.predictive`: posterior predictive draws x^rep ~ p(x | z), z ~ q (Pyro's
  ``Predictive``), the observed sites included;
* :meth:`~FitResult.evaluate` and :meth:`~FitResult.to_inference_data` (held-out ELBO and
  IWAE log-likelihood, ArviZ);
* :meth:`~FitResult.save` and :func:`load`: one file, read with
  ``torch.load(weights_only=True)`` (never unpickling code), holding the parameters, the
  history, the configuration, the first data points (to create lazily built parameters
  again), and a spec of the model and guide (:mod:`vi_toolkit.specs`) from which a new
  process rebuilds them. A model or guide without a spec (a closure, a function in
  ``__main__``) is saved with a note saying so, and ``load(path, model=..., guide=...)``
  takes it.
"""

import contextlib
import math
import os

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Predictive

from . import specs
from .analysis import to_inference_data
from .checkpoint import load_checkpoint, save_checkpoint
from .data import DataSets, FitData, as_fit_data
from .devices import resolve_device
from .evaluation import evaluate
from .traces import accepts_keyword, fit_parameters, modules_of, positive_int, trace_pair

PROBE_POINTS = 100  # data points a saved fit keeps to create its parameters again
RESULT_FORMAT = "vi-toolkit-result"


def _clone(tensors):
    return {k: v.detach().clone() for k, v in tensors.items()}


def capture_state(model, guide):
    """A copy of the live parameters: ``{"store": ..., "modules": {role: state_dict}}``."""
    store = pyro.get_param_store().get_state()
    return {"store": {"params": _clone(store["params"]), "constraints": store["constraints"]},
            "modules": {role: _clone(m.state_dict()) for role, m in modules_of(model, guide).items()}}


class FitResult:
    """A fitted model and guide with their own copy of the parameters, the history and the
    configuration of the fit.

    ``history`` holds ``loss`` (the loss, -ELBO estimate of the whole data set, at every
    step) and, at every epoch (every logging interval of a full-batch fit), ``step``,
    ``epoch``, ``elbo`` (training ELBO per data point), ``val_elbo`` (held-out ELBO per
    data point, if ``val_data`` was given), ``lr`` and ``time``. ``stopped`` says why the fit
    ended. Pyro's global parameter store does not hold a fit's parameters after ``fit``
    returns (each fit runs in a store of its own): use :attr:`params`, or run the model or
    guide inside :meth:`scope`.
    """

    def __init__(self, model, guide, history, config, state, device, stopped, probe=None):
        self.model, self.guide, self.history, self.config = model, guide, history, config
        self.state, self.device, self.stopped = state, torch.device(device), stopped
        self.probe = probe  # the first data points (CPU), to create the parameters anew

    @contextlib.contextmanager
    def scope(self):
        """Inside the block Pyro's parameter store holds this fit's parameters and the model's
        and guide's ``nn.Module``\\ s its weights; both are put back as they were afterwards."""
        modules = {role: m for role, m in modules_of(self.model, self.guide).items()
                   if role in self.state["modules"]}
        outer = {role: _clone(m.state_dict()) for role, m in modules.items()}
        with torch.no_grad():
            for role, module in modules.items():
                module.load_state_dict(self.state["modules"][role])
        try:
            with pyro.get_param_store().scope(self.state["store"]):
                yield
        finally:
            with torch.no_grad():
                for role, module in modules.items():
                    module.load_state_dict(outer[role])

    @property
    def params(self) -> dict:
        """Constrained values of every parameter, by name (detached copies): Pyro's store, and
        with ``pyro.settings.set(module_local_params=True)`` the parameters that ``PyroModule``
        models and guides keep in themselves, as ``"model.<name>"``/``"guide.<name>"``."""
        with self.scope():
            store = pyro.get_param_store()
            params = {name: store[name].detach().clone() for name in store.keys()}
            if pyro.settings.get("module_local_params"):
                for role, module in modules_of(self.model, self.guide).items():
                    for name, p in module.named_parameters():
                        if name.endswith("_unconstrained"):  # a PyroParam: its constrained value
                            owner, _, attr = name[:-len("_unconstrained")].rpartition(".")
                            p = getattr(module.get_submodule(owner) if owner else module, attr)
                            name = name[:-len("_unconstrained")]
                        params[f"{role}.{name}"] = p.detach().clone()
            return params

    @property
    def elbo(self) -> float:
        """The last training ELBO per data point (NaN if none was recorded)."""
        return self.history["elbo"][-1] if self.history.get("elbo") else float("nan")

    @property
    def val_elbo(self):
        """The last held-out ELBO per data point, or None."""
        values = self.history.get("val_elbo")
        return values[-1] if values else None

    @property
    def diagnostics(self) -> dict:
        """The convergence report of a fit run ``until="converged"`` (``{}`` for other fits):
        ``converged``, ``reason`` (why not), and the split R-hat, Monte Carlo standard error and
        learning rate of each stationary phase (:mod:`vi_toolkit.stationarity`)."""
        return self.config.get("convergence", {})

    # -- the posterior -----------------------------------------------------------------
    def _on_device(self, args, kwargs):
        move = lambda v: v.to(self.device) if torch.is_tensor(v) else v  # noqa: E731
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    def _traces(self, args, kwargs):
        with self.scope(), torch.no_grad(), _device(self.device):
            return trace_pair(self.model, self.guide, *self._on_device(args, kwargs))

    def _predictive(self, num_samples, args, kwargs, sites, model=None):
        """Draws of ``sites`` (``{name: shape of one draw}``), each ``(S, *shape)``."""
        num_samples = positive_int(num_samples, "num_samples")
        args, kwargs = self._on_device(args, kwargs)
        with self.scope(), torch.no_grad(), _device(self.device):
            predictive = Predictive(model or self.model, guide=self.guide, num_samples=num_samples,
                                    return_sites=list(sites), parallel=False)
            draws = predictive(*args, **kwargs)
        # Pyro aligns each site to the plates (a global scalar comes as (S, 1)): undo that
        return {k: v.detach().reshape((num_samples,) + sites[k]) if v.numel() == num_samples * math.prod(
            sites[k]) else v.detach() for k, v in draws.items()}

    def latent_sites(self, *args, **kwargs) -> list:
        """Names of the model's latent sample sites the guide draws (on these arguments)."""
        guide_trace, model_trace = self._traces(args, kwargs)
        return [name for name, site in model_trace.nodes.items()
                if site["type"] == "sample" and not site["is_observed"] and name in guide_trace.nodes]

    def sample(self, num_samples: int, *args, **kwargs) -> dict:
        """``num_samples`` draws of every latent site of the model from the fitted guide.

        Args:
            num_samples: the number of draws S.
            *args: the model's arguments (the data, as for ``fit``).
            **kwargs: its keyword arguments.

        Returns:
            ``{site: tensor of shape (S, *site shape)}``.
        """
        _, model_trace = self._traces(args, kwargs)
        latent = self.latent_sites(*args, **kwargs)
        return self._predictive(num_samples, args, kwargs,
                                {k: tuple(model_trace.nodes[k]["value"].shape) for k in latent})

    def predictive(self, num_samples: int, *args, return_sites=None, **kwargs) -> dict:
        """Posterior predictive draws: z ~ q(z | x), then every site of the model given z.

        Observed sites are drawn anew from p(x | z) (their data are ignored: Pyro's
        ``poutine.uncondition``), so the draws are replicates x^rep of the data; ``return_sites`` restricts the sites (default: all sample and
        deterministic sites of the model). Uses Pyro's ``Predictive``.
        """
        _, model_trace = self._traces(args, kwargs)
        shapes = {name: tuple(site["value"].shape) for name, site in model_trace.nodes.items()
                  if site["type"] == "sample"}
        unknown = sorted(set(return_sites or ()) - set(shapes))
        if unknown:
            raise ValueError(f"return_sites: the model has no sample site(s) {unknown}; it has {sorted(shapes)}")
        sites = shapes if return_sites is None else {k: shapes[k] for k in return_sites}
        return self._predictive(num_samples, args, kwargs, sites, model=poutine.uncondition(self.model))

    def _guide_summary(self, what, call):
        if not callable(getattr(self.guide, what, None)):
            raise ValueError(f"the guide ({type(self.guide).__name__}) defines no {what}(); Pyro's "
                             f"autoguides do. Use result.sample(...) and summarise the draws instead")
        with self.scope(), torch.no_grad(), _device(self.device):
            return {k: v.detach() for k, v in call().items()}

    def median(self, *args, **kwargs) -> dict:
        """The guide's posterior median of every latent site (autoguides), by name."""
        args, kwargs = self._on_device(args, kwargs)
        return self._guide_summary("median", lambda: self.guide.median(*args, **kwargs))

    def quantiles(self, quantiles, *args, **kwargs) -> dict:
        """The guide's quantiles of every latent site (autoguides): ``{site: (len(q), ...)}``."""
        args, kwargs = self._on_device(args, kwargs)
        qs = list(quantiles)
        if not qs or not all(0.0 < float(q) < 1.0 for q in qs):
            raise ValueError(f"quantiles must be numbers strictly between 0 and 1, got {quantiles!r}")
        return self._guide_summary("quantiles", lambda: self.guide.quantiles(qs, *args, **kwargs))

    def evaluate(self, data, **options) -> dict:
        """Held-out ELBO and IWAE log-likelihood per point (:func:`vi_toolkit.evaluation.evaluate`)."""
        return evaluate(self, data, **options)

    def to_inference_data(self, data, **options):
        """ArviZ ``InferenceData`` of draws from the guide (:func:`vi_toolkit.analysis.to_inference_data`)."""
        return to_inference_data(self, data, **options)

    # -- files ---------------------------------------------------------------------------
    def save(self, path) -> list:
        """Write this fit to ``path`` (see the module); returns the notes written with it.

        A note says which of model and guide has no spec and must be passed to :func:`load`.
        """
        if self.probe is None:
            raise ValueError("this result keeps no data points to rebuild its parameters from "
                             "(it was loaded from a checkpoint); fit again or use checkpoints")
        notes, spec = [], {}
        for role, obj in (("model", self.model), ("guide", self.guide)):
            try:
                spec[role] = specs.spec_of(obj, role)
            except ValueError as err:
                spec[role] = None
                notes.append(f"{err}; pass {role}=... to vi_toolkit.load")
        save_checkpoint(path, {"kind": RESULT_FORMAT, "spec": spec, "notes": notes,
                               "store": {k: v.detach() for k, v in self.state["store"]["params"].items()},
                               "modules": self.state["modules"], "config": self.config,
                               "history": self.history, "stopped": self.stopped, "probe": self.probe})
        return notes

    def __repr__(self):
        name = lambda f: getattr(f, "__name__", type(f).__name__)  # noqa: E731
        val = "" if self.val_elbo is None else f", val_elbo={self.val_elbo:.4g}"
        steps = len(self.history.get("loss", []))
        epochs = self.history["epoch"][-1] if self.history.get("epoch") else 0
        return (f"FitResult(model={name(self.model)}, guide={name(self.guide)}, "
                f"elbo={self.config.get('elbo')}, steps={steps}, epochs={epochs}, "
                f"elbo_per_point={self.elbo:.4g}{val}, device={self.device}, "
                f"stopped={self.stopped!r})")


def _device(device):
    return torch.device(device) if device.type != "cpu" else contextlib.nullcontext()


def restore(model, guide, probe, state, source, device):
    """A :class:`FitResult` of ``model`` and ``guide`` with the parameters in ``state``.

    The two run once on ``probe`` (a :class:`~vi_toolkit.data.FitData` or
    :class:`~vi_toolkit.data.DataSets`) in a parameter store
    of their own, creating their parameters with their constraints (a data-driven
    initialisation such as k-means needs several points); these then take the stored
    values. Names and shapes must match, else ``ValueError`` naming ``source``.
    """
    store = pyro.get_param_store()
    outer = store.get_state()
    store.clear()
    try:
        modules = modules_of(model, guide)
        for module in modules.values():
            module.to(device)
        num_data = probe.num_data if accepts_keyword(model, "num_data") else None
        args, kwargs = probe.call_args(probe.tensors, num_data)
        with torch.no_grad(), _device(device):
            trace_pair(model, guide, args, kwargs)
        if "store" in state:  # a saved fit: the store's unconstrained values, the modules' states
            params, saved = dict(store.named_parameters()), state["store"]
        else:  # a checkpoint: parameters by the names a fit gives them
            params, saved = fit_parameters(model, guide), state["params"]
        missing, extra = set(params) - set(saved), set(saved) - set(params)
        if missing or extra:
            raise ValueError(f"{source} does not match this model and guide "
                             f"(missing {sorted(missing)}, unexpected {sorted(extra)})")
        with torch.no_grad():
            for name, p in params.items():
                if saved[name].shape != p.shape:
                    raise ValueError(f"{source}: parameter {name!r} has shape "
                                     f"{tuple(saved[name].shape)}, the model's has {tuple(p.shape)}")
                p.copy_(saved[name])
            for role, module in modules.items():
                if "modules" in state:
                    try:
                        module.load_state_dict(state["modules"][role])
                    except (KeyError, RuntimeError) as err:
                        raise ValueError(f"{source}: the {role}'s weights do not fit it: {err}") from err
                for n, buf in module.named_buffers():
                    if n in state.get("buffers", {}).get(role, {}):
                        buf.copy_(state["buffers"][role][n])
        return FitResult(model, guide, state.get("history", {}), state.get("config", {}),
                         capture_state(model, guide), device, state.get("stopped", "loaded"),
                         probe=probe.structured([t.cpu() for t in probe.tensors]))
    finally:
        store.clear()
        store.set_state(outer)


def load(path, *, model=None, guide=None, device="auto") -> FitResult:
    """The :class:`FitResult` that :meth:`FitResult.save` wrote to ``path``.

    Args:
        path: the file.
        model, guide: the model and guide to load into; needed where the file holds no spec
            for them (its notes say so), optional otherwise (they replace the stored spec).
        device: where the parameters go (``"auto"``: a GPU if there is one).

    Raises:
        ValueError: the file is not a saved fit, a spec cannot be rebuilt, or the parameters do
            not match the model and guide.
    """
    state = load_checkpoint(path)
    source = f"saved fit {os.fspath(path)!r}"
    if state.get("kind") != RESULT_FORMAT:
        raise ValueError(f"{source} is a checkpoint, not a saved fit: use "
                         "vi_toolkit.load_fit(model, guide, data, path) for checkpoints")
    built = {}
    for role, given in (("model", model), ("guide", guide)):
        if given is not None:
            built[role] = given
        elif state["spec"][role] is None:
            raise ValueError(f"{source}: its {role} could not be stored ({'; '.join(state['notes'])}); "
                             f"pass {role}=... to vi_toolkit.load")
        else:
            built[role] = specs.build(state["spec"][role])
    dev = resolve_device(device)
    probe = (DataSets(**state["probe"]).to(dev) if state.get("config", {}).get("data_sets")
             else FitData(state["probe"], name=f"{source} probe", device=dev))
    return restore(built["model"], built["guide"], probe, state, source, dev)


def load_fit(model, guide, data, path, *, device="auto") -> FitResult:
    """A :class:`FitResult` for ``model`` and ``guide`` with the parameters of a checkpoint.

    The model and guide run once on the first ``PROBE_POINTS`` points of ``data`` to create
    their parameters (see :func:`restore`), which then take the checkpoint's values.
    """
    state = load_checkpoint(path)
    dev = resolve_device(device)
    probe = as_fit_data(data, device=dev).first(PROBE_POINTS)
    result = restore(model, guide, probe, state, f"checkpoint {os.fspath(path)!r}", dev)
    result.stopped = "loaded"
    return result
