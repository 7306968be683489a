"""The SVI step: one update of the parameters on one batch.

Given a model p(x, z; theta) and a guide q(z | x; phi), one step on a batch B draws an
estimate of the loss L = -ELBO_B(theta, phi) (see :mod:`vi_toolkit.elbo`), back-propagates
it, and moves every parameter by the optimizer's rule, e.g. for SGD

    (theta, phi) <- (theta, phi) - lr * grad L,

with the gradient clipped to a global norm if asked, reduced across processes in a
data-parallel fit (:mod:`vi_toolkit.strategy`), and the learning rate scheduled per step.

:class:`EagerStep` runs the model and guide through Pyro's effect handlers at every step (as
Pyro's ``SVI.step``); :class:`vi_toolkit.compiled.CompiledStep` replaces its
:meth:`~EagerStep.gradients` by a compiled graph. A step is a small state
object: :meth:`~EagerStep.init` traces once (creating lazily built parameters) and builds the
optimizer, :meth:`~EagerStep.update` runs one step and returns its loss on the device,
unread (the loop reads losses back once an interval), and
:meth:`~EagerStep.state_dict`/:meth:`~EagerStep.load_state_dict` carry the state a checkpoint
needs.
"""

import pyro
import torch

from .optim import make_optimizer, make_scheduler
from .traces import fit_parameters, modules_of


class EagerStep:
    """One eager SVI update per call (see the module).

    Args:
        model, guide: the Pyro callables.
        elbo: a Pyro ELBO object with ``differentiable_loss`` (:func:`vi_toolkit.elbo.make_elbo`).
        optimizer, lr, optimizer_args: see :func:`vi_toolkit.optim.make_optimizer`.
        lr_schedule, total_steps: see :func:`vi_toolkit.optim.make_scheduler`.
        clip_norm: clip the global gradient norm to this, or ``None``.
        validate: Pyro's distribution checks on every step (``True``), the first only
            (``"first"``) or never (``False``).
        strategy: :mod:`vi_toolkit.strategy` object that reduces gradients across processes.
    """

    runs_python = True  # a step runs the model's and guide's code (which may draw from Python's and NumPy's generators)

    def __init__(self, model, guide, elbo, *, optimizer, lr, optimizer_args, lr_schedule,
                 total_steps, clip_norm, validate, strategy):
        self.model, self.guide, self.elbo = model, guide, elbo
        self.optimizer_spec, self.lr, self.optimizer_args = optimizer, lr, optimizer_args
        self.lr_schedule, self.total_steps, self.clip_norm = lr_schedule, total_steps, clip_norm
        self.validate, self.validated = validate, False
        self.strategy = strategy
        self.params = {}

    def init(self):
        """Collect the parameters (the model and guide have run once) and build the optimizer."""
        self.params = fit_parameters(self.model, self.guide)
        self.store_size = len(pyro.get_param_store())
        self.optimizer, self.epoch_scheduler = make_optimizer(
            self.optimizer_spec, self.params, self.lr, self.optimizer_args)
        self.scheduler = make_scheduler(self.lr_schedule, self.optimizer, self.total_steps)

    def loss(self, args, kwargs):
        """The differentiable loss -ELBO estimate of one batch."""
        return self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)

    def gradients(self, args, kwargs):
        """The batch's loss, with the gradient of every parameter put in its ``.grad``."""
        validate = self.validate is True or (self.validate == "first" and not self.validated)
        with pyro.validation_enabled(validate):
            loss = self.loss(args, kwargs)
        self.validated = True
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def update(self, args, kwargs, share=1.0):
        """One optimizer step on the batch; the loss (times ``share``), detached, unread."""
        params = list(self.params.values())

        def closure():  # L-BFGS evaluates it several times per step, the others once
            loss = self.gradients(args, kwargs)
            self.strategy.reduce_gradients(params, share)
            if self.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
            return loss

        loss = self.optimizer.step(closure)
        if len(pyro.get_param_store()) > self.store_size:  # a parameter created lazily
            self.add_new_params()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach() * share if share != 1.0 else loss.detach()

    def runs_blocks(self, most: int) -> bool:
        """Whether the step can run up to ``most`` steps in one call (``update_block``, on a
        compiled step): never, eagerly."""
        return False

    def add_new_params(self):
        """Give parameters created after :meth:`init` to the optimizer."""
        for name, p in fit_parameters(self.model, self.guide).items():
            if name not in self.params:
                self.params[name] = p
                self.optimizer.add_param_group({"params": [p]})
        self.store_size = len(pyro.get_param_store())

    def end_epoch(self):
        """Step an epoch-wise scheduler (a ``pyro.optim`` scheduler), if there is one."""
        if self.epoch_scheduler is not None:
            self.epoch_scheduler.step()

    def state_dict(self):
        """Parameter values, module buffers, optimizer and scheduler states (copies)."""
        clone = lambda d: {k: v.detach().clone() for k, v in d.items()}  # noqa: E731
        return {
            "params": clone(self.params),
            "buffers": {role: clone(dict(m.named_buffers()))
                        for role, m in modules_of(self.model, self.guide).items()},
            "optimizer": map_tensors(lambda t: t.detach().clone(), self.optimizer.state_dict()),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "epoch_scheduler": None if self.epoch_scheduler is None else self.epoch_scheduler.state_dict(),
        }

    def load_state_dict(self, state, source):
        """Restore :meth:`state_dict`'s output; ``ValueError`` naming ``source`` on a mismatch."""
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
            for role, module in modules_of(self.model, self.guide).items():
                for k, buf in module.named_buffers():
                    if k in state["buffers"].get(role, {}):
                        buf.copy_(state["buffers"][role][k])
        # copies: torch's optimizer keeps the tensors it is given, which the steps then update in
        # place, and the state restored from (the last good state) must stay as it was
        self.optimizer.load_state_dict(map_tensors(torch.clone, state["optimizer"]))
        for scheduler, key in ((self.scheduler, "scheduler"), (self.epoch_scheduler, "epoch_scheduler")):
            if scheduler is not None and state.get(key) is not None:
                scheduler.load_state_dict(state[key])


def map_tensors(fn, obj):
    """``obj`` (nested dicts, lists and tuples) with ``fn`` applied to every tensor in it."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj
