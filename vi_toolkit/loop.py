"""The fit loop: batches, steps, the once-an-interval read-back, divergence, callbacks.

One pass of the loop draws a batch (a fresh permutation of the data each epoch, split
across processes by the strategy), applies the ``transform``, runs one step
(:mod:`vi_toolkit.step`) and calls every callback's ``on_step_end``. Losses stay on the
device; once a logging interval (at most 100 steps, and at every epoch's end) they are read
back together, the only host sync of the loop, and checked: a NaN or infinite loss or
parameter is a divergence, answered by replaying the interval from its last good state
(every random number generator included, so the replay is exact) to name the first
parameter or site that is not finite, then a :class:`~vi_toolkit.DivergenceError` that
holds the last good state. At each epoch's end (a full-batch fit: each interval) the
training ELBO per point, the held-out ELBO and the learning rate are recorded and the
callbacks' ``on_epoch_end`` runs.

Several data sets (:class:`~vi_toolkit.data.DataSets`): each step takes every set's next
batch from a permutation of that set; an epoch is ``steps_per_epoch`` steps, the pass of the
set that needs the most batches, every set starts a new permutation with each epoch, and a
set covered before the epoch ends starts another. At
each epoch's end the ELBO of every set s is evaluated over the whole set, in its own batches,
with the terms of every site outside its plate masked out (:func:`~vi_toolkit.plates.only_plate`):
``elbo_<s>`` = (1/N_s) sum_i E_q[log p(x_si, z_si | theta) - log q(z_si | x_si)], per point of
the set; global terms (a prior on theta) are in the total ``elbo`` only.

A step that can (:meth:`~vi_toolkit.compiled.CompiledStep.update_block`: a compiled step on
the CPU) runs the steps up to the next read-back as one call, a loop in its graph; the callbacks'
``on_step_end`` then runs once, after the block, which only callbacks that declare
``every_step = False`` (the progress bar) allow; every other callback, a ``transform`` (whose
random draws would come before the block's) and several data sets keep one step a call.

The loop owns the fit's progress (step, epoch, position in the permutation, history) and
assembles the checkpoint: the step's state, the progress, the callbacks' states and every
random number generator's state.
"""

import contextlib
import copy
import logging
import math
import time
import warnings

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuide

from .callbacks import Callback, FitState
from .checkpoint import get_rng_state, load_checkpoint, set_rng_state
from .data import DataSets
from .distributed import DistributedError
from .errors import DivergenceError, FitError
from .optim import current_lr
from .plates import only_plate
from .result import PROBE_POINTS, FitResult, capture_state
from .step import map_tensors
from .traces import describe_tensors, modules_of, trace_pair, unwrapped

# the settings a resumed fit must share with the fit that wrote the checkpoint
RESUME_KEYS = ("elbo", "num_particles", "batch_size", "num_data", "optimizer", "lr",
               "clip_norm", "seed", "drop_last", "world_size", "data_fingerprint", "data_sets")
POINTS_ON_DIM0 = ("the toolkit takes dimension 0 as the data points, so the ELBO per point, minibatches "
                  "and held-out evaluation would count the wrong thing: put the data points on dimension 0")
HISTORY_KEYS = ("loss", "step", "epoch", "elbo", "val_elbo", "lr", "time")


class Loop:
    """One run of the SVI loop over ``data`` with ``step_fn`` (see the module)."""

    def __init__(self, model, guide, data, *, val_data, step_fn, strategy, elbo, batch_size,
                 total_steps, steps_per_epoch, log_every, drop_last, val_batch_size, transform,
                 callbacks, config, call_args, user_pair=None):
        self.model, self.guide, self.data, self.val = model, guide, data, val_data
        self.user_pair = user_pair or (model, guide)  # as given, before callbacks wrapped them
        self.step_fn, self.strategy, self.elbo = step_fn, strategy, elbo
        self.batch_size, self.total_steps, self.steps_per_epoch = batch_size, total_steps, steps_per_epoch
        self.sets = isinstance(data, DataSets)  # batch_size is then {set: B_s}
        self.minibatch = data.minibatched(batch_size)
        self.log_every, self.drop_last, self.val_batch_size = log_every, drop_last, val_batch_size
        self.transform, self.callbacks, self.config = transform, callbacks, config
        self.call_args = call_args
        self.device = strategy.device
        self.history = {k: [] for k in HISTORY_KEYS + tuple(f"elbo_{s}" for s in (data.sizes if self.sets else ()))}
        self.step = self.epoch = self.pos = 0
        self.interval = []  # losses since the last recorded epoch (or interval)
        self.perm = None
        if self.sets:  # each set's position in its own permutation
            self.pos, self.perm = {s: 0 for s in data.sizes}, {}
        self.share = 1.0
        self.most = 1  # the most steps a call of the step runs (see block_steps)
        self.state = FitState(self)

    # -- batches -------------------------------------------------------------------------
    def next_batch(self):
        """The next training batch (this process's part) and whether it ends an epoch."""
        n, b = self.data.num_data, self.batch_size
        if self.sets and self.minibatch:
            return self.next_set_batches()
        if not self.minibatch:
            if self.strategy.world == 1:
                return self.data.tensors, True
            index, end = torch.arange(n, device=self.device), True
        else:
            if self.pos == 0:
                self.perm = torch.randperm(n, device=self.device)
                self.strategy.broadcast_(self.perm)  # every process splits rank 0's permutation
            index = self.perm[self.pos:self.pos + b]
            self.pos += b
            end = self.pos >= n or (self.drop_last and self.pos + b > n)
            if end:
                self.pos = 0
        index, self.share = self.strategy.shard(index)
        return self.data.batch(index), end

    def next_set_batches(self):
        """Every set's next batch (see the module) and whether the step ends an epoch."""
        if self.step % self.steps_per_epoch == 0:  # every set starts a pass with the epoch
            self.pos = {s: 0 for s in self.pos}
        index = {}
        for s, n in self.data.sizes.items():
            b, pos = self.batch_size[s], self.pos[s]
            if b == n:
                index[s] = None
                continue
            if pos == 0:
                self.perm[s] = torch.randperm(n, device=self.device)
            index[s] = self.perm[s][pos:pos + b]
            pos += b
            self.pos[s] = 0 if pos >= n or (self.drop_last and pos + b > n) else pos
        return self.data.batch(index), (self.step + 1) % self.steps_per_epoch == 0

    def transformed(self, tensors):
        if self.transform is None:
            return tensors
        out = self.transform(tensors)
        if not isinstance(out, (list, tuple)) or len(out) != len(tensors) or not all(
                torch.is_tensor(t) for t in out):
            name = getattr(self.transform, "__name__", type(self.transform).__name__)
            raise ValueError(f"transform {name} must return a list of {len(tensors)} tensor(s), the "
                             f"batch's tensors in order, got {type(out).__name__}")
        return out

    def train_step(self, tensors):
        args, kwargs = self.call_args(self.transformed(tensors), self.data)
        return self.step_fn.update(args, kwargs, self.share)

    # -- initialisation ------------------------------------------------------------------
    def trace_first_batch(self):
        """Run guide and model once on the first batch: lazy parameters come into being.

        Returns:
            ``(guide_trace, model_trace)``; a failure is a ``ValueError`` naming the batch.
        """
        for module in modules_of(self.model, self.guide).values():
            module.to(self.device)
        first = ({s: torch.arange(b, device=self.device) for s, b in self.batch_size.items()} if self.sets
                 else torch.arange(self.batch_size, device=self.device))
        tensors = self.transformed(self.data.batch(first))
        args, kwargs = self.call_args(tensors, self.data)
        self.first_args = args, kwargs
        try:
            with torch.no_grad(), pyro.validation_enabled(self.config["validate"] is not False):
                guide_trace, model_trace = trace_pair(self.model, self.guide, args, kwargs)
        except ValueError as err:
            mismatch = _shape_mismatch(self.model, self.guide, args, kwargs)
            if mismatch:
                raise ValueError(mismatch) from err
            hint = "".join(
                f"; {label} has integer dtype {t.dtype}: if the model observes real values there, "
                "pass float data (x.float())" for label, t in zip(self.data.labels(), tensors)
                if not (t.is_floating_point() or t.is_complex()))
            raise ValueError(f"{err} (on the first batch of data: {describe_tensors(tensors)}){hint}") from err
        frames = {(f.name, f.full_size or f.size, f.size) for site in model_trace.nodes.values()
                  if site["type"] == "sample" for f in site["cond_indep_stack"] if f.vectorized}
        n, b = self.data.num_data, tensors[0].shape[0]
        if self.sets:
            self.check_set_plates(model_trace, frames)
        elif self.minibatch or self.strategy.world > 1:
            if not self.config["passes_num_data"] and not any(
                    full == n and size == b for _, full, size in frames):
                raise ValueError(
                    "minibatching (batch_size < number of data points) needs a model that takes the "
                    "keyword num_data and opens its data plate with vi_toolkit.data_plate(x, num_data), "
                    f"or a plate of full size {n} over the batch (pyro.plate(name, {n}, "
                    f"subsample_size={b})), so local terms are scaled by N/B (see vi_toolkit.plates)")
            if n not in {full for _, full, _ in frames}:
                raise ValueError(
                    f"minibatching: no plate in the model has size num_data="
                    f"{n}, so its local terms would not be scaled by N/B; "
                    "open the data plate with vi_toolkit.data_plate(x, num_data)")
            per_point = _per_point_autoguide_site(unwrapped(self.user_pair[1]), n)
            if per_point:
                raise ValueError(per_point)
        elif frames and n not in {full for _, full, _ in frames}:
            sizes = ", ".join(f"{name!r} of size {full}" for name, full, _ in sorted(frames))
            warnings.warn(f"data: dimension 0 holds {n} points, but no plate of the model has that "
                          f"size (its plates: {sizes}); {POINTS_ON_DIM0}", stacklevel=3)
        nested = _nested_data_plate(model_trace, tensors)
        if nested:
            warnings.warn(f"data: {nested}; {POINTS_ON_DIM0} (e.g. data.T)", stacklevel=3)
        for p in pyro.get_param_store().values():
            if p.device != self.device:
                p.data = p.data.to(self.device)
        return guide_trace, model_trace

    def check_set_plates(self, model_trace, frames):
        """Each data set has a plate of its own name and size over its batch, and no site lies in
        two sets' plates; else a ``ValueError`` naming the set."""
        for s, n in self.data.sizes.items():
            b = self.batch_size[s]
            if (s, n, b) not in frames:
                found = sorted(f"{name!r} of size {full} over {size}" for name, full, size in frames
                               if name == s) or "none"
                raise ValueError(
                    f"data set {s!r} ({n} points, batches of {b}): the model opens no plate named {s!r} "
                    f"of size {n} over its batch (plates named {s!r}: {found}); open it with "
                    f"vi_toolkit.data_plate(x, num_data, name={s!r}) in a model that takes num_data, so "
                    "that the set's terms are scaled by N_s/B_s and its ELBO can be reported")
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            inside = sorted({f.name for f in site["cond_indep_stack"]} & set(self.data.sizes))
            if len(inside) > 1:
                raise ValueError(f"site {name!r} lies in the plates of data sets {inside}: each site "
                                 "belongs to one set's plate, or to none (a global site)")

    def initialise(self):
        """Fix the ELBO's plate nesting before the first step, build the step's optimizer."""
        if self.elbo.max_plate_nesting == float("inf"):
            # Pyro would guess it by tracing inside the first step; guess it now, so that no
            # step draws random numbers that the step before it did not (exact resume)
            args, kwargs = self.first_args
            quiet = logging.getLogger("pyro.infer.elbo")  # Pyro logs its guess at INFO
            level = quiet.level
            quiet.setLevel(logging.WARNING)
            try:
                with pyro.validation_enabled(self.config["validate"] is not False):
                    self.elbo._guess_max_plate_nesting(self.model, self.guide, args, kwargs)
            finally:
                quiet.setLevel(level)
        self.step_fn.init()

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, fit_data):
        """ELBO per data point on ``fit_data``: sum of batch estimates scaled to N, over N."""
        total = torch.zeros((), device=self.device)
        batches = list(fit_data.batches(self.val_batch_size))
        for tensors in batches[self.strategy.rank::self.strategy.world]:
            args, kwargs = self.call_args(tensors, fit_data)
            total = total + self.step_fn.loss(args, kwargs) * tensors[0].shape[0] / fit_data.num_data
        return -float(self.strategy.sum(total)) / fit_data.num_data

    @torch.no_grad()
    def evaluate_sets(self):
        """``{set: ELBO per point of the set}`` over every whole set (see the module): the other
        sets get one point each, whose terms are masked out with everything else."""
        one = torch.arange(1, device=self.device)
        out = {}
        for s, n in self.data.sizes.items():
            size = self.val_batch_size[s] if isinstance(self.val_batch_size, dict) else self.val_batch_size
            total = 0.0
            for start in range(0, n, size):
                part = torch.arange(start, min(start + size, n), device=self.device)
                index = {other: one for other in self.data.sizes} | {s: part}
                args, kwargs = self.call_args(self.data.batch(index), self.data)
                with only_plate(s):  # the objective's value (Pyro's enum ELBO differentiates only)
                    total += self.elbo.loss(self.model, self.guide, *args, **kwargs) * part.numel() / n
            out[s] = -total / n
        return out

    # -- state ---------------------------------------------------------------------------
    def snapshot(self, all_ranks=False, history=True):
        """The whole state of the fit, as a checkpoint holds it; with ``all_ranks`` the random
        streams of every process too (a collective in a distributed fit). With ``history=False``
        (the last good state, taken at every read-back) the history is held by its lengths:
        it only grows, and a copy at every read-back costs time quadratic in the fit's length;
        and where the steps replay a compiled graph, which draws from torch's generators only,
        Python's and NumPy's states are left out (the replay of a divergence needs the steps'
        generators; reading NumPy's took 0.1-0.2 ms of a block's 2-3 on eight schools)."""
        state = self.step_fn.state_dict()
        state.update({
            "config": dict(self.config),
            "history": ({k: list(v) for k, v in self.history.items()} if history
                        else {k: len(v) for k, v in self.history.items()}),
            "progress": {"step": self.step, "epoch": self.epoch, "pos": copy.copy(self.pos),
                         "perm": map_tensors(torch.clone, self.perm),
                         "interval": list(self.interval)},
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None
                          for cb in self.callbacks],
            "rng": get_rng_state(host=history or self.step_fn.runs_python),
        })
        if all_ranks and self.strategy.world > 1:
            state["rng_ranks"] = self.strategy.gather_objects(state["rng"])
        return state

    def restore(self, state, source):
        self.step_fn.load_state_dict(state, source)
        self.history = {k: list(v) if isinstance(v, list) else self.history[k][:v]
                        for k, v in state["history"].items()}
        prog = state["progress"]
        self.step, self.epoch, self.pos = prog["step"], prog["epoch"], copy.copy(prog["pos"])
        self.perm = map_tensors(lambda t: t.to(self.device), prog["perm"])
        self.interval = list(prog["interval"])
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", [])):
            if cb_state is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
        set_rng_state(state["rng"])

    def resume_from(self, path):
        # rank 0 reads it: the other nodes need no shared file system
        state = self.strategy.broadcast_object(load_checkpoint(path) if self.strategy.is_main else None)
        old = state["config"]
        diff = {k: (old.get(k), self.config.get(k)) for k in RESUME_KEYS
                if old.get(k) != self.config.get(k)}
        if diff:
            raise ValueError(f"cannot resume from {str(path)!r}: settings differ "
                             f"(checkpoint, now): {diff}")
        self.restore(state, f"checkpoint {str(path)!r}")
        if self.strategy.world > 1:
            self.strategy.restore_stream(state["rng_ranks"])

    def probe(self):
        """The first ``PROBE_POINTS`` data points, as data of their own (on the fit's device)."""
        return self.data.first(PROBE_POINTS)

    def result(self):
        probe = map_tensors(lambda t: t.cpu(), self.data.head(PROBE_POINTS))
        model, guide = self.user_pair  # as the user gave them, without the callbacks' handlers
        return FitResult(model, guide, {k: list(v) for k, v in self.history.items()},
                         dict(self.config), capture_state(self.model, self.guide), self.device,
                         self.state.stopped, probe=probe)

    # -- divergence ----------------------------------------------------------------------
    def offending_site(self, tensors):
        """Name the first parameter or site whose value or log-density is not finite."""
        for name, p in self.step_fn.params.items():
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

    def diverged(self, good, step, update=False):
        """Replay from the last good state to the failing step (``update``: through it, whose
        loss was finite and whose update was not), name the culprit, restore."""
        self.restore(good, "the last good state")
        while self.step < (step if update else step - 1):  # exact: the state holds the steps' generators
            self.train_step(self.next_batch()[0])
            self.step += 1
        site = self.offending_site(self.next_batch()[0])
        self.restore(good, "the last good state")
        self.state.stopped = "diverged"
        last = self.history["elbo"][-1] if self.history["elbo"] else None
        last_text = "none yet" if last is None else f"{last:.6g} per data point"
        where = f"; offending: {site}" if site else ""
        what = (f"the update of step {step} made a parameter NaN or infinite (its loss was finite)" if update
                else f"the loss became NaN or infinite at step {step}")
        advice = ("Lower lr, set clip_norm, or check the model's scales; if a parameter left its "
                  "support (a scale below zero), constrain it (pyro.param(..., constraint=...)) or "
                  "project it after every update in a Callback.on_step_end.")
        raise DivergenceError(
            f"{what}{where}. The last finite ELBO was "
            f"{last_text}; the fit's parameters are restored to step {self.step} (the error's "
            f".result holds them). {advice}",
            step=step, last_elbo=last, site=site, result=self.result())

    def failed(self, good, err, tensors):
        step = self.step + 1
        self.restore(good, "the last good state")
        hint = ""
        if self.config["num_particles"] > 1 and self.config.get("vectorize_particles", True):
            hint = (" With vectorized particles every site gets a leading particle dimension: "
                    "write the model with broadcasting (x.new_*, ..., not fixed shapes) or pass "
                    "options={'vectorize_particles': False}.")
        raise FitError(f"step {step}: the {type(self.elbo).__name__} loss failed on a batch "
                       f"({describe_tensors(tensors)}): {type(err).__name__}: {err}.{hint} The fit's "
                       f"state at step {self.step} is in the error's .result.",
                       step=step, result=self.result()) from err

    # -- the loop ------------------------------------------------------------------------
    def record(self, epoch_losses, start_time):
        """End of an epoch (or logging interval): ELBO, held-out ELBO, callbacks."""
        elbo = -sum(epoch_losses) / len(epoch_losses) / self.data.num_data
        val = self.evaluate(self.val) if self.val is not None else None
        h = self.history
        h["step"].append(self.step)
        h["epoch"].append(self.epoch)
        h["elbo"].append(elbo)
        h["lr"].append(current_lr(self.step_fn.optimizer))
        h["time"].append(time.perf_counter() - start_time)
        if val is not None:
            h["val_elbo"].append(val)
        if self.sets:
            for s, value in self.evaluate_sets().items():
                h[f"elbo_{s}"].append(value)
        self.state.elbo, self.state.val_elbo = elbo, val
        self.call("on_epoch_end", "the end of an epoch")

    def call(self, hook, when):
        """Run every callback's ``hook``; an error in one becomes a FitError with the state."""
        for cb in self.callbacks:
            try:
                getattr(cb, hook)(self.state)
            except (KeyboardInterrupt, FitError, DistributedError):
                raise
            except Exception as err:
                name = type(cb).__name__ if not hasattr(cb, "fn") else getattr(cb.fn, "__name__", "callback")
                raise FitError(f"step {self.step}: callback {name}.{hook} failed at {when}: "
                               f"{type(err).__name__}: {err}. The fit's state at step {self.step} "
                               "is in the error's .result.", step=self.step, result=self.result()) from err

    def readback(self, pending):
        """Read the interval's losses back (summed over processes); their first bad index, and
        whether it is bad in its update only (every loss finite, a parameter not)."""
        losses = self.strategy.sum(torch.cat(pending)).tolist()
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is None:
            with torch.no_grad():  # each parameter's largest |value|: inf or nan where any value is
                largest = torch._foreach_norm(list(self.step_fn.params.values()), math.inf)
            if not torch.isfinite(torch.stack(largest)).all():
                return losses, len(losses) - 1, True
        return losses, bad, False

    def block_steps(self) -> int:
        """The most steps one call of the step may run (see the module): the logging interval
        (a minibatch fit: at most an epoch) where nothing must happen between steps, else 1."""
        per_step = any(type(cb).on_step_end is not Callback.on_step_end and cb.every_step
                       for cb in self.callbacks)
        most = min(self.log_every, self.steps_per_epoch) if self.minibatch else self.log_every
        if per_step or self.transform is not None or self.sets or not self.step_fn.runs_blocks(most):
            return 1
        return most

    def next_batches(self, most):
        """The next batches to the next read-back (at most ``most``, and to the epoch's end)
        with whether each ends an epoch; one batch when ``most`` is 1."""
        n = min(most, self.log_every - self.step % self.log_every, self.total_steps - self.step)
        batches = [self.next_batch()]
        while len(batches) < n and not (self.minibatch and batches[-1][1]):
            batches.append(self.next_batch())
        return batches

    def run_block(self, batches, good):
        """The batches' steps, as many of the first as the step runs in one call: their losses,
        or ``None`` (none ran)."""
        calls, made = [], {}  # a full batch: the same tensors, and so one call, every step
        for tensors, _ in batches:
            if id(tensors) not in made:
                made[id(tensors)] = self.call_args(tensors, self.data)
            calls.append(made[id(tensors)])
        try:
            losses = self.step_fn.update_block(calls, self.most)
        except (KeyboardInterrupt, FitError, DistributedError):
            raise
        except Exception as err:
            self.failed(good, err, batches[0][0])
        if losses is None:
            self.most = self.block_steps()  # 1 when blocks stopped for the rest of the fit
            return None
        self.state.loss = losses[-1]
        self.step += len(losses)
        ends = sum(end for _, end in batches[:len(losses)])
        if ends:
            self.epoch += ends
            self.step_fn.end_epoch()
        self.call("on_step_end", f"step {self.step}")
        return losses

    def read_back_if_due(self, end_of_epoch, pending, good, start_time):
        """At a read-back (the logging interval, an epoch's end, the last step): the ``pending``
        losses read back (the list emptied) and checked (a divergence is replayed from ``good``),
        the history and the epoch recorded; the new last good state, else ``good``."""
        last = self.step == self.total_steps or self.state.stopped is not None
        record = end_of_epoch if self.minibatch else (self.step % self.log_every == 0 or last)
        if not (record or self.step % self.log_every == 0 or last):
            return good
        losses, bad, update = self.readback(pending)
        pending.clear()
        if bad is not None:
            self.diverged(good, self.step - len(losses) + bad + 1, update)
        self.history["loss"].extend(losses)
        self.interval.extend(losses)
        if record or (last and self.interval):
            epoch_losses, self.interval = self.interval, []
            self.record(epoch_losses, start_time)
        return self.snapshot(history=False)

    def run(self, resume):
        """Initialise, resume if asked, run the steps; the :class:`FitResult`."""
        self.initialise()
        self.strategy.broadcast_(list(self.step_fn.params.values()))  # identical parameters
        self.strategy.seed_stream(self.config["seed"])  # independent guide noise per process
        if resume:
            self.resume_from(resume)
        self.call("on_fit_start", "the start")
        self.most = self.block_steps()
        start_time = time.perf_counter() - (self.history["time"][-1] if self.history["time"] else 0.0)
        good = self.snapshot(history=False)
        pending = []
        try:
            while self.step < self.total_steps and self.state.stopped is None:
                batches = self.next_batches(self.most)
                losses = self.run_block(batches, good) if len(batches) > 1 else None
                if losses is not None:
                    pending.append(losses)
                    good = self.read_back_if_due(batches[len(losses) - 1][1], pending, good, start_time)
                    batches = batches[len(losses):]
                for tensors, end_of_epoch in batches:  # the steps not run in a block
                    if self.state.stopped is not None:
                        break  # a callback stopped the fit after the block
                    try:
                        self.state.loss = self.train_step(tensors)
                    except (KeyboardInterrupt, FitError, DistributedError):
                        raise
                    except Exception as err:
                        self.failed(good, err, tensors)
                    pending.append(self.state.loss.reshape(1))
                    self.step += 1
                    if end_of_epoch:
                        self.epoch += 1
                        self.step_fn.end_epoch()
                    self.call("on_step_end", f"step {self.step}")
                    good = self.read_back_if_due(end_of_epoch, pending, good, start_time)
        except KeyboardInterrupt:
            self.restore(good, "the last good state")
            self.state.stopped = "interrupted"
            warnings.warn(f"fit interrupted at step {self.step}; returning the state at the "
                          "last completed interval")
        finally:
            for cb in self.callbacks:  # a progress bar left open garbles the next output
                if hasattr(cb, "close"):
                    cb.close()
        self.state.stopped = self.state.stopped or "max steps"
        self.call("on_fit_end", "the end")
        return self.result()


def _shape_mismatch(model, guide, args, kwargs):
    """After a failed paired trace: a guide site whose shape does not fit the model's prior draw
    of the same site (the model then fails at a later site, which would be named instead)."""
    try:
        with torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            prior_trace = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(*args, **kwargs)
    except Exception:
        return None
    for name, site in guide_trace.nodes.items():
        prior = prior_trace.nodes.get(name)
        if site["type"] != "sample" or prior is None or prior["is_observed"]:
            continue
        if tuple(site["value"].shape) != tuple(prior["value"].shape):
            return (f"guide site {name!r} has shape {tuple(site['value'].shape)}, but the model's "
                    f"{name!r} has shape {tuple(prior['value'].shape)}")
    return None


def _per_point_autoguide_site(guide, num_data):
    """Why a minibatch fit would pair an autoguide's per-point parameters with other points, or
    ``None``.

    An autoguide keeps parameters for each data point of a latent site inside the data plate
    (size N); without ``create_plates`` it opens that plate itself with a random subsample of
    its own, which is not the batch the fit drew, so each point's parameters would be fitted
    to other points' data.
    """
    if not isinstance(guide, AutoGuide) or getattr(guide, "create_plates", None) is not None:
        return None
    sites = sorted(name for name, site in getattr(guide, "prototype_trace", poutine.Trace()).nodes.items()
                   if site["type"] == "sample" and not site["is_observed"]
                   and any(f.vectorized and (f.full_size or f.size) == num_data for f in site["cond_indep_stack"]))
    if not sites:
        return None
    return (f"guide {type(guide).__name__} keeps parameters for each of the {num_data} data points of "
            f"latent site(s) {sites}, and opens the data plate with a random subsample of its own, "
            "not the batch the fit drew: in minibatches each point's parameters would be fitted to "
            "other points. Fit on the full batch (batch_size=None), use an amortized guide (an "
            "encoder of x), or pass each point's index with the data, data=(x, torch.arange(N)), "
            "open the model's plate with pyro.plate('data', N, subsample=index) and give the "
            "autoguide the same plate: create_plates=lambda x, index, num_data=None: "
            "pyro.plate('data', N, subsample=index)")


def _nested_data_plate(model_trace, tensors):
    """Where an observed data tensor's dimension 0 is a plate nested inside a plate over another
    of its dimensions (Pyro's LDA lays words x documents so), say so; else ``None``."""
    for name, site in model_trace.nodes.items():
        value = site.get("value")
        if site["type"] != "sample" or not site["is_observed"] or not torch.is_tensor(value):
            continue
        if not any(value is t or (value.shape == t.shape and value.data_ptr() == t.data_ptr())
                   for t in tensors):
            continue
        batch_dims = value.dim() - site["fn"].event_dim
        frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        first = next((i for i, f in enumerate(frames) if f.dim == -batch_dims), None)
        if first:  # an outer plate exists over another dimension
            outer, inner = frames[0], frames[first]
            return (f"at site {name!r} dimension 0 is plate {inner.name!r} (size {inner.size}), nested "
                    f"inside plate {outer.name!r} (size {outer.size}) over dimension "
                    f"{batch_dims + outer.dim}")
    return None


def device_context(device):
    """Tensors created inside are on ``device`` (a GPU's); nothing to do for the CPU."""
    return torch.device(device) if device.type != "cpu" else contextlib.nullcontext()
