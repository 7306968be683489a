"""Running a model and its guide: call signatures, their ``nn.Module``\\ s, paired traces.

The pieces every part of the toolkit needs to run a user's model p(x, z) and guide
q(z | x) on a batch: whether a callable takes a keyword (``num_data``, see
:mod:`vi_toolkit.plates`), which of the two are ``torch.nn.Module``\\ s (whose weights a fit
optimises and a result keeps), and the guide's trace with the model's trace replayed
against it, the pair every ELBO is computed from.
"""

import functools
import inspect
import numbers

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites


def accepts_keyword(fn, keyword: str) -> bool:
    """Whether ``fn`` (a function or an ``nn.Module``'s ``forward``) takes ``keyword``."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return True
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def unwrapped(fn):
    """The callable inside the effect handlers ``fn`` is wrapped in (``handler(fn)``: an
    autoguide's ``init_loc_fn``, a callback's messenger), or ``fn`` itself."""
    while (isinstance(getattr(fn, "func", None), functools.partial) and len(fn.func.args) == 2
           and isinstance(fn.func.args[0], Messenger)):
        fn = fn.func.args[1]
    return fn


def modules_of(model, guide) -> dict:
    """``{"model": model, "guide": guide}`` (inside any effect handlers), restricted to those that
    are ``nn.Module``\\ s."""
    return {role: fn for role, fn in (("model", unwrapped(model)), ("guide", unwrapped(guide)))
            if isinstance(fn, torch.nn.Module)}


def trace_pair(model, guide, args, kwargs):
    """Run the guide, then the model against it; both traces without subsample sites.

    Returns:
        ``(guide_trace, model_trace)``.

    Raises:
        ValueError: naming which of the two raised, with the original error.
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


def describe_tensors(tensors) -> str:
    """``"(100, 2) float32, (100,) int64"``: shapes and dtypes, for error messages."""
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in tensors)


def positive_int(value, name: str) -> int:
    """``value`` as an ``int`` if it is a positive integer (numpy integers too), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def fit_parameters(model, guide) -> dict:
    """Every tensor a fit optimises, by name: Pyro's parameter store (unconstrained values,
    sorted by name), then the trainable weights of ``nn.Module`` model or guide not in the
    store, as ``"model.<name>"`` / ``"guide.<name>"``."""
    params = dict(sorted(pyro.get_param_store().named_parameters()))
    seen = {id(p) for p in params.values()}
    for role, module in modules_of(model, guide).items():
        for name, p in module.named_parameters():
            if id(p) not in seen and p.requires_grad:
                params[f"{role}.{name}"] = p
                seen.add(id(p))
    return params
