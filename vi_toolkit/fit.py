"""``fit``: stochastic variational inference for any Pyro model and guide.

Given a model p(x, z) and a guide q(z | x) with parameters phi (and model
parameters theta), ``fit`` maximises the evidence lower bound

    ELBO(theta, phi) = E_q[log p(x, z; theta) - log q(z | x; phi)] <= log p(x)

by stochastic gradient ascent on minibatch estimates (see :mod:`vi_toolkit.plates`
for why the estimate is unbiased, and :mod:`vi_toolkit.elbo` for the objectives).
The same loop fits a three-parameter conjugate model, a Gaussian mixture with
enumerated assignments and a VAE with a million weights.

Each fit runs in a parameter store of its own (Pyro's ``ParamStoreDict.scope``),
so two fits in one process never share parameters; the fitted parameters live
on in the returned :class:`FitResult`.
"""

import contextlib
import inspect
import itertools
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites
from tqdm.auto import tqdm

from .checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from .data import FitData
from .devices import resolve_device
from .distributed import DataParallel, DistributedError, launched
from .elbo import make_elbo
from .linear import linear_backend, resolve_backend
from .optim import make_optimizer, make_scheduler

# the settings a resumed fit must share with the fit that wrote the checkpoint
_RESUME_KEYS = ("elbo", "num_particles", "batch_size", "num_data", "optimizer", "lr",
                "clip_norm", "seed", "drop_last", "world_size")


class FitError(RuntimeError):
    """A fit stopped on an error at ``step``; ``result`` holds its last good state."""

    def __init__(self, message, *, step, result):
        super().__init__(message)
        self.step, self.result = step, result


class DivergenceError(FitError, FloatingPointError):
    """The loss became NaN or infinite at ``step``; ``site`` names the culprit if found."""

    def __init__(self, message, *, step, last_elbo, site, result):
        super().__init__(message, step=step, result=result)
        self.last_elbo, self.site = last_elbo, site


@dataclass
class FitEvent:
    """What a callback sees after each epoch (or logging interval of a full-batch fit)."""

    step: int
    epoch: int
    elbo: float
    val_elbo: float
    result: "FitResult"


class FitResult:
    """A fitted model and guide, their parameters, the history and the configuration.

    ``history`` holds ``loss`` (the loss, -ELBO estimate of the whole data set, at
    every step) and, at every epoch (every logging interval of a full-batch fit),
    ``step``, ``epoch``, ``elbo`` (training ELBO per data point), ``val_elbo``
    (held-out ELBO per data point, if ``val_data`` was given), ``lr`` and ``time``.
    Use :meth:`scope` to run the model or guide with the fitted parameters.
    """

    def __init__(self, model, guide, history, config, param_state, device, stopped):
        self.model, self.guide, self.history = model, guide, history
        self.config, self.param_state, self.device, self.stopped = config, param_state, device, stopped

    @contextlib.contextmanager
    def scope(self):
        """Make this fit's parameters Pyro's active parameter store inside the block."""
        with pyro.get_param_store().scope(self.param_state):
            yield

    @property
    def params(self):
        """Constrained values of every parameter, by name (detached)."""
        with self.scope():
            store = pyro.get_param_store()
            return {name: store[name].detach() for name in store.keys()}

    @property
    def elbo(self):
        """The last training ELBO per data point."""
        return self.history["elbo"][-1] if self.history["elbo"] else float("nan")

    @property
    def val_elbo(self):
        """The last held-out ELBO per data point, or None."""
        values = self.history["val_elbo"]
        return values[-1] if values else None

    def __repr__(self):
        name = lambda f: getattr(f, "__name__", type(f).__name__)  # noqa: E731
        val = "" if self.val_elbo is None else f", val_elbo={self.val_elbo:.4g}"
        steps = len(self.history["loss"])
        epochs = self.history["epoch"][-1] if self.history["epoch"] else 0
        return (f"FitResult(model={name(self.model)}, guide={name(self.guide)}, "
                f"elbo={self.config['elbo']}, steps={steps}, epochs={epochs}, "
                f"elbo_per_point={self.elbo:.4g}{val}, device={self.device}, "
                f"stopped={self.stopped!r})")


def _accepts(fn, keyword):
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return True
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _modules(*fns):
    return {role: fn for role, fn in zip(("model", "guide"), fns) if isinstance(fn, torch.nn.Module)}


def trace_pair(model, guide, args, kwargs):
    """Run the guide, then the model against it; both traces without subsample sites.

    A failure names which of the two raised.
    """
    try:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    except Exception as err:
        raise ValueError(f"the guide failed: {type(err).__name__}: {err}") from err
    try:
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs)
    except Exception as err:
        raise ValueError(f"the model failed: {type(err).__name__}: {err}") from err
    return prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)


def _describe(tensors):
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in tensors)


class _Fit:
    """One run of the SVI loop; ``fit`` builds it, runs it and returns its result."""

    def __init__(self, model, guide, data, *, val_data, elbo, num_particles, vectorize_particles,
                 max_plate_nesting, optimizer, lr, optimizer_args, clip_norm, lr_schedule,
                 batch_size, num_epochs, num_steps, drop_last, val_batch_size, patience,
                 tol_rel_obj, log_every, callbacks, transform, validate, device, seed, progress,
                 checkpoint, checkpoint_every, distributed, linear_backend):
        if distributed not in ("auto", True, False):
            raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
        self.dist = DataParallel(device) if distributed is True or (
            distributed == "auto" and launched()) else None
        self.device = resolve_device(device) if self.dist is None else self.dist.device
        self.model, self.guide = model, guide
        self.linear_backend = linear_backend
        resolve_backend(linear_backend, self.device)  # an unknown name fails before any work
        self.data = FitData(data, name="data", device=self.device)
        self.val = None
        if val_data is not None:
            self.val = FitData(val_data, name="val_data", device=self.device)
            self.data.check_like(self.val)
        n = self.data.num_data
        if batch_size is not None:
            if not isinstance(batch_size, int) or batch_size < 1 or batch_size > n:
                raise ValueError(f"batch_size must be an integer between 1 and the number of "
                                 f"data points ({n}), got {batch_size!r}")
        if num_epochs is not None and num_steps is not None:
            raise ValueError("give num_epochs or num_steps, not both")
        for label, value in (("num_epochs", num_epochs), ("num_steps", num_steps),
                             ("patience", patience), ("log_every", log_every),
                             ("checkpoint_every", checkpoint_every)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if (optimizer == "lbfgs" or optimizer is torch.optim.LBFGS) and batch_size not in (None, n):
            raise ValueError("optimizer='lbfgs' needs the full batch (batch_size=None): its line "
                             "search assumes a deterministic objective")
        if patience is not None and self.val is None:
            raise ValueError("patience (early stopping) needs val_data to watch")
        if tol_rel_obj is not None and not tol_rel_obj > 0:
            raise ValueError(f"tol_rel_obj must be positive, got {tol_rel_obj!r}")
        self.batch_size = batch_size
        self.minibatch = batch_size is not None and batch_size < n
        if self.minibatch:
            self.steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
            self.total = num_steps or (num_epochs or 10) * self.steps_per_epoch
            self.log_every = log_every or min(self.steps_per_epoch, 100)
        else:
            self.steps_per_epoch = 1
            self.total = num_steps or num_epochs or 1000
            self.log_every = log_every or max(1, min(100, self.total // 20))
        if self.dist is not None:
            self.check_distributed(optimizer, drop_last)
        self.pass_num_data = _accepts(model, "num_data")
        if self.pass_num_data and not _accepts(guide, "num_data"):
            raise ValueError("the guide must take the same arguments as the model, including "
                             "the keyword num_data (see vi_toolkit.plates)")
        if (self.minibatch or self.dist is not None) and not self.pass_num_data:
            what = ("minibatching (batch_size < number of data points)" if self.minibatch
                    else "a distributed fit (each process fits a part of the data)")
            raise ValueError(f"{what} needs a model "
                             "that takes the keyword num_data and opens its data plate with "
                             "vi_toolkit.data_plate(x, num_data), so local terms are scaled by "
                             "N/B (see vi_toolkit.plates)")
        self.elbo_spec = elbo
        self.elbo_args = dict(num_particles=num_particles, vectorize_particles=vectorize_particles,
                              max_plate_nesting=max_plate_nesting)
        if isinstance(elbo, str):  # fail on an unknown name before any work is done
            make_elbo(elbo, **self.elbo_args)
        else:
            make_elbo(elbo)
        self.optimizer_spec, self.lr, self.optimizer_args = optimizer, lr, optimizer_args
        self.clip_norm, self.lr_schedule = clip_norm, lr_schedule
        self.drop_last, self.val_batch_size = drop_last, val_batch_size or batch_size or n
        self.patience, self.tol_rel_obj = patience, tol_rel_obj
        self.callbacks = list(callbacks or ())
        self.transform = transform
        if validate not in (True, False, "first"):
            raise ValueError(f"validate must be True, False or 'first', got {validate!r}")
        self.validate, self.validated = validate, False
        self.progress = progress
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every or 1
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        self.seed = seed
        self.config = {
            "elbo": elbo if isinstance(elbo, str) else type(elbo).__name__,
            "num_particles": num_particles, "batch_size": batch_size or n, "num_data": n,
            "num_epochs": num_epochs, "num_steps": self.total,
            "optimizer": (optimizer if isinstance(optimizer, str)
                          else getattr(optimizer, "__name__", "custom")),
            "lr": lr, "clip_norm": clip_norm,
            "lr_schedule": lr_schedule if isinstance(lr_schedule, (str, type(None))) else "custom",
            "seed": seed, "drop_last": drop_last, "device": str(self.device),
        }
        if self.dist is not None:
            self.config["world_size"] = self.dist.world
        self.history = {k: [] for k in ("loss", "step", "epoch", "elbo", "val_elbo", "lr", "time")}
        self.step = self.epoch = self.pos = 0
        self.interval = []  # losses since the last recorded epoch (or interval)
        self.perm = None
        self.best = None  # (val_elbo, params snapshot)
        self.bad_evals = 0
        self.rel_changes, self.prev_interval_loss = [], None
        self.stopped = None
        self.postfix = {}

    def check_distributed(self, optimizer, drop_last):
        world, n = self.dist.world, self.data.num_data
        if optimizer == "lbfgs" or optimizer is torch.optim.LBFGS:
            raise ValueError("optimizer='lbfgs' cannot run distributed: its line search would "
                             "read each process's own loss")
        smallest = n
        if self.minibatch:
            last = n % self.batch_size
            smallest = self.batch_size if drop_last or last == 0 else min(self.batch_size, last)
        if smallest < world:
            raise ValueError(f"a distributed fit over {world} processes splits each batch "
                             f"across them, but a batch has {smallest} point(s); use batch_size "
                             f">= {world} (and drop_last=True if the last batch of an epoch is "
                             "smaller)")

    # -- model and guide calls -------------------------------------------------------------
    def call_args(self, tensors, fit_data):
        num_data = fit_data.num_data if self.pass_num_data else None
        return fit_data.call_args(tensors, num_data)

    def device_context(self):
        return torch.device(self.device) if self.device.type != "cpu" else contextlib.nullcontext()

    def linear_context(self):
        """oneDNN for the float32 linear layers of the fit, where chosen (:mod:`vi_toolkit.linear`);
        ``"auto"`` considers it only for a model or guide with ``nn.Linear`` layers."""
        layers = any(isinstance(layer, torch.nn.Linear)
                     for module in _modules(self.model, self.guide).values() for layer in module.modules())
        backend = self.linear_backend if layers or self.linear_backend != "auto" else "torch"
        self.config["linear_backend"] = resolved = resolve_backend(backend, self.device)
        return linear_backend(resolved, self.device)

    def initialise(self):
        """Run guide and model once: create (lazy) parameters, pick the ELBO, check plates."""
        for module in _modules(self.model, self.guide).values():
            module.to(self.device)
        tensors = self.data.batch(torch.arange(min(self.batch_size or self.data.num_data,
                                                   self.data.num_data), device=self.device))
        if self.transform is not None:
            tensors = self.transform(tensors)
        args, kwargs = self.call_args(tensors, self.data)
        try:
            with torch.no_grad(), pyro.validation_enabled(self.validate is not False):
                guide_trace, model_trace = trace_pair(self.model, self.guide, args, kwargs)
        except ValueError as err:
            raise ValueError(f"{err} (on the first batch of data: {_describe(tensors)})") from err
        enumerated = any(site["type"] == "sample" and site["infer"].get("enumerate")
                         for tr in (guide_trace, model_trace) for site in tr.nodes.values())
        if isinstance(self.elbo_spec, str):
            self.elbo = make_elbo(self.elbo_spec, enumerated=enumerated, **self.elbo_args)
        else:
            self.elbo = make_elbo(self.elbo_spec)
        self.config["elbo_class"] = type(self.elbo).__name__
        if self.elbo.max_plate_nesting == float("inf"):
            # Pyro would guess it by tracing inside the first step; guess it now, so that no
            # step draws random numbers that the step before it did not (exact resume)
            quiet = logging.getLogger("pyro.infer.elbo")  # Pyro logs its guess at INFO
            level = quiet.level
            quiet.setLevel(logging.WARNING)
            try:
                self.elbo._guess_max_plate_nesting(self.model, self.guide, args, kwargs)
            finally:
                quiet.setLevel(level)
        if self.minibatch or self.dist is not None:
            sizes = {f.full_size or f.size for site in model_trace.nodes.values()
                     if site["type"] == "sample" for f in site["cond_indep_stack"]}
            if self.data.num_data not in sizes:
                raise ValueError(
                    f"minibatching: no plate in the model has size num_data="
                    f"{self.data.num_data}, so its local terms would not be scaled by N/B; "
                    "open the data plate with vi_toolkit.data_plate(x, num_data)")
        self.params = {}
        self.collect_params()
        self.optim = make_optimizer(self.optimizer_spec, list(self.params.values()), self.lr,
                                    self.optimizer_args)
        self.scheduler = make_scheduler(self.lr_schedule, self.optim, self.total)

    def collect_params(self):
        """Register parameters that appeared in the store (or in nn.Modules) since last time."""
        new = []
        self.store_size = len(pyro.get_param_store())
        for name, p in sorted(pyro.get_param_store().named_parameters()):
            if name not in self.params:
                if p.device != self.device:
                    p.data = p.data.to(self.device)
                self.params[name] = p
                new.append(p)
        seen = {id(p) for p in self.params.values()}
        for role, module in _modules(self.model, self.guide).items():
            for name, p in module.named_parameters():
                if id(p) not in seen and p.requires_grad:
                    self.params[f"{role}.{name}"] = p
                    seen.add(id(p))
                    new.append(p)
        return new

    # -- one step ------------------------------------------------------------------------
    def next_batch(self):
        n, b = self.data.num_data, self.batch_size
        if not self.minibatch:
            if self.dist is None:
                return self.data.tensors, True
            index, end = torch.arange(n, device=self.device), True
        else:
            if self.pos == 0:
                self.perm = torch.randperm(n, device=self.device)
                if self.dist is not None:  # every process splits rank 0's permutation
                    self.dist.broadcast_(self.perm)
            index = self.perm[self.pos:self.pos + b]
            self.pos += b
            end = self.pos >= n or (self.drop_last and self.pos + b > n)
            if end:
                self.pos = 0
        if self.dist is not None:  # this process's part of the batch, and its share
            shard = self.dist.shard(index)
            self.share = shard.numel() / index.numel()
            index = shard
        return self.data.batch(index), end

    def loss(self, tensors, fit_data):
        args, kwargs = self.call_args(tensors, fit_data)
        return self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)

    def train_step(self, tensors):
        """One optimiser step on ``tensors``; the loss is returned on the device, unread."""
        if self.transform is not None:
            tensors = self.transform(tensors)

        def closure():  # L-BFGS evaluates it several times per step, the others once
            validate = self.validate is True or (self.validate == "first" and not self.validated)
            with pyro.validation_enabled(validate):
                loss = self.loss(tensors, self.data)
            self.validated = True
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            if self.dist is not None:
                self.dist.reduce_gradients(list(self.params.values()), self.share)
            if self.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.clip_norm)
            return loss

        loss = self.optim.step(closure)
        if len(pyro.get_param_store()) > self.store_size:  # a parameter created lazily
            for p in self.collect_params():
                self.optim.add_param_group({"params": [p]})
        if self.scheduler is not None:
            self.scheduler.step()
        # distributed: this process's share of the global loss, summed when read back
        return loss.detach() if self.dist is None else loss.detach() * self.share

    @torch.no_grad()
    def evaluate(self, fit_data):
        """ELBO per data point on ``fit_data``: sum of batch estimates scaled to N, over N."""
        total, count = torch.zeros((), device=self.device), 0
        batches = fit_data.batches(self.val_batch_size)
        if self.dist is not None:  # each process its share of the batches, then the sum
            batches = itertools.islice(batches, self.dist.rank, None, self.dist.world)
        for tensors in batches:
            total = total + self.loss(tensors, fit_data) * tensors[0].shape[0] / fit_data.num_data
            count += tensors[0].shape[0]
        if self.dist is not None:
            total = self.dist.sum(total)
        return -float(total) / fit_data.num_data

    # -- state: snapshots and checkpoints ------------------------------------------------
    def state(self):
        buffers = {role: {k: v.detach().clone() for k, v in m.named_buffers()}
                   for role, m in _modules(self.model, self.guide).items()}
        return {
            "config": dict(self.config),
            "params": {k: p.detach().clone() for k, p in self.params.items()},
            "buffers": buffers,
            "optimizer": _map_tensors(lambda t: t.detach().clone(), self.optim.state_dict()),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "history": {k: list(v) for k, v in self.history.items()},
            "progress": {"step": self.step, "epoch": self.epoch, "pos": self.pos,
                         "perm": None if self.perm is None else self.perm.clone(),
                         "interval": list(self.interval),
                         "bad_evals": self.bad_evals, "rel_changes": list(self.rel_changes),
                         "prev_interval_loss": self.prev_interval_loss},
            "rng": get_rng_state(),
        }

    def load_state(self, state, source):
        missing = set(self.params) - set(state["params"])
        extra = set(state["params"]) - set(self.params)
        if missing or extra:
            raise ValueError(f"{source}: parameters do not match this model and guide "
                             f"(missing {sorted(missing)}, unexpected {sorted(extra)})")
        with torch.no_grad():
            for name, p in self.params.items():
                value = state["params"][name]
                if value.shape != p.shape:
                    raise ValueError(f"{source}: parameter {name!r} has shape "
                                     f"{tuple(value.shape)}, the model's has {tuple(p.shape)}")
                p.copy_(value)
            for role, module in _modules(self.model, self.guide).items():
                for k, buf in module.named_buffers():
                    if k in state["buffers"].get(role, {}):
                        buf.copy_(state["buffers"][role][k])
        self.optim.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        prog = state["progress"]
        self.step, self.epoch, self.pos = prog["step"], prog["epoch"], prog["pos"]
        self.perm = None if prog["perm"] is None else prog["perm"].to(self.device)
        self.bad_evals, self.rel_changes = prog["bad_evals"], list(prog["rel_changes"])
        self.interval = list(prog["interval"])
        self.prev_interval_loss = prog["prev_interval_loss"]
        set_rng_state(state["rng"])

    def resume_from(self, path):
        if self.dist is None:
            state = load_checkpoint(path)
        else:  # rank 0 reads it: the other nodes need no shared file system
            state = self.dist.broadcast_object(load_checkpoint(path) if self.dist.rank == 0 else None)
        old = state["config"]
        diff = {k: (old.get(k), self.config.get(k)) for k in _RESUME_KEYS
                if old.get(k) != self.config.get(k)}
        if diff:
            raise ValueError(f"cannot resume from {os.fspath(path)!r}: settings differ "
                             f"(checkpoint, now): {diff}")
        self.load_state(state, f"checkpoint {os.fspath(path)!r}")
        if self.dist is not None:
            self.dist.restore_stream(state["rng_ranks"])

    def save(self):
        state = self.state()
        if self.dist is not None:  # every process's random streams; rank 0 writes
            state["rng_ranks"] = self.dist.gather_objects(state["rng"])
            if self.dist.rank != 0:
                return
        save_checkpoint(self.checkpoint, _map_tensors(torch.Tensor.cpu, state))

    def result(self):
        return FitResult(self.model, self.guide, self.history, dict(self.config),
                         pyro.get_param_store().get_state(), self.device, self.stopped)

    # -- divergence ----------------------------------------------------------------------
    def offending_site(self, tensors):
        """Name the first parameter or site whose value or log-density is not finite."""
        for name, p in self.params.items():
            if not torch.isfinite(p).all():
                return f"parameter {name!r}"
        args, kwargs = self.call_args(tensors, self.data)
        try:  # without validation, so that a bad value shows as a non-finite log-density
            with torch.no_grad(), pyro.validation_enabled(False):
                guide_trace, model_trace = trace_pair(self.model, self.guide, args, kwargs)
                for role, trace in (("guide", guide_trace), ("model", model_trace)):
                    trace.compute_log_prob()
                    for name, site in trace.nodes.items():
                        if site["type"] == "sample" and not torch.isfinite(site["log_prob_sum"]):
                            return f"{role} site {name!r}"
        except Exception as err:  # the site raised instead of returning inf
            return f"unknown ({err})"
        return None

    # -- the loop ------------------------------------------------------------------------
    def record(self, epoch_losses, start_time):
        """End of an epoch (or logging interval): ELBO, held-out ELBO, stopping, callbacks."""
        n = self.data.num_data
        elbo = -sum(epoch_losses) / len(epoch_losses) / n
        val = self.evaluate(self.val) if self.val is not None else None
        h = self.history
        h["step"].append(self.step)
        h["epoch"].append(self.epoch)
        h["elbo"].append(elbo)
        h["lr"].append(self.optim.param_groups[0]["lr"])
        h["time"].append(time.perf_counter() - start_time)
        if val is not None:
            h["val_elbo"].append(val)
        self.postfix["elbo"] = f"{elbo:.4g}"
        if val is not None:
            self.postfix["val_elbo"] = f"{val:.4g}"
        if val is not None and self.patience is not None:
            if self.best is None or val > self.best[0]:
                self.best = (val, {k: p.detach().clone() for k, p in self.params.items()})
                self.bad_evals = 0
            else:
                self.bad_evals += 1
                if self.bad_evals >= self.patience:
                    self.stopped = "early stopping"
        if self.tol_rel_obj is not None:
            loss = -elbo
            if self.prev_interval_loss is not None:
                self.rel_changes.append(abs(loss - self.prev_interval_loss) / max(abs(loss), 1e-12))
                window = self.rel_changes[-max(2, int(0.1 * self.total / self.log_every)):]
                mean, median = sum(window) / len(window), sorted(window)[len(window) // 2]
                if len(window) >= 2 and (mean < self.tol_rel_obj or median < self.tol_rel_obj):
                    self.stopped = "converged"
            self.prev_interval_loss = loss
        if self.checkpoint is not None and len(h["elbo"]) % self.checkpoint_every == 0:
            self.save()
        event = FitEvent(self.step, self.epoch, elbo, val, None)
        for callback in self.callbacks:
            event.result = self.result()
            if callback(event):
                self.stopped = self.stopped or "callback"

    def run(self, resume):
        store = pyro.get_param_store()
        outer = store.get_state()
        store.clear()
        try:
            if self.dist is not None:  # rank 0's seed and choice of checkpoint
                self.dist.connect()
                self.seed = self.config["seed"] = self.dist.broadcast_object(self.seed)
                resume = self.dist.broadcast_object(resume)
            pyro.set_rng_seed(self.seed)
            with self.device_context(), self.linear_context():
                self.initialise()
                if self.dist is not None:  # identical parameters, independent guide noise
                    self.dist.broadcast_(list(self.params.values()))
                    self.dist.seed_stream(self.seed)
                if resume:
                    self.resume_from(resume)
                return self.loop()
        finally:
            store.clear()
            store.set_state(outer)

    def loop(self):
        start_time = time.perf_counter() - (self.history["time"][-1] if self.history["time"] else 0.0)
        good = self.state()
        pending = []
        bar = tqdm(total=self.total, initial=self.step,
                   disable=not self.progress or (self.dist is not None and self.dist.rank != 0),
                   unit="step", dynamic_ncols=True, desc="fit")
        try:
            while self.step < self.total and self.stopped is None:
                tensors, end_of_epoch = self.next_batch()
                try:
                    pending.append(self.train_step(tensors))
                except (KeyboardInterrupt, FitError, DistributedError):
                    raise
                except Exception as err:
                    self.failed(good, err, tensors, bar)
                self.step += 1
                if end_of_epoch:
                    self.epoch += 1
                record = end_of_epoch if self.minibatch else (
                    self.step % self.log_every == 0 or self.step == self.total)
                if not (record or self.step % self.log_every == 0 or self.step == self.total):
                    continue
                losses = torch.stack(pending)  # the only read-back: once an interval
                losses = (losses if self.dist is None else self.dist.sum(losses)).tolist()
                pending = []
                bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
                if bad is None and not torch.stack(
                        [torch.isfinite(p).all() for p in self.params.values()]).all():
                    bad = len(losses) - 1
                if bad is not None:
                    self.diverged(good, self.step - len(losses) + bad + 1, bar)
                self.history["loss"].extend(losses)
                self.interval.extend(losses)
                bar.update(len(losses))
                if record:
                    epoch_losses, self.interval = self.interval, []
                    self.record(epoch_losses, start_time)
                good = self.state()
                points = len(self.history["loss"]) * (self.batch_size or self.data.num_data)
                self.postfix["pts/s"] = f"{points / max(time.perf_counter() - start_time, 1e-9):.3g}"
                bar.set_postfix(self.postfix)
        except KeyboardInterrupt:
            self.load_state(good, "the last good state")
            self.stopped = "interrupted"
            warnings.warn(f"fit interrupted at step {self.step}; returning the state at the "
                          "last completed interval")
        finally:
            bar.close()
        if self.stopped == "early stopping" and self.best is not None:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.best[1][name])
        self.stopped = self.stopped or "max steps"
        if self.checkpoint is not None:
            self.save()
        return self.result()

    def failed(self, good, err, tensors, bar):
        bar.close()
        step = self.step + 1
        self.load_state(good, "the last good state")
        hint = ""
        if self.elbo_args["num_particles"] > 1 and self.elbo_args["vectorize_particles"]:
            hint = (" With vectorized particles every site gets a leading particle dimension: "
                    "write the model with broadcasting (x.new_*, ..., not fixed shapes) or pass "
                    "vectorize_particles=False.")
        raise FitError(f"step {step}: the {type(self.elbo).__name__} loss failed on a batch "
                       f"({_describe(tensors)}): {type(err).__name__}: {err}.{hint} The fit's "
                       f"state at step {self.step} is in the error's .result.",
                       step=step, result=self.result()) from err

    def diverged(self, good, step, bar):
        """Replay from the last good state to the failing step, name the culprit, restore."""
        bar.close()
        self.load_state(good, "the last good state")
        while self.step < step - 1:  # the replay is exact: the state holds every RNG
            self.train_step(self.next_batch()[0])
            self.step += 1
        site = self.offending_site(self.next_batch()[0])
        self.load_state(good, "the last good state")
        self.stopped = "diverged"
        last = self.history["elbo"][-1] if self.history["elbo"] else None
        last_text = "none yet" if last is None else f"{last:.6g} per data point"
        where = f"; offending: {site}" if site else ""
        raise DivergenceError(
            f"the loss became NaN or infinite at step {step}{where}. The last finite ELBO was "
            f"{last_text}; the fit's parameters are restored to step {self.step} (the error's "
            ".result holds them). Lower lr, set clip_norm, or check the model's scales.",
            step=step, last_elbo=last, site=site, result=self.result())


def _map_tensors(fn, obj):
    """``obj`` (nested dicts, lists and tuples) with ``fn`` applied to every tensor in it."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(fn, v) for v in obj)
    return obj


def fit(model, guide, data, *, elbo="auto", num_particles=1, vectorize_particles=True,
        max_plate_nesting=None, optimizer="adam", lr=1e-3, optimizer_args=None, clip_norm=None,
        lr_schedule=None, batch_size=None, num_epochs=None, num_steps=None, drop_last=False,
        val_data=None, val_batch_size=None, patience=None, tol_rel_obj=None, log_every=None,
        callbacks=(), transform=None, validate="first", device="auto", seed=None, progress=True,
        checkpoint=None, checkpoint_every=None, resume=False, distributed="auto",
        linear_backend="auto"):
    """Fit ``guide`` to the posterior of ``model`` given ``data`` by maximising the ELBO.

    Args:
        model, guide: Pyro callables taking the data (and ``num_data``, see
            :mod:`vi_toolkit.plates`): functions using ``pyro.param``/``pyro.module``,
            ``PyroModule``\\ s, or autoguides.
        data: a tensor, or a tuple or dict of tensors sharing dimension 0 (data points).
        elbo: ``"auto"``, ``"trace"``, ``"meanfield"``, ``"enum"``, ``"iwae"`` or a Pyro ELBO.
        num_particles, vectorize_particles, max_plate_nesting: passed to the ELBO.
        optimizer, lr, optimizer_args, clip_norm, lr_schedule: see :mod:`vi_toolkit.optim`;
            ``clip_norm`` clips the global gradient norm.
        batch_size: minibatch size (``None``: full batch). ``num_epochs`` passes over the
            data (default 10), or ``num_steps`` optimisation steps (full batch: default 1000).
        val_data: held-out data of the same structure; its ELBO per point is recorded
            each epoch. ``patience``: stop after that many epochs without improvement
            of it and restore the best parameters.
        tol_rel_obj: stop when the relative change of the interval-averaged loss falls
            below this (mean or median over a window, as Stan's ADVI).
        log_every: steps between read-backs of the loss (progress bar, divergence check).
        callbacks: callables receiving a :class:`FitEvent` each epoch; a true return stops.
        transform: callable applied to each training batch (list of tensors), e.g.
            dynamic binarization or input corruption.
        validate: check distribution arguments and values (Pyro's validation) on the
            first traces and step only (``"first"``, the default: the checks cost about 10%
            of a small network's step), at every step (``True``), or never (``False``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        seed: seeds torch, numpy and random; ``None`` draws one (kept in ``config``).
        progress: show a tqdm progress bar.
        checkpoint: path of a checkpoint written each epoch (``checkpoint_every`` epochs)
            and at the end. resume: ``True`` resumes from ``checkpoint`` if it exists,
            or a path to resume from.
        distributed: run data-parallel over the processes ``torchrun`` started
            (``"auto"``: when ``WORLD_SIZE`` > 1, ``True``: required, ``False``: never).
            Each batch of ``batch_size`` points (the global batch) is split across the
            processes, gradients are averaged (weighted by each process's share of the
            batch), every process keeps identical parameters;
            only rank 0 shows progress and writes checkpoints (see
            :mod:`vi_toolkit.distributed`).
        linear_backend: ``"auto"``, ``"onednn"`` or ``"torch"``: which library computes the
            float32 linear layers on the CPU (:mod:`vi_toolkit.linear`; ``"auto"``: oneDNN
            where torch's MKL does not use the CPU's full vector width, i.e. on non-Intel
            CPUs, for a model or guide with ``nn.Linear`` layers).

    Returns:
        :class:`FitResult`. Raises ``ValueError`` for bad input and
        :class:`DivergenceError` if the loss becomes NaN or infinite.
    """
    run = _Fit(model, guide, data, val_data=val_data, elbo=elbo, num_particles=num_particles,
               vectorize_particles=vectorize_particles, max_plate_nesting=max_plate_nesting,
               optimizer=optimizer, lr=lr, optimizer_args=optimizer_args, clip_norm=clip_norm,
               lr_schedule=lr_schedule, batch_size=batch_size, num_epochs=num_epochs,
               num_steps=num_steps, drop_last=drop_last, val_batch_size=val_batch_size,
               patience=patience, tol_rel_obj=tol_rel_obj, log_every=log_every,
               callbacks=callbacks, transform=transform, validate=validate, device=device, seed=seed,
               progress=progress, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
               distributed=distributed, linear_backend=linear_backend)
    if resume is True:
        if checkpoint is None:
            raise ValueError("resume=True needs checkpoint=PATH to resume from")
        resume = checkpoint if os.path.exists(checkpoint) else None
    elif resume:  # distributed: rank 0 reads the checkpoint, the other nodes need not see it
        if not os.path.exists(resume) and (run.dist is None or run.dist.rank == 0):
            raise ValueError(f"resume: checkpoint {os.fspath(resume)!r} does not exist")
    return run.run(resume or None)
