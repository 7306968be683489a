"""Compiled SVI: a training step traced once into a graph of tensor operations, compiled, replayed.

For a batch B and the fit's unconstrained parameters u (the values behind ``pyro.param``
and the weights of the ``nn.Module``\\ s), one step of :mod:`vi_toolkit.step` computes

    L(u; B, eps) = -ELBO_B(u) estimated at the draws eps,       g = dL/du,

then moves u by the optimizer's rule. Eagerly, Pyro's effect handlers build this anew at
every step, in Python, site by site, each elementwise operation a pass over memory. When
the model and the guide have a fixed structure (the same sites with the same shapes at
every step) the operations that produce (L, g) depend on the shapes of u and B only, not
on their values; so :class:`StepGraph` records them once (``torch.fx``'s ``make_fx``: the
forward pass, and the backward pass that ``torch.autograd.grad`` runs, as one graph
(u, B) -> (L, g)), compiles that graph with TorchInductor (fused, vectorised C++ loops on
the CPU; Triton kernels on CUDA, replayed as a CUDA graph) and replays it at every step.
The graph's random operations draw afresh at each replay, so the estimator is the eager one,
not one frozen draw. On the CPU they are torch's own random operations, called in the eager
step's order (Inductor's ``fallback_random``; its own CPU generator took 0.9 ms for a VAE's
6,400 normals, torch's 0.03 ms), so a compiled fit draws the eager fit's numbers and equals
it to float32 rounding; on CUDA they are Inductor's Philox draws, reproducible from the seed
but not the eager step's numbers. A compiled fit is reproducible from its seed, resumes
exactly and replays a divergence exactly. With torch's Adam or AdamW in a single-process fit
on the CPU the graph also holds the optimizer's update (:mod:`vi_toolkit.graph_update`: clipping, weight
decay, the moments, the learning rate read at every call), written into the parameters and
the torch optimizer's own state, so schedules and checkpoints are those of
:class:`~vi_toolkit.step.EagerStep`; otherwise (another optimizer, a data-parallel fit, whose
gradients are reduced across processes, CUDA, whose CUDA graph needs inputs it does not
write) the graph returns g and the optimizer applies it as
in the eager step; ``config["compile"]["update"]`` says which. The parameters enter the graph
as inputs, never as constants read from global state: while tracing, every torch call that is
handed one of them (by the parameter store, a module attribute or a closure) receives the
graph's input instead.

Blocks of steps. On the CPU, with Adam's update in the graph, a step of a small model is
mostly fixed cost: a call of a compiled graph goes through Python and AOTAutograd's wrapper
(about 40 us), the loop's bookkeeping adds more, and the arithmetic of eight schools takes a
few microseconds. So where nothing has to happen between steps (no epoch-wise schedule of
``pyro.optim``'s, no ``transform``, no callback whose ``on_step_end`` must run after every step, see
:attr:`~vi_toolkit.callbacks.Callback.every_step`; a single process), the loop hands the step
the batches up to the next read-back of the losses (the logging interval, in a minibatch fit
also the epoch's end), and one graph runs them all: a ``while_loop`` (torch's higher-order
operator) whose body is the traced step (loss, gradients, Adam's update), carrying the
parameters and Adam's state from step to step as flat tensors, the batches stacked along a new
first dimension and sliced at each step, a per-step learning-rate schedule's rates given as
one row a step (the schedule stepped past the block first, as the one-step path steps it
after each step), every step's loss written into one vector. Inductor
compiles it with its C++ wrapper, so the loop itself runs in C++. The last, smaller batch of
an epoch runs alone in its one-step graph. torch's Gamma and Dirichlet samplers (behind
``Gamma``, ``Beta`` and ``Dirichlet`` guides) take a ``Generator`` argument, which the C++ wrapper
can only hand over through a Python callback at every step (half of a Beta-Bernoulli step);
in a block they are operators of the same draws without it, called through the dispatcher.
The random numbers are torch's, drawn in the eager
order, so a fit in blocks is the eager fit to float32 rounding too, and a divergence is
replayed, one step a call, to the step that failed. Blocks run where the interval is at least
:data:`BLOCK_MIN_STEPS` = 50 steps (the loop's graph takes several seconds more to compile on
a cold cache) and the stacked batches hold at most :data:`BLOCK_MAX_ELEMENTS` elements (a step
that large gains nothing from it); ``config["compile"]["steps_per_call"]`` is the most steps a
call ran, and ``config["compile"]["blocks"]`` says why a fit stopped running blocks (an
epoch-wise schedule; the optimizer's update not in the graph; parameters of several dtypes; a step that
the loop's tracing cannot hold, e.g. an output whose size depends on values).

Products on the CPU. Linear layers keep the fit's route (:mod:`vi_toolkit.linear`): where the
eager fit computes a layer by oneDNN, the graph calls oneDNN for each of its products of at
least :data:`ONEDNN_MIN_FLOPS` floating-point operations and torch's ``mm`` for the smaller
ones (oneDNN's fixed cost per call outweighs its speed there), with the transposed operands
of the weight gradients written contiguously by the kernels that compute them. On the CPU the
replay and the optimizer's update run without torch-function modes (the linear route costs a
Python call for each torch call of the step, and the graph holds its products already).

Broadcasts. Elementwise operations of a broadcast (expanded) tensor are computed before the
broadcast, ``f(expand(a), b)`` as ``expand(f(a, b))``, where that is fewer elements: the same
values, since broadcasting commutes with elementwise operations (:func:`_hoist_broadcasts`).

Draws. Consecutive standard normal draws of fewer than 16 elements in all (an ``AutoNormal``
guide's small sites) are one draw, sliced (:func:`_merge_small_draws`): torch's CPU kernel
draws so few one element at a time from the generator's stream, so the numbers are the same
(on eight schools, the fastest of 40 paired blocks 14.7 -> 11.7 us a step).

While tracing, Pyro's host syncs inside the loss (``torch_item``, ``warn_if_nan``) are
replaced by their traceable equivalents (a detach, nothing), distribution validation is off
and torch's random state is restored afterwards, so that compiling draws no random numbers.

Guards. :class:`CompiledStep` falls back to the eager step, with one warning that says
why (``compile="auto"``), or raises :class:`CompileError` (``compile=True``) when

* the model or guide reads a tensor's value in Python (data-dependent control flow, a
  ``.item()``, a check), creates a parameter inside the step, or changes state other than
  its parameters (e.g. batch-norm statistics): tracing sees it;
* compilation fails;
* the batch's shapes change a third time (the full batch and the last, smaller batch of an
  epoch are two specializations, compiled once each);
* after an epoch's end, at the first step with at least ``CHECK_EVERY`` = 100 steps since
  the last check, the sites (names, shapes, distributions, scales, plates) of a guide and
  model trace differ from those the graph was traced with (a change made by a callback
  between epochs, say). A check costs one eager trace (about ten steps of a small model, and
  no random numbers), so the spacing doubles after every check that finds the sites
  unchanged, up to :data:`CHECK_AT_MOST` = 800 steps: a full-batch fit, whose every step
  ends an epoch, spent a tenth of its time checking at a fixed 100. Where a step is far
  cheaper than a trace (eight schools in blocks: a check 2-3 ms, a step 25 us, so 800 steps
  spent 12% of their time on one check) the checks also wait until the time since the last
  one is at least its cost divided by :data:`CHECK_TIME_SHARE` = 2%: they take at most that
  share of the fit. When they run depends on the clock; what a fit computes does not (a
  check draws no random numbers and changes no state).

Python numbers that a model reads are constants of the graph: a model that changes them
between steps (other than through site scales, which the check above sees at epoch
boundaries) must run eagerly (``compile=False``). :func:`compile_plan` refuses what is known
before the fit: ``validate=True`` (a graph cannot check every step's distributions) and
callbacks that wrap the model or guide (:meth:`~vi_toolkit.callbacks.Callback.wrap`, e.g.
KL annealing, whose weight changes at every step).

The ``"auto"`` rule. Compiling costs seconds (tracing, then Inductor's C++ compiler on a cold
cache; Inductor's cache on disk lets a second process reuse the compiled code), and saves a
few milliseconds a step, so ``"auto"`` compiles when a fit has at least
:data:`AUTO_MIN_STEPS` steps (measured in ``benchmarks/small_models.py`` and
``benchmarks/RESULTS.md``: the steps at which a cold compile has paid for itself on the
benchmarks' models). The rule reads the fit's settings only, never timings or the state of
the cache, so a seeded fit takes the same path in every run; a ``--quick`` run never waits
on a compiler.

References: J. Ansel et al., "PyTorch 2: faster machine learning through dynamic Python
bytecode transformation and graph compilation", ASPLOS 2024 (TorchDynamo, AOTAutograd,
TorchInductor); ``torch.fx.experimental.proxy_tensor.make_fx``.
"""

import contextlib
import math
import operator
import sys
import time
import warnings

import pyro
import pyro.infer.util
import pyro.util
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode

from .callbacks import Callback
from .graph_update import AdamRule
from .step import EagerStep, map_tensors
from .traces import describe_tensors, trace_pair

AUTO_MIN_STEPS = 20_000
MAX_SPECIALIZATIONS = 2  # the full batch and the last, smaller batch of an epoch
CHECK_EVERY = 100  # steps at least between the first checks of the sites (one eager trace each)
CHECK_AT_MOST = 800  # the spacing, doubled after every check that finds the sites unchanged, up to this
CHECK_TIME_SHARE = 0.02  # the most of a fit's time that the checks of the sites take, once they are that rare
BLOCK_MIN_STEPS = 50  # the fewest steps between read-backs for which a fit runs its steps in blocks
BLOCK_MAX_ELEMENTS = 1 << 22  # the most elements of a block's stacked batches (16 MB of float32)


class CompileError(RuntimeError):
    """``compile=True`` and the step cannot be compiled; the message says why."""


class NotCompilable(Exception):
    """Why a step cannot be (or can no longer be) replayed from its compiled graph."""


def compile_plan(compile, *, total_steps: int, validate, callbacks,
                 eager_only: "str | None" = None) -> "tuple[bool, str | None]":
    """Whether a fit compiles its step, and why not.

    Args:
        compile: ``"auto"``, ``True`` or ``False`` (``fit``'s argument).
        total_steps: the fit's optimisation steps.
        validate: ``FitOptions.validate``.
        callbacks: the fit's :class:`~vi_toolkit.callbacks.Callback` objects.
        eager_only: why the fit runs the eager step whatever its length (a fit of several
            data sets), or ``None``: ``"auto"`` then says so without a warning.

    Returns:
        ``(compile, reason)``: ``reason`` says why not when ``compile`` is false.

    Raises:
        ValueError: ``compile`` is none of the three, or ``compile=True`` and the fit has a
            setting a compiled step cannot follow (the message names it).
    """
    if not (compile is True or compile is False or compile == "auto"):  # 1 == True: not a choice
        raise ValueError(f"compile must be 'auto', True or False, got {compile!r}")
    if compile is False:
        return False, "compile=False"
    if eager_only:
        if compile is True:
            raise ValueError(f"compile=True: {eager_only}; use compile='auto' or False")
        return False, eager_only
    blocker = None
    if validate is True:
        blocker = ("validate=True checks the distributions of every step, which a compiled graph "
                   "cannot; use validate='first'")
    for cb in callbacks:
        if type(cb).wrap is not Callback.wrap:
            blocker = (f"callback {type(cb).__name__} wraps the model or guide and may change it "
                       "at every step, which a compiled graph would not see")
    if compile is True:
        if blocker:
            raise ValueError(f"compile=True: {blocker}")
        return True, None
    if total_steps < AUTO_MIN_STEPS:
        return False, f"{total_steps} steps: compile='auto' compiles fits of {AUTO_MIN_STEPS} steps or more"
    if blocker:
        warnings.warn(f"compile='auto': running the eager step: {blocker}", stacklevel=3)
        return False, blocker
    return True, None


class _Substitute(TorchFunctionMode):
    """Inside, every torch call handed a tensor of ``values`` (by ``id``) receives its stand-in."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def swap(t):
            return self.values.get(id(t), t)

        return func(*map_tensors(swap, args), **map_tensors(swap, kwargs or {}))


class _UnmaskedDice(TorchFunctionMode):
    """Pyro's Dice estimator (enumerated sites) asks ``mask.all()`` whether any enumerated
    probability is exactly 0, to drop those 0 * cost terms; traced, it is told that none is and
    takes the plain sum, the same value and gradient wherever the costs are finite."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = sys._getframe(1).f_code
        if func is torch.Tensor.__bool__ and caller is pyro.infer.util.Dice.compute_expectation.__code__:
            return True
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _traceable_pyro():
    """Pyro's host syncs inside a loss replaced by traceable equivalents (see the module)."""
    def item(x):
        return x.detach() if torch.is_tensor(x) else x

    def no_check(value, msg="", **kwargs):
        return value

    replacements = (("torch_item", pyro.infer.util.torch_item, item),
                    ("warn_if_nan", pyro.util.warn_if_nan, no_check))
    patched = []
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("pyro."):
            for name, original, stand_in in replacements:
                if getattr(module, name, None) is original:
                    setattr(module, name, stand_in)
                    patched.append((module, name, original))
    try:
        yield
    finally:
        for module, name, original in patched:
            setattr(module, name, original)


@contextlib.contextmanager
def _one_fake_mode():
    """One fake-tensor mode for the metadata of every tensor that ``make_fx`` records.

    Tracing with real tensors, ``make_fx`` stores each recorded tensor's shape and strides as a
    fake tensor, made in a new ``FakeTensorMode`` where none is ambient; each new mode takes a
    Python stack trace (on eight schools 1,206 modes, 0.9 s of the 3.6 s that tracing and a
    cached compile took under cProfile). An ambient one, in a ``TracingContext``, serves them all."""
    from torch._guards import TracingContext, tracing

    with tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True))):
        yield


@contextlib.contextmanager
def _fixed_parameters():
    """Parameters that the code inside creates are removed again (a traced value is no real
    one), and creating or replacing any is :class:`NotCompilable`."""
    store = pyro.get_param_store()
    before = dict(store.named_parameters())
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        after = dict(store.named_parameters())
        for name in after.keys() - before.keys():
            del store[name]
        if not failed and (after.keys() != before.keys() or any(after[k] is not before[k] for k in before)):
            raise NotCompilable(f"the step creates or replaces parameters "
                                f"({sorted(after.keys() ^ before.keys()) or 'replaced values'}): their "
                                "number is not fixed before the first step")


def _mutated_state(gm, allowed=frozenset()):
    """The first graph input (other than those at the positions ``allowed``) or constant that
    the graph writes to in place, or ``None``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    allowed = {placeholders[i] for i in allowed}
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for i, argument in enumerate(schema.arguments):
            value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
            written = argument.alias_info is not None and argument.alias_info.is_write
            if written and isinstance(value, torch.fx.Node) and value.op in ("placeholder", "get_attr") \
                    and value not in allowed:
                return f"{node.target} writes to {value.op} {value.target}"
    return None


def split_inputs(args, kwargs):
    """``(tensors, key, rebuild)``: the tensors of a call's ``(args, kwargs)``, a hashable key of
    their shapes and of the other arguments, and ``rebuild(tensors) -> (args, kwargs)``."""
    slots = [("arg", i, a) for i, a in enumerate(args)] + [("kw", k, v) for k, v in kwargs.items()]
    tensors, key = [], []  # plain loops: this runs at every compiled step
    for kind, name, v in slots:
        if torch.is_tensor(v):
            tensors.append(v)
            key.append((kind, name, v.shape, v.dtype, v.device.type))
        else:
            key.append((kind, name, repr(v)))
    key = tuple(key)

    def rebuild(values):
        values = iter(values)
        filled = [(kind, name, next(values) if torch.is_tensor(v) else v) for kind, name, v in slots]
        return (tuple(v for kind, _, v in filled if kind == "arg"),
                {name: v for kind, name, v in filled if kind == "kw"})

    return tensors, key, rebuild


def _same_shapes(calls):
    """``(tensors, key, runs)``: :func:`split_inputs`' tensors and key of the first call, and the
    tensors of the calls from the first on that share its key (the same objects where a call
    passes the first call's arguments again)."""
    first, key, _ = split_inputs(*calls[0])
    runs = [first]
    for call in calls[1:]:
        if call is calls[0] or _same_arguments(call, calls[0]):  # a full batch: the same tensors
            runs.append(first)
            continue
        tensors, other, _ = split_inputs(*call)
        if other != key:
            break
        runs.append(tensors)
    return first, key, runs


def _same_arguments(call, other) -> bool:
    """Whether two calls' ``(args, kwargs)`` hold the same objects."""
    (args, kwargs), (other_args, other_kwargs) = call, other
    return (len(args) == len(other_args) and all(a is b for a, b in zip(args, other_args))
            and kwargs.keys() == other_kwargs.keys() and all(kwargs[k] is other_kwargs[k] for k in kwargs))


def site_structure(model, guide, args, kwargs) -> tuple:
    """The sites of a guide trace and the model replayed against it: names, types,
    distributions, shapes, scales, masks, enumeration and plates (no values, no densities).

    Raises:
        NotCompilable: the guide or the model failed.
    """
    try:
        with torch.no_grad(), pyro.validation_enabled(False), _fork_rng(args, kwargs), _fixed_parameters():
            traces = trace_pair(model, guide, args, kwargs)
    except ValueError as err:
        raise NotCompilable(str(err)) from err

    def shape_of(v):
        return (tuple(v.shape), str(v.dtype)) if torch.is_tensor(v) else v

    return tuple((role, name, site["type"], type(site.get("fn")).__name__, shape_of(site["value"]),
                  site.get("is_observed"), shape_of(site.get("scale")), shape_of(site.get("mask")),
                  (site.get("infer") or {}).get("enumerate"),
                  tuple((f.name, f.size, f.dim) for f in site.get("cond_indep_stack", ())))
                 for role, trace in zip(("guide", "model"), traces) for name, site in trace.nodes.items()
                 if site["type"] in ("sample", "param"))


def _fork_rng(args, kwargs):
    """torch's random state on the CPU and on the call's CUDA devices, restored on exit."""
    devices = sorted({t.device.index or 0 for t in (*args, *kwargs.values())
                      if torch.is_tensor(t) and t.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def log1p_from_log(y: torch.Tensor) -> torch.Tensor:
    """log(1 + y), computed from log: ``y log(u) / (u - 1)`` with u = 1 + y rounded, and y
    where u rounds to 1 (a classic identity, accurate to a few ulps; infinite u stays).

    The compiled graph uses it on the CPU for log1p, softplus and log-sigmoid (Bernoulli and
    binary cross-entropy log-densities): torch's vectorised log1p took about 9x the time of
    its log on the project's CPU (883 against 96 microseconds for 51,200 floats, one thread).
    """
    u = 1 + y
    d = u - 1
    return torch.where(d == 0, y, torch.where(u == math.inf, u, torch.log(u) * (y / d)))


def _softplus(x, beta=1.0, threshold=20.0):
    scaled = x * beta
    return torch.where(scaled > threshold, x, log1p_from_log(torch.exp(scaled)) / beta)


def _log_sigmoid(x):
    return torch.minimum(x.new_zeros(()), x) - log1p_from_log(torch.exp(-torch.abs(x)))


def _log_sigmoid_forward(x):  # the CPU kernel's buffer is exp(-|x|), which its backward reads
    return _log_sigmoid(x), torch.exp(-torch.abs(x))


def _bce_with_logits(x, target, weight=None, pos_weight=None, reduction=1):
    log_weight = 1 if pos_weight is None else (pos_weight - 1) * target + 1
    loss = (1 - target) * x - log_weight * _log_sigmoid(x)
    loss = loss if weight is None else loss * weight
    return loss if reduction == 0 else loss.mean() if reduction == 1 else loss.sum()


# Forward passes traced as other operations on the CPU (their gradients are autograd's own)
_CPU_DECOMPOSITIONS = {torch.ops.aten.log1p.default: log1p_from_log,
                       torch.ops.aten.softplus.default: _softplus,
                       torch.ops.aten.log_sigmoid_forward.default: _log_sigmoid_forward,
                       torch.ops.aten.binary_cross_entropy_with_logits.default: _bce_with_logits}


def inner_product(x: torch.Tensor, w: torch.Tensor, b: "torch.Tensor | None") -> torch.Tensor:
    """x W^T + b by oneDNN (:mod:`vi_toolkit.linear`'s product); in a graph, the operator
    ``torch.ops.vi_toolkit.inner_product``, an opaque kernel to Inductor."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


# a plain operator with a CPU kernel (torch.library.custom_op's wrappers cost ~10 us a call)
_LIBRARY = torch.library.Library("vi_toolkit", "DEF")
_LIBRARY.define("inner_product(Tensor x, Tensor w, Tensor? b) -> Tensor")
_LIBRARY.impl("inner_product", inner_product, "CPU")


@torch.library.register_fake("vi_toolkit::inner_product", lib=_LIBRARY)
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0])


# torch's samplers whose schema has a Generator: Inductor's C++ wrapper calls them through a
# Python callback that imports modules and converts arguments (under cProfile, 10.7 s of a
# 300,000-step Beta-Bernoulli fit's 22 s in its graph); without the Generator (torch's default one, as the aten op with None) the
# wrapper calls them through the dispatcher, as any other fallback op
_SAMPLERS = {torch.ops.aten._standard_gamma.default: ("standard_gamma", torch._standard_gamma),
             torch.ops.aten._sample_dirichlet.default: ("sample_dirichlet", torch._sample_dirichlet)}
for _name, _draw in _SAMPLERS.values():
    _LIBRARY.define(f"{_name}(Tensor concentration) -> Tensor")
    _LIBRARY.impl(_name, _draw, "CPU")
    torch.library.register_fake(f"vi_toolkit::{_name}", lambda concentration: torch.empty_like(concentration),
                                lib=_LIBRARY)


def _route_samplers(gm):
    """torch's Gamma and Dirichlet samplers of ``gm``, drawn from torch's default generator, as
    :data:`_SAMPLERS`' operators of the same draws, for a graph compiled with the C++ wrapper."""
    for node in gm.graph.nodes:
        if node.target in _SAMPLERS and (node.args[1:] + tuple(node.kwargs.values()) in ((), (None,))):
            node.target = getattr(torch.ops.vi_toolkit, _SAMPLERS[node.target][0]).default
            node.args, node.kwargs = node.args[:1], {}
    gm.recompile()


ONEDNN_MIN_FLOPS = 16e6  # smaller products by torch's BLAS: oneDNN's ~15 us a call outweigh its speed


def _route_products(gm):
    """oneDNN's products (``mkldnn._linear_pointwise``, traced from :mod:`vi_toolkit.linear`)
    through :func:`inner_product`, since Inductor lowers that op for constant (frozen) weights
    only, and a fit's change every step. A transposed left operand (the weight gradients'
    dL/dy^T) is made contiguous in the graph, where Inductor writes it in that layout from the
    kernel that computes it (oneDNN would copy it). Products of fewer than
    :data:`ONEDNN_MIN_FLOPS` floating-point operations go to torch's ``mm`` instead: on the
    project's CPU (one thread) oneDNN's call costs ~15 us against ~4 for ``mm``, and ``mm`` was
    as fast or faster up to 10 MFLOP (128 x 400 x 100), oneDNN 5-10% faster from 40 MFLOP."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is not torch.ops.mkldnn._linear_pointwise.default or node.args[3:] != ("none", [], ""):
            continue
        x, w, b = node.args[:3]
        (m, k), n = x.meta["val"].shape, w.meta["val"].shape[0]
        with graph.inserting_before(node):
            if 2 * m * k * n < ONEDNN_MIN_FLOPS:
                w_t = graph.call_function(torch.ops.aten.t.default, (w,))
                w_t.meta["val"] = w.meta["val"].t()
                node.target, node.args = ((torch.ops.aten.mm.default, (x, w_t)) if b is None
                                          else (torch.ops.aten.addmm.default, (b, x, w_t)))
                continue
            if not x.meta["val"].is_contiguous():
                x = graph.call_function(torch.ops.aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
                x.meta["val"] = node.args[0].meta["val"].contiguous()
            node.target, node.args = torch.ops.vi_toolkit.inner_product.default, (x, w, b)
    gm.recompile()


_STRIDED = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.as_strided.default)


def _reads_values(user) -> bool:
    """Whether ``user`` of a tensor reads only its values, not its memory's layout (which a
    broadcast tensor, of zero strides, does not share with the dense tensor it replaces)."""
    return (user.op == "call_function" and isinstance(user.target, torch._ops.OpOverload)
            and user.target not in _STRIDED and not user.target._schema.is_mutable)


def _unbroadcast(node):
    """The tensor that ``node`` broadcasts (through a chain of ``expand``), or ``node``."""
    while node.target is torch.ops.aten.expand.default:
        node = node.args[0]
    return node


def _hoist_broadcasts(gm):
    """Elementwise operations of ``gm`` on broadcast tensors computed before the broadcast:
    ``f(expand(a, S), b)`` as ``expand(f(a, b), S)`` where that computes fewer elements.

    Broadcasting commutes with elementwise operations (each element of the result depends on
    the elements of the operands at the same index), so the two give the same values, and the
    rewrite repeats down a chain of them. It matters because a distribution expanded over a
    plate expands its parameters before deriving others from them: a ``Bernoulli(p)`` of 8
    particles over 400 points takes ``log(p)`` and ``log1p(-p)`` of the expanded 8 x 400
    probabilities (torch's ``Bernoulli.logits``), and Inductor's kernel evaluated them once a
    vector of the 400 (scalar ``log``, ``exp`` calls of libm, 8 x 25 times a step) where 8 do."""
    graph, expand = gm.graph, torch.ops.aten.expand.default
    for node in list(graph.nodes):
        out = node.meta.get("val")
        if (node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload)
                or torch.Tag.pointwise not in node.target.tags or not isinstance(out, torch.Tensor)
                or torch.Tag.nondeterministic_seeded in node.target.tags):  # a draw per element stays one
            continue
        operands = node.all_input_nodes
        if not any(a.target is expand for a in operands) or not all(_reads_values(u) for u in node.users):
            continue
        source = {a: _unbroadcast(a) for a in operands}
        if not all(isinstance(s.meta.get("val"), torch.Tensor) for s in source.values()):
            continue
        if math.prod(torch.broadcast_shapes(*(s.meta["val"].shape for s in source.values()))) >= out.numel():
            continue
        args, kwargs = (torch.fx.node.map_arg(a, source.get) for a in (node.args, node.kwargs))
        with FakeTensorMode():  # the dtype too: a 0-d operand takes no part in type promotion
            fake = {s: torch.empty_strided(s.meta["val"].shape, s.meta["val"].stride(), dtype=s.meta["val"].dtype,
                                           device=s.meta["val"].device) for s in source.values()}
            val = node.target(*torch.fx.node.map_arg(args, fake.get), **torch.fx.node.map_arg(kwargs, fake.get))
            if val.dtype != out.dtype:
                continue
            broadcast_val = val.expand(out.shape)
        with graph.inserting_before(node):
            hoisted = graph.call_function(node.target, args, kwargs)
            broadcast = graph.call_function(expand, (hoisted, list(out.shape)))
        hoisted.meta["val"], broadcast.meta["val"] = val, broadcast_val
        node.replace_all_uses_with(broadcast)
        graph.erase_node(node)
        for a in operands:  # the broadcasts no longer read
            while a.target is expand and not a.users:
                a, dropped = a.args[0], a
                graph.erase_node(dropped)
    gm.recompile()


# the ops that draw no random numbers unless tagged so (a draw of another library's may not be)
_TAGGED_NAMESPACES = ("aten", "prims", "mkldnn")
_DRAW_FREE = (operator.getitem, torch.ops.vi_toolkit.inner_product.default)
SERIAL_DRAW_LIMIT = 16  # torch's CPU normal_ draws fewer elements one at a time (Box-Muller, its spare kept)


def _small_draw(node):
    """``(empty, (dtype, mean, std))`` where ``node`` is ``normal_`` of a fresh ``empty`` tensor
    on the CPU, of float32 or float64, fewer than :data:`SERIAL_DRAW_LIMIT` elements, from the
    default generator; else ``None``."""
    if node.target is not torch.ops.aten.normal_.default or node.kwargs.get("generator") is not None:
        return None
    empty, mean, std = (*node.args, 0.0, 1.0)[:3]
    val = empty.meta.get("val") if isinstance(empty, torch.fx.Node) else None
    if (val is None or empty.target is not torch.ops.aten.empty.memory_format or len(empty.users) != 1
            or val.device.type != "cpu" or val.dtype not in (torch.float32, torch.float64)
            or val.numel() >= SERIAL_DRAW_LIMIT or not val.is_contiguous()):
        return None
    return empty, (val.dtype, node.kwargs.get("mean", mean), node.kwargs.get("std", std))


def _merge_small_draws(gm):
    """Consecutive standard draws of ``gm`` (``normal_`` of a fresh tensor, no other random
    operation between them) with fewer than :data:`SERIAL_DRAW_LIMIT` elements in all, as one
    draw of them all, each the view of its slice.

    torch's CPU kernel draws a tensor of fewer than 16 elements one element after another
    from the generator's stream (the larger ones by a vectorised Box-Muller in blocks of 16),
    so the merged draw is the same numbers, and leaves the generator in the same state, as
    the draws it replaces. A guide of several small sites (``AutoNormal`` of eight schools: 1,
    1 and 8 values) draws once a step, not once a site: in a compiled graph each draw is a
    call through torch's dispatcher and two buffers."""
    graph = gm.graph
    runs, run, kind, total = [], [], None, 0
    for node in list(graph.nodes):
        op = node.target if isinstance(node.target, torch._ops.OpOverload) else None
        untagged = (op is not None and op.namespace in _TAGGED_NAMESPACES
                    and torch.Tag.nondeterministic_seeded not in op.tags)
        if node.op == "call_function" and (untagged or node.target in _DRAW_FREE):
            continue  # draws no random numbers
        draw = _small_draw(node)
        size = draw[0].meta["val"].numel() if draw else 0
        if draw is None or draw[1] != kind or total + size >= SERIAL_DRAW_LIMIT:
            runs.append(run)
            run, kind, total = [], None, 0
        if draw is not None:
            run.append(node)
            kind, total = draw[1], total + size
    runs.append(run)
    for run in (r for r in runs if len(r) > 1):
        (dtype, mean, std), first = _small_draw(run[0])[1], run[0].args[0]
        sizes = [node.args[0].meta["val"].numel() for node in run]
        with graph.inserting_before(first):
            empty = graph.call_function(torch.ops.aten.empty.memory_format, ([sum(sizes)],),
                                        {"dtype": dtype, "device": torch.device("cpu"), "pin_memory": False})
            merged = graph.call_function(torch.ops.aten.normal_.default, (empty, mean, std))
            empty.meta["val"] = merged.meta["val"] = first.meta["val"].new_empty(sum(sizes))
            start = 0
            for node, size in zip(run, sizes):
                part = graph.call_function(torch.ops.aten.slice.Tensor, (merged, 0, start, start + size))
                view = graph.call_function(torch.ops.aten.view.default, (part, list(node.meta["val"].shape)))
                part.meta["val"] = merged.meta["val"][start:start + size]
                view.meta["val"] = part.meta["val"].view(node.meta["val"].shape)
                start += size
                node.replace_all_uses_with(view)
        for node in run:
            fresh = node.args[0]
            graph.erase_node(node)
            graph.erase_node(fresh)
    gm.recompile()


class StepGraph:
    """The loss of one batch and its gradients with respect to ``params``, as one compiled graph;
    or, with ``block``, a run of steps (loss, gradients and the optimizer's update each) in one.

    Built from one call of ``loss_fn(args, kwargs)`` on a batch; replayed on any batch of
    the same shapes by :meth:`__call__` (see the module).

    Args:
        loss_fn: ``(args, kwargs) -> loss``, a differentiable scalar tensor.
        params: ``{name: leaf tensor}``, the parameters to differentiate.
        args, kwargs: a batch's call arguments.
        options: Inductor's settings, e.g. ``{"fallback_random": True}``: draw with torch's
            eager random operations (the eager step's numbers, at some cost in speed).
        rule: the optimizer's update (:class:`~vi_toolkit.graph_update.AdamRule`), traced
            into the graph after the gradients, or ``None``: the graph returns the gradients.
        block: ``(steps, stacked, scheduled)``: the graph loops over up to ``steps`` steps
            (see the module), the batch tensors at the positions ``stacked`` (of
            :func:`split_inputs`' list) given with a leading dimension of ``steps``, one slice
            a step, the others the same at every step; with ``scheduled`` the learning rates
            are given for every step, a ``(steps, groups)`` tensor. Needs a ``rule``.

    Raises:
        NotCompilable: the step cannot be traced (the message says why).
    """

    def __init__(self, loss_fn, params: dict, args, kwargs, options: "dict | None" = None, rule=None,
                 block: "tuple[int, frozenset, bool] | None" = None):
        start = time.perf_counter()
        tensors, self.key, rebuild = split_inputs(args, kwargs)
        self.params = list(params.values())
        self.names = list(params)
        self.rule, self.block = rule, block
        used = []
        n, batch = len(self.params), len(tensors)

        def joint(*flat):
            leaves = [v.requires_grad_() for v in flat[:n]]
            with _Substitute({id(p): leaf for p, leaf in zip(self.params, leaves)}), _UnmaskedDice():
                loss = loss_fn(*rebuild(flat[n:n + batch]))
            if not (torch.is_tensor(loss) and loss.requires_grad):
                raise NotCompilable("the loss does not depend on any parameter")
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            used.extend(g is not None for g in grads)
            if rule is None:
                return (loss.detach(), *[g for g in grads if g is not None])
            if block is None:
                return (loss.detach(), *rule.apply(leaves, grads, flat[n + batch:]))
            new_params, new_state, _ = rule.updated(leaves, grads, flat[n + batch:])
            return (loss.detach(), *[p.detach() for p in new_params], *new_state)

        # traced and compiled on copies: tracing runs the step, whose update writes in place
        example = [p.detach().clone() for p in self.params] + list(tensors) + \
            ([t.clone() for t in rule.inputs()] if rule is not None else [])

        try:
            with torch.enable_grad(), pyro.validation_enabled(False), _traceable_pyro(), _fork_rng(args, kwargs), \
                    _fixed_parameters(), _one_fake_mode():
                cuda = any(t.device.type == "cuda" for t in (*self.params, *tensors))
                gm = make_fx(joint, None if cuda else _CPU_DECOMPOSITIONS)(*[t.clone() for t in example])
        except NotCompilable:
            raise
        except Exception as err:  # make_fx names the op that read a value back, or the failure
            raise NotCompilable(f"tracing the step failed ({type(err).__name__}: {_first_line(err)}); "
                                "a model or guide that reads tensor values in Python (if x > 0, "
                                ".item(), checks) has no fixed structure") from err
        _route_products(gm)
        _hoist_broadcasts(gm)
        _merge_small_draws(gm)
        mutated = _mutated_state(gm, rule.mutated(n, batch) if rule is not None and block is None else frozenset())
        if mutated:
            raise NotCompilable(f"the step changes state other than its parameters ({mutated}), e.g. "
                                "batch-norm statistics; a compiled graph would not")
        self.used = used
        self.grad_params = [p for p, u in zip(self.params, used) if u]
        self.cuda = cuda
        self.seconds = None  # tracing and compiling
        options = {"fallback_random": True, **(options or {})}
        if block is not None:
            _route_samplers(gm)
            gm, example = _loop_graph(gm, example, n=n, batch=batch, groups=len(rule.optimizer.param_groups),
                                      steps=block[0], stacked=block[1], scheduled=block[2])
            options["cpp_wrapper"] = True  # the loop in C++ (a plain-torch trial: 9 us a step, 20 in Python)
            # the carried flat tensors written by one kernel, not a concatenation whose every part
            # is a view made at every step (eight schools: 48 views; a step in the block, medians of
            # paired fits: 0.031 -> 0.026 ms, Beta-Bernoulli 0.048 -> 0.044, GMM 0.066 -> 0.062)
            options["force_pointwise_cat"] = True
            # Inductor's cache on disk takes a graph with a loop only where told: the loop's
            # body and condition are graphs of the key's, hashed as every other graph is
            options["unsafe_marked_cacheable_functions"] = {"torch.ops.higher_order.while_loop": torch.__version__}
        if self.cuda:  # replayed as a CUDA graph (cudagraph trees), compiled at the first call
            self.compiled = torch.compile(gm, fullgraph=True, dynamic=False,
                                          options={"triton.cudagraphs": True, **(options or {})})
            self.trace_seconds = time.perf_counter() - start
        else:  # torch's random operations: Inductor's own CPU generator took 0.9 ms for 6,400 normals
            self.compiled = _standalone_compile(gm, example, options)
            self.seconds = time.perf_counter() - start

    def __call__(self, tensors, steps: "int | None" = None, lrs: "torch.Tensor | None" = None):
        """``(loss, grads)`` of one batch (its tensors, as :func:`split_inputs` gives them): the
        detached loss and the gradients of ``grad_params``; with a ``rule``, the loss and no
        gradients, the parameters and the optimizer's state updated in place. With a ``block``,
        ``steps`` steps (at most ``block[0]``) on the block's tensors, with a scheduled block
        at the learning rates ``lrs`` (a row a step): the losses of ``block[0]`` steps, the
        first ``steps`` of them those of the steps run.

        Raises:
            NotCompilable: compilation failed (on CUDA: at the first call).
        """
        first = self.seconds is None
        start = time.perf_counter()
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            with torch.no_grad():  # the backward pass is in the graph: inputs need no grad
                extra = self.rule.inputs() if self.rule is not None else ()
                if self.block is not None:
                    if self.block[2]:
                        extra = (lrs, *extra[len(self.rule.optimizer.param_groups):])
                    extra = (*extra, torch.tensor(steps))
                loss, *grads = self.compiled(*[p.detach() for p in self.params], *tensors, *extra)
            if self.rule is not None:  # the outputs after the loss are the update's scalars
                grads = []
        except Exception as err:
            if not first:
                raise
            raise NotCompilable(f"compiling the step failed ({type(err).__name__}: {_first_line(err)})") from err
        if first:
            self.seconds = self.trace_seconds + time.perf_counter() - start
        # a CUDA graph overwrites its outputs at the next replay; the loop keeps losses longer
        return (loss.clone() if self.cuda else loss), grads


def _loop_graph(step, example, *, n, batch, groups, steps, stacked, scheduled):
    """The graph of a loop over steps of the traced step ``step`` (inputs: parameters, batch,
    learning rates, state; outputs: the loss, the new parameters, the new state), and its
    example inputs: parameters, batch (the ``stacked`` positions with a leading dimension of
    ``steps``), learning rates (``scheduled``: one ``(steps, groups)`` tensor, a row a step),
    state, the number of steps to run. It writes the last step's
    parameters and state into its inputs and returns every step's loss (``steps`` of them,
    zero after the steps run), as torch's ``while_loop`` operator over the step. The operator
    is called as the trace's own, its body traced by ``make_fx`` with every tensor it reads
    passed in (the batch, the rates, ``step``'s constants, see :func:`_lift_constants`), not
    through ``torch._higher_order_ops.while_loop``, which traces the body again with TorchDynamo
    (on eight schools 1.2 s of the 2.4 s that tracing and a cached compile took under cProfile;
    the graphs are the same).

    The loop carries the parameters and Adam's two moments as one flat tensor and the step
    counts as another, not one tensor each (each carried tensor is a new buffer, and a new
    handle in the loop's condition and body, at every iteration: on eight schools, 26 buffers
    an iteration instead of 42 with four flat tensors; with two, the fastest of 40 paired
    blocks 11.5 -> 10.7 us a step, Beta-Bernoulli 32.1 -> 30.9); the step reads them as views."""
    from torch._higher_order_ops.while_loop import while_loop_op

    loss_value = next(iter(node for node in step.graph.nodes if node.op == "output")).args[0][0].meta["val"]
    shapes = [p.shape for p in example[:n]]
    sizes = [p.numel() for p in example[:n]]
    total = sum(sizes)

    def unflat(flat_tensor):
        return [part.view(shape) for part, shape in zip(flat_tensor.split(sizes), shapes)]

    def flat(tensors):
        return torch.cat([t.reshape(-1) for t in tensors])

    def state_of(m, v, t):  # the carried flat moments and step counts as the step's state inputs
        return [x for triple in zip(unflat(m), unflat(v), t.unbind(0)) for x in triple]

    num_rates = 1 if scheduled else groups  # inputs: one (steps, groups) tensor, or one a group
    constants = _lift_constants(step)

    def loop(*inputs):
        params, tensors = inputs[:n], inputs[n:n + batch]
        lrs, state, count = (inputs[n + batch:n + batch + num_rates], inputs[n + batch + num_rates:-1],
                             inputs[-1])

        def cond(i, carried, t, losses, count, *fixed):
            return i < count

        def body(i, carried, t, losses, count, *fixed):
            at = i.view(1)
            step_batch = [torch.index_select(x, 0, at).squeeze(0) if j in stacked else x
                          for j, x in enumerate(fixed[:batch])]
            rates = fixed[batch:batch + num_rates]
            if scheduled:
                rates = torch.index_select(rates[0], 0, at).squeeze(0).unbind(0)
            p, m, v = carried.split(total)
            loss, *new = step(*unflat(p), *step_batch, *rates, *state_of(m, v, t), *fixed[batch + num_rates:])
            return (i + 1, flat([*new[:n], *new[n::3], *new[n + 1::3]]), torch.stack(new[n + 2::3]),
                    losses.index_put((at,), loss.view(1)))

        losses = torch.zeros(steps, dtype=loss_value.dtype, device=loss_value.device)
        carried = (torch.zeros((), dtype=torch.int64, device=count.device),
                   flat([*params, *state[0::3], *state[1::3]]), torch.stack(state[2::3]), losses)
        _, carried, t, losses = while_loop_op(cond, body, carried, (count, *tensors, *lrs, *constants))
        p, m, v = carried.split(total)
        for old, new in zip((*params, *state), (*unflat(p), *state_of(m, v, t))):
            old.copy_(new)
        return (losses,)

    example = [*example[:n],
               *[t.unsqueeze(0).expand(steps, *t.shape).clone() if j in stacked else t
                 for j, t in enumerate(example[n:n + batch])],
               *([example[n + batch].new_zeros(steps, groups)] if scheduled else example[n + batch:n + batch + groups]),
               *example[n + batch + groups:], torch.tensor(1)]
    try:
        with _fork_rng((), {}), _one_fake_mode():
            return make_fx(loop)(*[t.clone() for t in example]), example
    except Exception as err:
        raise NotCompilable(f"tracing the loop of steps failed ({type(err).__name__}: {_first_line(err)})") from err


def _lift_constants(gm) -> list:
    """The tensor constants of ``gm`` made its last inputs, in place: their values, in order.

    A loop's body must receive every tensor it reads as an input of the loop
    (``while_loop``'s additional inputs); a constant read inside it would be a tensor of the
    outer trace's, which functionalization cannot follow."""
    last = [node for node in gm.graph.nodes if node.op == "placeholder"][-1]
    values = []
    for node in [node for node in gm.graph.nodes if node.op == "get_attr"]:
        value = operator.attrgetter(node.target)(gm)
        if not torch.is_tensor(value):
            continue
        with gm.graph.inserting_after(last):
            last = gm.graph.placeholder(f"constant_{len(values)}")
        last.meta = dict(node.meta)
        node.replace_all_uses_with(last)
        gm.graph.erase_node(node)
        values.append(value)
    gm.recompile()
    return values


def _standalone_compile(gm, example_inputs, options):
    """``torch._inductor.standalone_compile`` of ``gm``: Inductor without TorchDynamo's guards
    (half the cost of a call of ``torch.compile``'s); its FX graph cache on disk serves a graph
    compiled before, by any process.

    Raises:
        NotCompilable: Inductor failed (the message says why).
    """
    from torch._inductor import standalone_compile

    try:
        return standalone_compile(gm, example_inputs, dynamic_shapes="from_example_inputs",
                                  options={"config_patches": options}, donate_graph_module=True)
    except Exception as err:
        raise NotCompilable(f"compiling the step failed ({type(err).__name__}: {_first_line(err)})") from err


def _first_line(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


class CompiledStep(EagerStep):
    """:class:`~vi_toolkit.step.EagerStep` whose loss and gradients come from a compiled graph.

    The same interface and state as the eager step (see the module for what it compiles and
    its guards). Held-out losses (:meth:`loss`) stay eager.

    Args:
        required: ``compile=True``: a step that cannot be compiled raises
            :class:`CompileError`; otherwise it falls back to the eager step with one warning.
        report: a dict (the fit's ``config["compile"]``) updated with ``used``, ``seconds``
            (tracing and compiling, all graphs), ``graphs`` and ``reason`` (why it fell back).
        **kwargs: the other arguments, :class:`~vi_toolkit.step.EagerStep`'s.
    """

    def __init__(self, model, guide, elbo, *, required: bool, report: dict, **kwargs):
        super().__init__(model, guide, elbo, **kwargs)
        self.required, self.report = required, report
        self.graphs, self.structures = {}, {}  # by the batch's shapes
        self.timed = set()  # the graphs whose compile seconds are in the report
        self.eager = self.check_structure = False
        self.unchecked, self.check_spacing = 0, CHECK_EVERY  # steps since the sites were last checked, and between checks
        self.next_check = 0.0  # the clock's time (perf_counter) before which no check runs
        self.replay = None  # this step's (graph, tensors)
        self.rule = None  # the optimizer's update in the graph, decided at the first graph
        self.blocks = {}  # the graphs of runs of steps, by the batch's shapes, stacked inputs and length
        report.update(used=True, seconds=0.0, graphs=0, reason=None, blocks=None, steps_per_call=1)

    @property
    def runs_python(self) -> bool:
        """Whether a step runs the model's and guide's code: only once it fell back to the eager step."""
        return self.eager

    def update(self, args, kwargs, share=1.0):
        """One step, as :meth:`EagerStep.update`. Its graph is found first (traced and compiled
        if the batch's shapes are new); on the CPU the replay and the optimizer's update then
        run without torch-function modes: the graph holds the linear layers' products already,
        and the route of :mod:`vi_toolkit.linear` costs a Python call for each torch call of
        the step (0.7 of 1.0 ms a step of a small VAE)."""
        if not self.eager:
            tensors, key, _ = split_inputs(args, kwargs)
            try:
                self.replay = self.graph_for(tensors, key, args, kwargs), tensors
            except NotCompilable as err:
                self.fall_back(str(err))
        if self.eager:
            return super().update(args, kwargs, share)
        with contextlib.nullcontext() if self.replay[0].cuda else torch._C.DisableTorchFunction():
            if self.replay[0].rule is None:
                return super().update(args, kwargs, share)
            loss = self.replay_update()
            if loss is None:  # fell back to the eager step
                return super().update(args, kwargs, share)
        return loss * share if share != 1.0 else loss

    def replay_update(self):
        """One step from a graph that holds the optimizer's update: its loss, or ``None`` when
        compiling failed (the step falls back)."""
        graph, tensors = self.replay
        try:
            loss, _ = graph(tensors)
        except NotCompilable as err:  # on CUDA, compiled at the first call
            self.fall_back(str(err))
            return None
        self.time_graph(graph)
        if self.scheduler is not None:
            _step_scheduler(self.scheduler)
        return loss

    def gradients(self, args, kwargs):
        """The batch's loss from the compiled graph, the gradients put in each ``.grad``."""
        if self.eager:
            return super().gradients(args, kwargs)
        graph, tensors = self.replay
        try:
            loss, grads = graph(tensors)
        except NotCompilable as err:  # on CUDA, compiled at the first call
            self.fall_back(str(err))
            return super().gradients(args, kwargs)
        self.time_graph(graph)
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(graph.grad_params, grads):
            p.grad = g
        return loss

    def time_graph(self, graph):
        """Add a graph's seconds of tracing and compiling to the report, once."""
        if graph not in self.timed:
            self.timed.add(graph)
            self.report["seconds"] += graph.seconds

    def graph_for(self, tensors, key, args, kwargs):
        """The compiled graph for this batch's shapes (traced now if they are new); after an
        epoch's end the sites are checked against those the graph was traced with (see the module)."""
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) == MAX_SPECIALIZATIONS:
                raise NotCompilable(f"the batch's shapes changed a {MAX_SPECIALIZATIONS + 1}th time "
                                    f"({describe_tensors(tensors)}); a compiled step holds "
                                    f"{MAX_SPECIALIZATIONS} specializations")
            self.structures.setdefault(key, site_structure(self.model, self.guide, args, kwargs))
            graph = self.graphs[key] = StepGraph(self.loss, self.params, args, kwargs, rule=self.update_rule())
            self.report["graphs"] = len(self.graphs) + len(self.blocks)
        else:
            self.check_sites(key, args, kwargs)
        self.unchecked += 1
        return graph

    def update_rule(self):
        """The optimizer's update in the graphs (decided once, at the first graph), or ``None``."""
        if self.rule is None and "update" not in self.report:
            self.rule, why = AdamRule.for_step(self.optimizer, self.params.values(),
                                               clip_norm=self.clip_norm, world=self.strategy.world)
            self.report["update"] = "in the graph" if self.rule else f"by the optimizer: {why}"
        return self.rule

    def check_sites(self, key, args, kwargs):
        """After an epoch's end, once the check's spacing has passed: the sites of a trace must
        be those the graphs of ``key`` were traced with (see the module)."""
        due = self.check_structure and self.unchecked >= self.check_spacing
        if due and time.perf_counter() >= self.next_check:
            self.unchecked, self.check_spacing = 0, min(2 * self.check_spacing, CHECK_AT_MOST)
            start = time.perf_counter()
            now = site_structure(self.model, self.guide, args, kwargs)
            end = time.perf_counter()
            self.next_check = end + (end - start) * (1 - CHECK_TIME_SHARE) / CHECK_TIME_SHARE
            if now != self.structures[key]:
                changed = sorted({site[:2] for site in set(now) ^ set(self.structures[key])})
                raise NotCompilable(f"the sites of the model or guide changed since the step was "
                                    f"compiled ((role, site): {changed[:5]}): no fixed structure")
            self.check_structure = False

    def runs_blocks(self, most: int) -> bool:
        """Whether :meth:`update_block` may run up to ``most`` steps in one call: not before
        :data:`BLOCK_MIN_STEPS` (a loop's graph takes seconds more to compile, cold, and saves
        tens of microseconds a step), nor once blocks stopped."""
        return most >= BLOCK_MIN_STEPS and not self.eager and self.report["blocks"] is None

    def update_block(self, calls, most):
        """Steps on the batches ``calls`` (``[(args, kwargs)]``, at most ``most``) from one
        call of a graph that loops over them (see the module), as many of the first as share
        the first batch's shapes: their losses (detached, unread), or ``None`` when no block
        runs (then every batch runs with :meth:`update`)."""
        if not self.runs_blocks(most):
            return None
        first, key, runs = _same_shapes(calls)
        if len(runs) < 2:
            return None
        stacked = frozenset(j for j, t in enumerate(first) if any(r[j] is not t for r in runs[1:]))
        graph = self.block_graph_for(key, first, stacked, most, calls[0])
        if graph is None:
            return None
        pad = [runs[-1]] * (most - len(runs))
        inputs = [torch.stack([r[j] for r in runs + pad]) if j in stacked else t for j, t in enumerate(first)]
        lrs = self.scheduled_rates(len(runs), most) if graph.block[2] else None
        with torch._C.DisableTorchFunction():  # compiled when built: on the CPU a call raises no NotCompilable
            losses, _ = graph(inputs, len(runs), lrs)
        self.time_graph(graph)
        self.report["steps_per_call"] = max(self.report["steps_per_call"], len(runs))
        self.unchecked += len(runs)
        return losses[:len(runs)]

    def block_graph_for(self, key, tensors, stacked, most, call):
        """The compiled graph of blocks of up to ``most`` steps on batches of ``key``'s shapes
        (the first batch's ``tensors`` and ``call``) with the tensors at the positions
        ``stacked`` stacked (traced now if new), or ``None``: blocks stop for the rest
        of the fit (``config["compile"]["blocks"]`` says why: see :meth:`block_refused`, or
        tracing or compiling the loop failed), or the sites changed (the step falls back)."""
        scheduled = self.scheduler is not None
        block_key = (key, stacked, most, scheduled)
        graph = self.blocks.get(block_key)
        try:
            if graph is not None:
                self.check_sites(key, *call)
                return graph
            if self.block_refused(most * sum(tensors[j].numel() for j in stacked)):
                return None
            self.structures.setdefault(key, site_structure(self.model, self.guide, *call))
        except NotCompilable as err:  # the sites changed, or the guide failed: no graph applies
            self.fall_back(str(err))
            return None
        try:
            graph = StepGraph(self.loss, self.params, *call, rule=self.rule, block=(most, stacked, scheduled))
        except NotCompilable as err:
            self.report["blocks"] = f"one step a call: {err}"
            return None
        self.blocks[block_key] = graph
        self.report["graphs"] = len(self.graphs) + len(self.blocks)
        return graph

    def scheduled_rates(self, steps, most) -> torch.Tensor:
        """Each group's learning rate at each of the next ``steps`` steps (a row a step, the
        last repeated to ``most`` rows), the per-step schedule stepped past them, as the
        one-step path steps it after each step."""
        rows = []
        for _ in range(steps):
            rows.append([float(g["lr"]) for g in self.optimizer.param_groups])
            _step_scheduler(self.scheduler)
        rows += rows[-1:] * (most - steps)
        return torch.tensor(rows, dtype=torch.float32, device=self.rule.params[0].device)  # as AdamRule's rates

    def block_refused(self, stacked_elements) -> bool:
        """Whether this fit runs one step a graph call from now on (``config["compile"]["blocks"]``
        then says why)."""
        if self.update_rule() is None:
            why = "the optimizer's update is not in the graph"
        elif self.epoch_scheduler is not None:
            why = "an epoch-wise schedule (pyro.optim's) sets the learning rate between steps"
        elif len({p.dtype for p in self.params.values()}) > 1:
            why = "the parameters have several dtypes (a block carries them as one flat tensor)"
        elif stacked_elements > BLOCK_MAX_ELEMENTS:
            why = (f"a block's stacked batches would hold {stacked_elements} elements (at most "
                   f"{BLOCK_MAX_ELEMENTS}); a step that large gains little from it")
        else:
            return False
        self.report["blocks"] = f"one step a call: {why}"
        return True

    def fall_back(self, reason):
        """Run the eager step from now on (``compile="auto"``) or raise (``compile=True``)."""
        if self.required:
            raise CompileError(f"compile=True: {reason}")
        warnings.warn(f"compile='auto': running the eager step: {reason}", stacklevel=2)
        self.eager = True
        self.report.update(used=False, reason=reason)

    def end_epoch(self):
        if self.rule is None or self.eager or self.epoch_scheduler is None:
            super().end_epoch()
        else:
            _step_scheduler(self.epoch_scheduler)
        self.check_structure = True


def _step_scheduler(scheduler):
    """``scheduler.step()`` after an update made in the graph: torch's scheduler, which counts
    the optimizer's own ``step`` calls, would warn that the optimizer has not stepped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()
