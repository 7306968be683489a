"""Optimizers and learning-rate schedules for a fit, built on ``torch.optim``.

A fit takes the optimizer a Pyro or PyTorch user brings:

* a name: ``"adam"``, ``"adamw"``, ``"sgd"``, ``"rmsprop"``, ``"adagrad"``, ``"lbfgs"`` (Adam
  and AdamW use torch's fused kernel unless ``optimizer_args`` says otherwise; L-BFGS, with a
  strong-Wolfe line search, is for deterministic full-batch objectives such as a point-mass
  guide with enumerated discrete latents);
* a ``torch.optim.Optimizer`` subclass (it gets ``lr`` only if given and only if it takes one,
  so Pyro's ``AdagradRMSProp`` with its ``eta`` works), or a callable ``params -> Optimizer``;
* a ``pyro.optim`` object such as ``pyro.optim.ClippedAdam({"lr": 0.01})``, with its arguments
  (a dict, or a callable ``(module_name, param_name) -> dict`` giving each parameter its own),
  or a Pyro scheduler such as ``pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam,
  "optim_args": {...}, "gamma": 0.9})``, stepped once an epoch as in Pyro's examples.
"""

import inspect

import torch
from pyro.optim import PyroOptim
from pyro.optim.lr_scheduler import PyroLRScheduler

_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "lbfgs": torch.optim.LBFGS,
}
DEFAULT_LR = 1e-3  # for a named optimizer when lr is not given


def is_lbfgs(optimizer) -> bool:
    """Whether ``optimizer`` (a spec as ``fit`` takes it) is L-BFGS."""
    return optimizer == "lbfgs" or optimizer is torch.optim.LBFGS


def _takes_lr(cls):
    try:
        return "lr" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return True


def _pyro_groups(optimizer, named_params):
    """Parameter groups of a ``pyro.optim`` object: one, or one per parameter."""
    args = optimizer.pt_optim_args
    if not callable(args):
        return [{"params": list(named_params.values())}], dict(args)
    groups = []
    for name, p in named_params.items():
        module, _, param = name.rpartition("$$$")
        groups.append({"params": [p], **args(module or name, param)})
    return groups, {}


def make_optimizer(optimizer, named_params, lr=None, optimizer_args=None):
    """``(torch optimizer, epoch scheduler or None)`` over ``named_params`` (see the module).

    Args:
        optimizer: a name, an ``Optimizer`` class, a callable ``params -> Optimizer`` or a
            ``pyro.optim`` object.
        named_params: ``{name: tensor}``, the parameters to optimise.
        lr: the learning rate (a named optimizer defaults to 1e-3; a class gets its own default).
        optimizer_args: further keyword arguments (betas, momentum, ...).

    Raises:
        ValueError: an unknown name, or a callable that returns no ``Optimizer``.
    """
    params = list(named_params.values())
    kwargs = dict(optimizer_args or {})
    if isinstance(optimizer, str):
        cls = _OPTIMIZERS.get(optimizer.lower())
        if cls is None:
            names = ", ".join(_OPTIMIZERS)
            raise ValueError(f"unknown optimizer {optimizer!r}: use one of {names}, a "
                             "torch.optim.Optimizer class, a callable params -> optimizer, or a "
                             "pyro.optim object")
        if cls in (torch.optim.Adam, torch.optim.AdamW) and not {"fused", "foreach"} & set(kwargs):
            # one fused kernel for all parameters: ~10% of a small network's step
            kwargs["fused"] = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                  for p in params)
        if cls is torch.optim.LBFGS:
            kwargs.setdefault("line_search_fn", "strong_wolfe")
        return cls(params, lr=DEFAULT_LR if lr is None else lr, **kwargs), None
    if isinstance(optimizer, PyroOptim):
        groups, defaults = _pyro_groups(optimizer, named_params)
        defaults.update(kwargs)
        if lr is not None:
            defaults["lr"] = lr
        opt = optimizer.pt_optim_constructor(groups, **defaults)
        if isinstance(optimizer, PyroLRScheduler):
            return opt, optimizer.pt_scheduler_constructor(opt, **optimizer.kwargs)
        return opt, None
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        if lr is not None and _takes_lr(optimizer):
            kwargs["lr"] = lr
        return optimizer(params, **kwargs), None
    if callable(optimizer):
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError("optimizer callable must return a torch.optim.Optimizer, got "
                             f"{type(opt).__name__} (pass a pyro.optim object itself, not a "
                             "function that builds one)")
        return opt, None
    raise ValueError(f"optimizer must be a name, an Optimizer class, a callable or a pyro.optim "
                     f"object, got {optimizer!r}")


def current_lr(optimizer):
    """The first parameter group's learning rate, or ``None`` for an optimizer without one."""
    return optimizer.param_groups[0].get("lr")


def make_scheduler(lr_schedule, optimizer, total_steps):
    """A learning-rate scheduler stepped once per optimisation step, or ``None``.

    ``lr_schedule`` is ``None``, ``"cosine"`` (cosine decay to 0 over the fit),
    ``"exponential"`` (decay to 1% of the initial rate over the fit), or a callable
    ``optimizer -> torch.optim.lr_scheduler.LRScheduler``.
    """
    if lr_schedule is None:
        return None
    if lr_schedule in ("cosine", "exponential") and current_lr(optimizer) is None:
        raise ValueError(f"lr_schedule={lr_schedule!r} needs an optimizer with a learning rate 'lr'")
    if lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if lr_schedule == "exponential":
        gamma = 0.01 ** (1.0 / max(total_steps, 1))
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    if callable(lr_schedule):
        return lr_schedule(optimizer)
    raise ValueError(f"unknown lr_schedule {lr_schedule!r}: use 'cosine', 'exponential' or a "
                     "callable optimizer -> scheduler")
