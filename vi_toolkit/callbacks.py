"""Callbacks: what the fit loop calls at the start, after every step, after every epoch and
at the end. Early stopping, convergence, checkpoints, the progress bar and the loggers
(:mod:`vi_toolkit.loggers`) are callbacks; so are a user's own.

A callback derives from :class:`Callback` and overrides the hooks it needs; each hook gets the
loop's :class:`FitState`::

    class ClampScale(Callback):            # a per-step projection, as Pyro's sparse-gamma DEF
        def on_step_end(self, state):
            with torch.no_grad():
                state.params["scale"].clamp_(min=-5.0)

A plain function ``fn(event) -> bool`` is an epoch-end callback too (it gets a
:class:`FitEvent`; a true return stops the fit). ``on_step_end`` runs at every step: it must
not read the loss back (``state.loss`` is on the device) unless it means to pay a host sync.
"""

import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .checkpoint import save_checkpoint
from .step import map_tensors
from .traces import positive_int


class Callback:
    """Base class of fit callbacks: every hook does nothing until overridden.

    ``every_step``: whether :meth:`on_step_end` must run after every step. A callback that
    sets it to ``False`` (a progress bar) lets a compiled fit run several steps in one call,
    after which the hook runs once, ``state.step`` saying how far the fit is."""

    every_step = True

    def wrap(self, model, guide):
        """Called once before anything is traced; may return wrapped model and guide."""
        return model, guide

    def on_fit_start(self, state):
        """After the parameters exist (and a checkpoint was resumed), before the first step."""

    def on_step_end(self, state):
        """After every optimizer update (or run of updates, see ``every_step``)."""

    def on_epoch_end(self, state):
        """After every recorded epoch (full batch: every logging interval); ``state.elbo`` is set."""

    def on_fit_end(self, state):
        """After the last step, before the result is made."""


@dataclass
class FitEvent:
    """What a plain-function callback sees after each epoch (or logging interval)."""

    step: int
    epoch: int
    elbo: float
    val_elbo: float
    result: "object"


class FitState:
    """The loop's state as callbacks see it.

    Attributes:
        step, epoch: steps and epochs done. ``steps_per_epoch``, ``total_steps``.
        elbo, val_elbo: the last recorded training and held-out ELBO per data point (or None).
        loss: the last step's loss (a 0-dim tensor on the device).
        params: ``{name: tensor}``, the live leaf tensors the optimizer updates (unconstrained
            values of ``pyro.param``; ``"model.<name>"``/``"guide.<name>"`` for module weights).
        optimizer: the torch optimizer (``param_groups[i]["lr"]`` is the learning rate).
        history, config, model, guide: as in the result.
        is_main: whether this process shows progress and writes files (rank 0).
    """

    def __init__(self, loop):
        self._loop = loop
        self.loss = None
        self.elbo = self.val_elbo = None
        self.stopped = None

    def __getattr__(self, name):  # the loop's live values
        if name in ("step", "epoch", "steps_per_epoch", "total_steps", "history", "config",
                    "model", "guide"):
            return getattr(self._loop, name)
        if name in ("params", "optimizer"):
            return getattr(self._loop.step_fn, name)
        if name == "is_main":
            return self._loop.strategy.is_main
        raise AttributeError(name)

    def stop(self, reason: str):
        """End the fit after this step (or epoch); ``reason`` lands in ``result.stopped``."""
        self.stopped = self.stopped or reason

    def result(self):
        """A :class:`~vi_toolkit.FitResult` of the fit as it stands (a copy)."""
        return self._loop.result()

    def probe(self):
        """The fit's first data points (at most 100, as a result keeps them), as data of their
        own on the fit's device (:class:`~vi_toolkit.data.FitData`)."""
        return self._loop.probe()

    def snapshot(self):
        """Everything a checkpoint holds (in every process: a collective in a distributed fit)."""
        return self._loop.snapshot(all_ranks=True)


class FunctionCallback(Callback):
    """A plain function ``fn(event) -> bool`` called at each epoch end; true stops the fit."""

    def __init__(self, fn):
        self.fn = fn

    def on_epoch_end(self, state):
        event = FitEvent(state.step, state.epoch, state.elbo, state.val_elbo, state.result())
        if self.fn(event):
            state.stop("callback")


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs without a better held-out ELBO; restore the best parameters.

    Needs ``val_data`` in the fit.
    """

    def __init__(self, patience: int):
        self.patience = positive_int(patience, "patience")
        self.best, self.bad_epochs = None, 0

    def on_fit_start(self, state):
        if "val_elbo" not in state.config.get("watch", ()):
            raise ValueError("EarlyStopping (patience) needs val_data to watch")

    def on_epoch_end(self, state):
        if state.val_elbo is None:
            return
        if self.best is None or state.val_elbo > self.best[0]:
            self.best = (state.val_elbo, {k: p.detach().clone() for k, p in state.params.items()})
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.patience:
                state.stop("early stopping")

    def on_fit_end(self, state):
        if state.stopped == "early stopping" and self.best is not None:
            with torch.no_grad():
                for name, p in state.params.items():
                    p.copy_(self.best[1][name])

    def state_dict(self):
        return {"bad_epochs": self.bad_epochs}

    def load_state_dict(self, state):
        self.bad_epochs = state["bad_epochs"]


class Convergence(Callback):
    """Stop when the relative change of the epoch loss falls below ``tol_rel_obj``.

    As Stan's ADVI: the mean or the median of the relative changes ``|L_t - L_{t-1}| / |L_t|``
    over a window (the last 10% of the planned epochs, at least 2) below the tolerance.
    """

    def __init__(self, tol_rel_obj: float):
        if not isinstance(tol_rel_obj, (int, float)) or not tol_rel_obj > 0:
            raise ValueError(f"tol_rel_obj must be positive, got {tol_rel_obj!r}")
        self.tol = float(tol_rel_obj)
        self.changes, self.previous = [], None

    def on_epoch_end(self, state):
        loss = -state.elbo
        if self.previous is not None:
            self.changes.append(abs(loss - self.previous) / max(abs(loss), 1e-12))
            window = self.changes[-max(2, int(0.1 * state.total_steps / state.config["log_every"])):]
            mean, median = sum(window) / len(window), sorted(window)[len(window) // 2]
            if len(window) >= 2 and (mean < self.tol or median < self.tol):
                state.stop("converged")
        self.previous = loss

    def state_dict(self):
        return {"changes": list(self.changes), "previous": self.previous}

    def load_state_dict(self, state):
        self.changes, self.previous = list(state["changes"]), state["previous"]


class Checkpoint(Callback):
    """Write the fit's whole state to ``path`` every ``every`` epochs and at the end.

    Atomic writes (:mod:`vi_toolkit.checkpoint`); rank 0 writes in a distributed fit. The
    folder is checked before any work: a path that cannot be written fails at once.
    """

    def __init__(self, path, every: int = 1):
        self.path, self.every = os.fspath(path), every
        folder = os.path.dirname(os.path.abspath(self.path))
        probe = folder
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise ValueError(f"checkpoint {self.path!r}: {probe!r} is a file, not a folder")
        if not os.access(probe, os.W_OK):
            raise ValueError(f"checkpoint {self.path!r}: the folder {probe!r} is not writable")
        self.records = 0

    def on_epoch_end(self, state):
        self.records += 1
        if self.records % self.every == 0:
            self.write(state)

    def on_fit_end(self, state):
        self.write(state)

    def write(self, state):
        snapshot = state.snapshot()
        if state.is_main:
            save_checkpoint(self.path, map_tensors(torch.Tensor.cpu, snapshot))


class ProgressBar(Callback):
    """A tqdm bar over the steps, with the ELBO, held-out ELBO and points per second."""

    def __init__(self):
        self.bar = None

    def on_fit_start(self, state):
        self.bar = tqdm(total=state.total_steps, initial=state.step, disable=not state.is_main,
                        unit="step", dynamic_ncols=True, desc="fit")
        self.start, self.first_step = time.perf_counter(), state.step
        self.postfix = {}

    every_step = False

    def on_step_end(self, state):
        self.bar.update(state.step - self.bar.n)

    def on_epoch_end(self, state):
        self.postfix["elbo"] = f"{state.elbo:.4g}"
        if state.val_elbo is not None:
            self.postfix["val_elbo"] = f"{state.val_elbo:.4g}"
        points = (state.step - self.first_step) * state.config["batch_size"]
        self.postfix["pts/s"] = f"{points / max(time.perf_counter() - self.start, 1e-9):.3g}"
        self.bar.set_postfix(self.postfix)

    def on_fit_end(self, state):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def as_callbacks(callbacks):
    """``callbacks`` as :class:`Callback` objects (plain functions wrapped); ``ValueError`` else."""
    out = []
    for i, cb in enumerate(callbacks or ()):
        if isinstance(cb, Callback):
            out.append(cb)
        elif callable(cb):
            out.append(FunctionCallback(cb))
        else:
            raise ValueError(f"callbacks[{i}] must be a vi_toolkit.callbacks.Callback or a function "
                             f"event -> bool, got {type(cb).__name__}")
    return out
