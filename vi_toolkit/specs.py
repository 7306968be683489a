"""Specs: how to rebuild a model or guide in a new process, without pickling code.

A spec is plain data, ``{"target": "package.module:Name", "args": [...], "kwargs": {...}}``,
storable in a file read with ``torch.load(weights_only=True)``. :func:`spec_of` makes one:

* for an instance of a class that derives from :class:`Rebuildable` (every model and guide
  class of the toolkit does; user classes can too), from the arguments it was built with;
* for a function defined at the top level of an importable module, a
  ``functools.partial`` of one with storable keywords, and a method of a rebuildable object
  (``GaussianMixture(3, 2).model``);
* for Pyro's autoguides, from their class and their model (their other constructor
  arguments only initialise parameters, whose fitted values are stored beside the spec).

Arguments that are themselves rebuildable (a guide built from its model) are stored as nested
specs. :func:`build` turns a spec back into the object; :func:`load_object` builds one from a
``"module:attribute"`` string, as the command line does.
"""

import functools
import importlib
import inspect
import numbers

import torch
from pyro.infer.autoguide import AutoGuide

from .traces import unwrapped

_PLAIN = (str, bool, numbers.Number, type(None))


class Rebuildable:
    """Mixin recording the arguments an instance was constructed with, for :func:`spec_of`.

    Derive a model or guide class from it (``class MyGuide(Rebuildable, nn.Module)``) and a
    saved fit (:meth:`vi_toolkit.FitResult.save`) can rebuild it in a new process.
    """

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        object.__setattr__(obj, "_vi_spec_args", (cls, args, kwargs))
        return obj


def _storable(value, where):
    """``value`` as spec data (nested specs for rebuildable objects), or ``ValueError``."""
    if isinstance(value, _PLAIN) or torch.is_tensor(value):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_storable(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _storable(v, f"{where}[{k!r}]") for k, v in value.items()}
    return {"__spec__": spec_of(value, where)}


def _import_path(obj, where):
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module in (None, "__main__") or "<" in qualname:
        raise ValueError(f"{where}: {obj!r} is defined in {'__main__' if module == '__main__' else 'a closure'}"
                         ", so a new process cannot import it")
    try:
        found = functools.reduce(getattr, qualname.split("."), importlib.import_module(module))
    except (ImportError, AttributeError):
        found = None
    if found is not obj:
        raise ValueError(f"{where}: {module}:{qualname} does not import back to {obj!r}")
    return f"{module}:{qualname}"


def spec_of(obj, where="object"):
    """The spec that rebuilds ``obj``; ``ValueError`` saying why when there is none."""
    recorded = obj.__dict__.get("_vi_spec_args") if hasattr(obj, "__dict__") else None
    if recorded is not None and recorded[0] is type(obj):
        _, args, kwargs = recorded
        return {"target": _import_path(type(obj), where),
                "args": [_storable(a, f"{where} argument {i}") for i, a in enumerate(args)],
                "kwargs": {k: _storable(v, f"{where} argument {k!r}") for k, v in kwargs.items()}}
    if isinstance(obj, AutoGuide):
        return {"target": _import_path(type(obj), where),
                "args": [_storable(unwrapped(obj.model), f"{where}'s model")], "kwargs": {}}
    if isinstance(obj, functools.partial):
        spec = spec_of(obj.func, where)
        spec["args"] = [_storable(a, f"{where} argument {i}") for i, a in enumerate(obj.args)]
        spec["kwargs"] = {k: _storable(v, f"{where} argument {k!r}") for k, v in obj.keywords.items()}
        spec["partial"] = True
        return spec
    if inspect.ismethod(obj):  # a model's method, e.g. GaussianMixture(...).model
        return {"method": obj.__name__, "of": spec_of(obj.__self__, where)}
    if inspect.isfunction(obj):
        return {"target": _import_path(obj, where), "args": [], "kwargs": {}}
    raise ValueError(f"{where}: a {type(obj).__name__} records no constructor arguments; derive its "
                     "class from vi_toolkit.specs.Rebuildable, or pass it to vi_toolkit.load(...)")


def _built(value):
    if isinstance(value, dict) and set(value) == {"__spec__"}:
        return build(value["__spec__"])
    if isinstance(value, (list, tuple)):
        return type(value)(_built(v) for v in value)
    if isinstance(value, dict):
        return {k: _built(v) for k, v in value.items()}
    return value


def build(spec):
    """The object ``spec`` (from :func:`spec_of`) describes, built anew."""
    if "method" in spec:
        return getattr(build(spec["of"]), spec["method"])
    args, kwargs = _built(spec.get("args", [])), _built(spec.get("kwargs", {}))
    target = _resolve(spec["target"], "spec")
    if spec.get("partial"):
        return functools.partial(target, *args, **kwargs)
    return target(*args, **kwargs) if inspect.isclass(target) else target


def _resolve(path, name):
    if not isinstance(path, str) or path.count(":") != 1:
        raise ValueError(f"{name} must look like 'package.module:attribute', got {path!r}")
    module_name, attribute = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{name}: cannot import {module_name!r} ({err}); run from the folder "
                         "that holds it or install it") from err
    try:
        return functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise ValueError(f"{name}: module {module_name!r} has no attribute {attribute!r}") from None


def load_object(spec, kwargs=None, *, name="model", args=()):
    """The model or guide named ``"package.module:attribute"``, built with ``kwargs``.

    A class (an ``nn.Module`` such as ``vi_toolkit.models.vae:DeepLatentGaussian``, a classic model
    such as ``vi_toolkit.models.gmm:GaussianMixture``, a guide class) is instantiated with ``args``
    and ``kwargs``; a function (``vi_toolkit.models.conjugate:model``) gets ``kwargs`` bound as
    keywords and takes no ``args``.
    """
    target = _resolve(spec, name)
    kwargs = dict(kwargs or {})
    if inspect.isclass(target):
        try:
            return target(*args, **kwargs)
        except TypeError as err:
            arguments = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
            raise ValueError(f"{name}: {spec}({', '.join(arguments)}) failed: {err}") from err
    if not callable(target):
        raise ValueError(f"{name}: {spec} is not callable")
    if args:
        raise ValueError(f"{name}: {spec} is a function; it cannot take {args!r} (use a class)")
    return functools.partial(target, **kwargs) if kwargs else target
