"""``fit``: stochastic variational inference for any Pyro model and guide.

Given a model p(x, z) and a guide q(z | x) with parameters phi (and model
parameters theta), ``fit`` maximises the evidence lower bound

    ELBO(theta, phi) = E_q[log p(x, z; theta) - log q(z | x; phi)] <= log p(x)

by stochastic gradient ascent on minibatch estimates (see :mod:`vi_toolkit.plates`
for why the estimate is unbiased, and :mod:`vi_toolkit.elbo` for the objectives).
The same call fits a three-parameter conjugate model, a Gaussian mixture with
enumerated assignments and a VAE with a million weights.

``fit`` validates its arguments (every bad input is a ``ValueError`` naming it, before any
work), then assembles the engine's parts, each in a module of its own:

* the **step** (:mod:`vi_toolkit.step`): objective, optimizer, one update on a batch;
* the **loop** (:mod:`vi_toolkit.loop`): epochs, read-backs, divergence, history;
* the **callbacks** (:mod:`vi_toolkit.callbacks`, :mod:`vi_toolkit.loggers`): early stopping,
  convergence, checkpoints, progress, logs, and the user's own;
* the **strategy** (:mod:`vi_toolkit.strategy`): one process or data-parallel.

Each fit runs in a parameter store of its own (Pyro's ``ParamStoreDict.scope``), so two fits
in one process never share parameters; the fitted parameters live on, copied, in the
returned :class:`~vi_toolkit.FitResult`.
"""

import dataclasses
import os
from dataclasses import dataclass

import pyro
import torch
from pyro.optim import PyroOptim
from pyro.optim.lr_scheduler import PyroLRScheduler

from .callbacks import Checkpoint, Convergence, EarlyStopping, ProgressBar, as_callbacks
from .data import DataSets, FitData, as_fit_data
from .elbo import make_elbo
from .linear import linear_backend, resolve_backend
from .loop import Loop, device_context
from .optim import is_lbfgs
from .compiled import CompiledStep, compile_plan
from .step import EagerStep
from .stationarity import Stationarity
from .strategy import make_strategy
from .traces import accepts_keyword, modules_of, positive_int


@dataclass(frozen=True)
class FitOptions:
    """The rarely changed settings of a fit: ``fit(..., options=FitOptions(clip_norm=10.0))``
    or ``options={"clip_norm": 10.0}``.

    Attributes:
        vectorize_particles, max_plate_nesting: passed to the ELBO with ``num_particles``.
        optimizer_args: keyword arguments of the optimizer (betas, momentum, ...).
        clip_norm: clip the global gradient norm to this (positive).
        drop_last: drop the last, smaller batch of each epoch.
        val_batch_size: batch size for the held-out ELBO (default: ``batch_size``); with
            several data sets, for evaluating each set's ELBO (default: the set's own).
        log_every: steps between read-backs of the loss (progress, divergence check).
        validate: Pyro's distribution checks on the first traces and step (``"first"``:
            they cost about 10% of a small network's step), at every step (``True``), never
            (``False``).
        checkpoint_every: epochs between checkpoints (with ``checkpoint=``).
        distributed: ``"auto"`` (data-parallel when ``torchrun`` started the process, see
            :mod:`vi_toolkit.distributed`), ``True`` (required) or ``False``.
        linear_backend: ``"auto"``, ``"onednn"`` or ``"torch"``: which library computes the
            float32 linear layers on the CPU (:mod:`vi_toolkit.linear`).
    """

    vectorize_particles: bool = True
    max_plate_nesting: int = None
    optimizer_args: dict = None
    clip_norm: float = None
    drop_last: bool = False
    val_batch_size: int = None
    log_every: int = None
    validate: object = "first"
    checkpoint_every: int = None
    distributed: object = "auto"
    linear_backend: str = "auto"


def _options(options):
    if options is None:
        return FitOptions()
    if isinstance(options, FitOptions):
        return options
    if isinstance(options, dict):
        known = {f.name for f in dataclasses.fields(FitOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"options: unknown setting(s) {unknown}; known: {sorted(known)}")
        return FitOptions(**options)
    raise ValueError(f"options must be a vi_toolkit.FitOptions or a dict, got {type(options).__name__}")


def _optional_int(value, name):
    return None if value is None else positive_int(value, name)


def _name_of(obj):
    if isinstance(obj, PyroOptim):
        return type(obj).__name__ if isinstance(obj, PyroLRScheduler) else obj.pt_optim_constructor.__name__
    return obj if isinstance(obj, str) else getattr(obj, "__name__", type(obj).__name__)


def check_sites(model_trace, guide_trace, data):
    """Every latent site of the model is drawn by the guide, with the model's shape, and
    integer data are observed by discrete distributions only.

    Raises:
        ValueError: naming a model site the guide lacks (its values would silently come from
            the prior), a guide site whose shape does not fit the model's distribution, or an
            observed site with a continuous distribution given integer values of ``data``.
    """
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("_deterministic"):
            continue
        if site["is_observed"]:
            value, support = site["value"], site["fn"].support
            if torch.is_tensor(value) and not (value.is_floating_point() or value.is_complex()) \
                    and not support.is_discrete:
                which = next((label for label, t in zip(data.labels(), data.tensors)
                              if t.dtype == value.dtype), data.name)
                raise ValueError(f"{which} has integer dtype {value.dtype}, but the model observes it "
                                 f"at site {name!r} with a continuous {type(site['fn']).__name__}: pass "
                                 "float data (x.float()); integer data suit discrete sites (Categorical, "
                                 "Poisson, ...)")
            continue
        if site["infer"].get("enumerate"):
            continue
        if name not in guide_trace.nodes:
            raise ValueError(f"the guide does not sample the model's latent site {name!r}: its values "
                             "would come from the prior and the ELBO would not be of this guide. Add it "
                             "to the guide, or mark a discrete site for enumeration in the model "
                             "(infer={'enumerate': 'parallel'})")
        value = guide_trace.nodes[name]["value"]
        fn = site["fn"]
        shape = tuple(fn.batch_shape + fn.event_shape)
        try:
            fits = torch.broadcast_shapes(tuple(value.shape), shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"guide site {name!r} has shape {tuple(value.shape)}, but the model's "
                             f"{name!r} has shape {shape} (batch {tuple(fn.batch_shape)}, event "
                             f"{tuple(fn.event_shape)})")


def _check_data_sets(strategy, val_data, until, elbo):
    """The settings a fit of several data sets cannot take: a ``ValueError`` naming each."""
    what = "a fit of several data sets (vi_toolkit.DataSets)"
    if val_data is not None:
        raise ValueError(f"val_data: {what} records each set's training ELBO (history['elbo_<set>']) "
                         "but takes no held-out data; evaluate held-out data after the fit")
    if until is not None:
        raise ValueError(f"until: {what} cannot run until converged (the stationarity check "
                         "probes one data set)")
    if strategy.world > 1:
        raise ValueError(f"{what} runs in one process: a distributed fit splits one data set")
    if elbo in ("iwae", "iwae-dreg"):
        raise ValueError(f"elbo={elbo!r} scales the points of one data plate ('data'); for {what} "
                         "use 'trace', 'meanfield', 'enum' or 'stl'")


def fit(model, guide, data, *, elbo="auto", num_particles=1, optimizer="adam", lr=None,
        lr_schedule=None, batch_size=None, num_epochs=None, num_steps=None, val_data=None, patience=None,
        tol_rel_obj=None, until=None, callbacks=(), transform=None, device="auto", seed=None, progress=True,
        checkpoint=None, resume=False, compile="auto", options=None):
    """Fit ``guide`` to the posterior of ``model`` given ``data`` by maximising the ELBO.

    Args:
        model: a Pyro callable taking the data (and ``num_data``, see
            :mod:`vi_toolkit.plates`): a function using ``pyro.param``/``pyro.module`` or a
            ``PyroModule``.
        guide: a Pyro callable taking the model's arguments: a function, a ``PyroModule``
            or an autoguide.
        data: a tensor, or a tuple or dict of tensors sharing dimension 0 (data points); or
            several data sets of their own sizes, ``vi_toolkit.DataSets(labelled=(x, y),
            unlabelled=u)`` (:class:`~vi_toolkit.data.DataSets`): the model and guide then get
            one keyword per set, each set's batch, and ``num_data={set: N_s}``, open a plate
            per set with ``data_plate(x, num_data, name=set)`` (each scaled by its own
            N_s / B_s), and ``history`` holds each set's ELBO per point, ``elbo_<set>``,
            evaluated over the whole set at each epoch's end (the terms of the sites in its
            plate), beside the total ``elbo``. Such a fit runs in one process, with the eager
            step, without ``val_data``, ``until`` or the importance-weighted ELBOs.
        elbo: ``"auto"``, ``"trace"``, ``"meanfield"``, ``"enum"``, ``"iwae"`` or a Pyro ELBO
            (:func:`vi_toolkit.elbo.make_elbo`).
        num_particles: Monte Carlo samples a step.
        optimizer: a name, a torch optimizer class or factory, or a ``pyro.optim`` object
            (:mod:`vi_toolkit.optim`).
        lr: the learning rate; defaults to 1e-3 for a name, to the optimizer's own default
            otherwise.
        lr_schedule: ``"cosine"``, ``"exponential"`` or ``optimizer -> scheduler``, stepped
            every step (:func:`vi_toolkit.optim.make_scheduler`).
        batch_size: minibatch size (``None``: full batch). With several data sets: ``None``
            (every set whole), the total B (each set's share proportional to its size, so an
            epoch covers every set once) or ``{set: B_s}``; an epoch is the pass of the set
            that needs the most batches (each epoch starts every set on a new permutation, and
            a set covered before the epoch ends starts another).
        num_epochs: passes over the data (default 10; with ``until``, the budget: default 1000).
        num_steps: optimisation steps instead (full batch: default 1000; with ``until``, the
            budget: default 100,000).
        val_data: held-out data of the same structure; its ELBO per point is recorded
            each epoch.
        patience: stop after that many epochs without improvement of the held-out ELBO and
            restore the best parameters (:class:`~vi_toolkit.callbacks.EarlyStopping`).
        tol_rel_obj: stop when the relative change of the loss falls below this
            (:class:`~vi_toolkit.callbacks.Convergence`, as Stan's ADVI).
        until: ``"converged"``: run until the averaged iterates are accurate, within the
            budget ``num_epochs`` or ``num_steps``: stationarity by split R-hat, Polyak-Ruppert
            averaging, the Monte Carlo standard error of the average, the learning rate halved
            at each stationary phase (:class:`~vi_toolkit.stationarity.Stationarity`, or pass
            one with other settings). The fit ends with the averaged parameters,
            ``result.diagnostics`` says whether it converged and why not, and a fit that did not
            warns. The learning rate is its own: no ``lr_schedule``.
        callbacks: :class:`~vi_toolkit.callbacks.Callback` objects (hooks at the start, after
            each step, after each epoch, at the end) or functions ``event -> bool`` called each
            epoch (true stops the fit).
        transform: callable applied to each training batch (list of tensors, returning the
            list; with several data sets every set's tensors, in order), e.g. dynamic
            binarization or input corruption.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        seed: seeds torch, numpy and random at the start of the fit, so the fit's own random
            draws (initial values of Pyro parameters, guide noise, batches) are reproducible;
            ``None`` draws one (kept in ``config``). Networks built before ``fit`` were
            initialised by the caller's generator: seed it (``torch.manual_seed``) before
            building them.
        progress: show a tqdm progress bar.
        checkpoint: path of a checkpoint written each epoch and at the end
            (:class:`~vi_toolkit.callbacks.Checkpoint`).
        resume: ``True`` resumes from ``checkpoint`` if it exists, or a path to resume from.
        compile: ``"auto"``, ``True`` or ``False``: trace the training step once into a graph,
            compile it and replay it at every step (:mod:`vi_toolkit.compiled`; ``"auto"``
            compiles long fits only and falls back to the eager step with a warning when the
            step cannot be compiled, ``True`` raises instead). ``config["compile"]`` reports
            whether it was used, why not, and the seconds spent compiling.
        options: the rarely changed settings, a :class:`FitOptions` or a dict.

    Returns:
        :class:`~vi_toolkit.result.FitResult`.

    Raises:
        ValueError: bad input, before any work.
        DivergenceError: the loss became NaN or infinite; ``.result`` holds the last good state.
        FitError: a step or a callback failed; ``.result`` holds the last good state.
    """
    opts = _options(options)
    strategy = make_strategy(opts.distributed, device)
    dev = strategy.device
    resolve_backend(opts.linear_backend, dev)  # an unknown name fails before any work
    sets = isinstance(data, DataSets)
    if sets:
        _check_data_sets(strategy, val_data, until, elbo)
    fit_data = as_fit_data(data, device=dev)
    val = None
    if val_data is not None:
        val = FitData(val_data, name="val_data", device=dev)
        fit_data.check_like(val)
    n = fit_data.num_data
    batch_size = fit_data.batch_sizes(batch_size)  # B (N for the full batch), or {set: B_s}
    minibatch = fit_data.minibatched(batch_size)
    if num_epochs is not None and num_steps is not None:
        raise ValueError("give num_epochs or num_steps, not both")
    num_epochs, num_steps = _optional_int(num_epochs, "num_epochs"), _optional_int(num_steps, "num_steps")
    num_particles = positive_int(num_particles, "num_particles")
    log_every = _optional_int(opts.log_every, "log_every")
    checkpoint_every = _optional_int(opts.checkpoint_every, "checkpoint_every") or 1
    if is_lbfgs(optimizer) and minibatch:
        raise ValueError("optimizer='lbfgs' needs the full batch (batch_size=None): its line "
                         "search assumes a deterministic objective")
    if is_lbfgs(optimizer) and strategy.world > 1:
        raise ValueError("optimizer='lbfgs' cannot run distributed: its line search would "
                         "read each process's own loss")
    if opts.clip_norm is not None and not (isinstance(opts.clip_norm, (int, float)) and opts.clip_norm > 0):
        raise ValueError(f"clip_norm must be a positive number, got {opts.clip_norm!r} (a "
                         "negative norm would flip every gradient)")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if opts.validate not in (True, False, "first"):
        raise ValueError(f"validate must be True, False or 'first', got {opts.validate!r}")
    if transform is not None and not callable(transform):
        raise ValueError(f"transform must be a callable list of tensors -> list, got {transform!r}")
    if until == "converged":
        until = Stationarity()
    if until is not None and not isinstance(until, Stationarity):
        raise ValueError(f"until must be 'converged' or a vi_toolkit.stationarity.Stationarity, got {until!r}")
    if until is not None and lr_schedule is not None:
        raise ValueError("until='converged' sets the learning rate itself (it halves it after each "
                         "stationary phase): leave lr_schedule at None")
    if minibatch:
        steps_per_epoch = fit_data.steps_per_epoch(batch_size, opts.drop_last)
        total = num_steps or (num_epochs or (10 if until is None else 1000)) * steps_per_epoch
        log_every = log_every or min(steps_per_epoch, 100)
    else:
        steps_per_epoch = 1
        total = num_steps or num_epochs or (1000 if until is None else 100_000)
        log_every = log_every or max(1, min(100, total // 20))
    if strategy.world > 1:
        smallest = n
        if minibatch:
            last = n % batch_size
            smallest = batch_size if opts.drop_last or last == 0 else min(batch_size, last)
        if smallest < strategy.world:
            raise ValueError(f"a distributed fit over {strategy.world} processes splits each batch "
                             f"across them, but a batch has {smallest} point(s); use batch_size "
                             f">= {strategy.world} (and drop_last=True if the last batch of an epoch "
                             "is smaller)")
    user_callbacks = as_callbacks(callbacks)
    compiled, not_compiled = compile_plan(
        compile, total_steps=total, validate=opts.validate, callbacks=user_callbacks,
        eager_only="a fit of several data sets (vi_toolkit.DataSets) runs the eager step" if sets else None)
    user_pair = (model, guide)
    for cb in user_callbacks:
        model, guide = cb.wrap(model, guide)
    pass_num_data = accepts_keyword(model, "num_data")
    if pass_num_data and not accepts_keyword(guide, "num_data"):
        raise ValueError("the guide must take the same arguments as the model, including "
                         "the keyword num_data (see vi_toolkit.plates)")
    for role, fn in (("model", model), ("guide", guide)) if sets else ():
        unknown = [s for s in fit_data.sizes if not accepts_keyword(fn, s)]
        if unknown:
            raise ValueError(f"data set(s) {unknown}: the {role} takes no keyword argument of that name; "
                             "it gets each data set as a keyword named after the set (vi_toolkit.DataSets)")
    if strategy.world > 1 and not pass_num_data:
        what = "a distributed fit (each process fits a part of the data)"
        raise ValueError(f"{what} needs a model that takes the keyword num_data and opens its "
                         "data plate with vi_toolkit.data_plate(x, num_data), so local terms are "
                         "scaled by N/B (see vi_toolkit.plates)")
    elbo_args = dict(num_particles=num_particles, vectorize_particles=opts.vectorize_particles,
                     max_plate_nesting=opts.max_plate_nesting)
    make_elbo(elbo, **elbo_args) if isinstance(elbo, str) else make_elbo(elbo)  # fail early
    builtin = [] if until is None else [until]  # first: checkpoints at the end hold the average
    if patience is not None:
        if val is None:
            raise ValueError("patience (early stopping) needs val_data to watch")
        builtin.append(EarlyStopping(patience))
    if tol_rel_obj is not None:
        builtin.append(Convergence(tol_rel_obj))
    if checkpoint is not None:
        builtin.append(Checkpoint(checkpoint, every=checkpoint_every))
    if progress:
        builtin.append(ProgressBar())
    if resume is True:
        if checkpoint is None:
            raise ValueError("resume=True needs checkpoint=PATH to resume from")
        resume = checkpoint if os.path.exists(checkpoint) else None
    elif resume:  # distributed: rank 0 reads the checkpoint, the other nodes need not see it
        if not os.path.exists(resume) and strategy.is_main:
            raise ValueError(f"resume: checkpoint {os.fspath(resume)!r} does not exist")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    config = {
        "elbo": _name_of(elbo) if isinstance(elbo, str) else type(elbo).__name__,
        "num_particles": num_particles, "num_data": n,
        "batch_size": sum(batch_size.values()) if sets else batch_size,  # points a step
        "num_epochs": num_epochs, "num_steps": total, "optimizer": _name_of(optimizer),
        "lr": lr, "clip_norm": opts.clip_norm, "log_every": log_every,
        "lr_schedule": lr_schedule if isinstance(lr_schedule, (str, type(None))) else "custom",
        "seed": seed, "drop_last": opts.drop_last, "device": str(dev),
        "vectorize_particles": opts.vectorize_particles, "validate": opts.validate,
        "data_fingerprint": fit_data.fingerprint(), "passes_num_data": pass_num_data,
        "watch": ["elbo"] + (["val_elbo"] if val is not None else []),
        "until": None if until is None else "converged",
        "compile": {"requested": compile, "used": False, "reason": not_compiled, "seconds": 0.0, "graphs": 0},
    }
    if strategy.world > 1:
        config["world_size"] = strategy.world
    if sets:
        config["data_sets"] = {s: {"num_data": fit_data.sizes[s], "batch_size": batch_size[s]}
                               for s in fit_data.sizes}

    def call_args(tensors, of):
        return of.call_args(tensors, of.num_data if pass_num_data else None)

    store = pyro.get_param_store()
    outer = store.get_state()
    store.clear()
    try:
        strategy.connect()
        seed = config["seed"] = strategy.broadcast_object(seed)  # rank 0's seed and checkpoint
        resume = strategy.broadcast_object(resume)
        pyro.set_rng_seed(seed)
        layers = any(isinstance(layer, torch.nn.Linear)
                     for module in modules_of(model, guide).values() for layer in module.modules())
        backend = opts.linear_backend if layers or opts.linear_backend != "auto" else "torch"
        config["linear_backend"] = resolve_backend(backend, dev)
        with device_context(dev), linear_backend(config["linear_backend"], dev):
            loop = Loop(model, guide, fit_data, val_data=val, step_fn=None, strategy=strategy,
                        elbo=None, batch_size=batch_size, total_steps=total,
                        steps_per_epoch=steps_per_epoch, log_every=log_every,
                        drop_last=opts.drop_last, val_batch_size=opts.val_batch_size or batch_size,
                        transform=transform, callbacks=user_callbacks + builtin, config=config,
                        call_args=call_args, user_pair=user_pair)
            guide_trace, model_trace = loop.trace_first_batch()
            check_sites(model_trace, guide_trace, fit_data)
            enumerated = any(site["type"] == "sample" and site["infer"].get("enumerate")
                             for tr in (guide_trace, model_trace) for site in tr.nodes.values())
            objective = (make_elbo(elbo, enumerated=enumerated, **elbo_args) if isinstance(elbo, str)
                         else make_elbo(elbo))
            config["elbo_class"] = type(objective).__name__
            loop.elbo = objective
            step_args = dict(optimizer=optimizer, lr=lr, optimizer_args=opts.optimizer_args,
                             lr_schedule=lr_schedule, total_steps=total, clip_norm=opts.clip_norm,
                             validate=opts.validate, strategy=strategy)
            loop.step_fn = (CompiledStep(model, guide, objective, required=compile is True,
                                         report=config["compile"], **step_args) if compiled
                            else EagerStep(model, guide, objective, **step_args))
            return loop.run(resume or None)
    finally:
        store.clear()
        store.set_state(outer)
