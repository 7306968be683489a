"""Float32 linear layers on the CPU through oneDNN, where torch's BLAS leaves speed behind.

PyTorch's x86 wheels compute ``nn.Linear`` (``F.linear``) on the CPU with Intel's MKL, which
picks its code path by CPU vendor: on AMD processors it runs its AVX2 kernels even where the
cores have full-width AVX-512 (measured on the project's AMD EPYC machine: about 110 GFLOP/s
per core for a 128 x 784 x 400 product, against about 230 GFLOP/s from oneDNN, the library
torch also ships and uses for its convolutions, which picks its code by instruction set).

Inside :func:`linear_backend` every float32 CPU ``F.linear`` call is computed by oneDNN's
inner-product primitive, forward and backward: for y = x W^T + b,

    dL/dx = (dL/dy) W,     dL/dW = (dL/dy)^T x,     dL/db = sum over rows of dL/dy,

each product again by oneDNN (transposes are strided views, not copies). Other dtypes,
devices and calls are left to torch. The results equal torch's up to float32 rounding
(a different summation order); double derivatives through such a layer are not supported.

``backend="auto"`` uses oneDNN when torch's BLAS is MKL and the CPU is not Intel's, and
torch's own path otherwise; the choice depends on the machine only, never on timings, so
that a fit stays reproducible from run to run. ``benchmarks/vae_speed.py`` measures it.
"""

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

BACKENDS = ("auto", "onednn", "torch")
_LINEAR = (F.linear, torch._C._nn.linear)


def onednn_available():
    """Whether this torch build has oneDNN's linear primitive."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _cpu_vendor():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def resolve_backend(backend, device):
    """``"onednn"`` or ``"torch"``: the backend for float32 linear layers on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"linear_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if torch.device(device).type != "cpu":
        return "torch"
    if backend == "onednn" and not onednn_available():
        raise ValueError("linear_backend='onednn': this torch build has no oneDNN linear primitive")
    if backend == "auto":
        mkl = "BLAS_INFO=mkl" in torch.__config__.show()
        return "onednn" if mkl and onednn_available() and _cpu_vendor() not in ("", "GenuineIntel") else "torch"
    return backend


def _inner_product(x, w, b=None):
    """x W^T + b by oneDNN, for 2-D x (M, K) and w (N, K), either possibly a strided view."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _inner_product(x, w, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        dx = _inner_product(grad, w.t()) if ctx.needs_input_grad[0] else None
        dw = _inner_product(grad.t(), x.t()) if ctx.needs_input_grad[1] else None
        db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def onednn_linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)`` by oneDNN, for float32 CPU tensors of any batch shape."""
    if x.dim() == 2:
        return _OneDNNLinear.apply(x, weight, bias)
    y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class _Route(TorchFunctionMode):
    """Send float32 CPU ``F.linear`` calls to :func:`onednn_linear`, everything else on."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu"
                                 and t.layout == torch.strided) for t in (x, weight, bias)) and weight.dim() == 2:
                return onednn_linear(x, weight, bias)
        return func(*args, **kwargs)


def linear_backend(backend="auto", device="cpu"):
    """A context in which float32 CPU linear layers use ``backend`` (see the module docstring)."""
    if resolve_backend(backend, device) == "onednn":
        return _Route()
    return contextlib.nullcontext()


__all__ = ["BACKENDS", "linear_backend", "onednn_available", "onednn_linear", "resolve_backend"]
