"""Optimizers and learning-rate schedules for a fit, built on ``torch.optim``."""

import torch

_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "lbfgs": torch.optim.LBFGS,
}


def make_optimizer(optimizer, params, lr, optimizer_args=None):
    """A ``torch.optim.Optimizer`` over ``params``.

    ``optimizer`` is a name (``"adam"``, ``"adamw"``, ``"sgd"``, ``"rmsprop"``,
    ``"adagrad"``, ``"lbfgs"``; Adam and AdamW use torch's fused kernel unless
    ``optimizer_args`` says otherwise; L-BFGS, with a strong-Wolfe line search, is for
    deterministic full-batch objectives such as a point-mass guide with enumerated
    discrete latents), a ``torch.optim.Optimizer`` subclass, or a callable
    ``params -> Optimizer``; ``optimizer_args`` are passed on (betas, momentum, ...).
    """
    kwargs = dict(optimizer_args or {})
    if isinstance(optimizer, str):
        cls = _OPTIMIZERS.get(optimizer.lower())
        if cls is None:
            names = ", ".join(_OPTIMIZERS)
            raise ValueError(f"unknown optimizer {optimizer!r}: use one of {names}, a "
                             "torch.optim.Optimizer class, or a callable params -> optimizer")
        if cls in (torch.optim.Adam, torch.optim.AdamW) and not {"fused", "foreach"} & set(kwargs):
            # one fused kernel for all parameters: ~10% of a small network's step
            kwargs["fused"] = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                  for p in params)
        if cls is torch.optim.LBFGS:
            kwargs.setdefault("line_search_fn", "strong_wolfe")
        return cls(params, lr=lr, **kwargs)
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer(params, lr=lr, **kwargs)
    if callable(optimizer):
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError("optimizer callable must return a torch.optim.Optimizer, got "
                             f"{type(opt).__name__}")
        return opt
    raise ValueError(f"optimizer must be a name, an Optimizer class or a callable, got {optimizer!r}")


def make_scheduler(lr_schedule, optimizer, total_steps):
    """A learning-rate scheduler stepped once per optimisation step, or ``None``.

    ``lr_schedule`` is ``None``, ``"cosine"`` (cosine decay to 0 over the fit),
    ``"exponential"`` (decay to 1% of the initial rate over the fit), or a callable
    ``optimizer -> torch.optim.lr_scheduler.LRScheduler``.
    """
    if lr_schedule is None:
        return None
    if lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if lr_schedule == "exponential":
        gamma = 0.01 ** (1.0 / max(total_steps, 1))
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    if callable(lr_schedule):
        return lr_schedule(optimizer)
    raise ValueError(f"unknown lr_schedule {lr_schedule!r}: use 'cosine', 'exponential' or a "
                     "callable optimizer -> scheduler")
