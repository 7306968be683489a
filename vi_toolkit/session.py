"""A fitted model and guide on a data set: device, parameters, plate nesting, log weights.

Every analysis of a fit (held-out evaluation, ArviZ export, PSIS, inference gaps) runs the
fit's model and guide on new data with the fit's parameters, on the fit's device, with the
fit's linear-layer backend; a :class:`FitSession` holds that context once. Its
:meth:`FitSession.estimates` are the per-point ELBO and IWAE estimates over K importance
samples drawn in chunks (see :mod:`vi_toolkit.evaluation` for the math).
"""

import contextlib
import math

import torch

from .data import FitData
from .devices import resolve_device
from .linear import linear_backend
from .traces import accepts_keyword, modules_of, trace_pair
from .weights import log_weights


def plate_nesting(model, guide, args, kwargs):
    """The number of plate dimensions the model and guide use (the depth of nesting)."""
    with torch.no_grad():
        traces = trace_pair(model, guide, args, kwargs)
    dims = [-f.dim for tr in traces for site in tr.nodes.values() if site["type"] == "sample"
            for f in site["cond_indep_stack"] if f.vectorized]
    return max(dims, default=0)


class FitSession:
    """A fit's model and guide on a data set: device, parameters, call arguments."""

    def __init__(self, result, data, device, name="data"):
        if not all(hasattr(result, a) for a in ("model", "guide", "scope", "config", "device")):
            raise ValueError(f"result must be a FitResult (from vi_toolkit.fit or vi_toolkit.load), "
                             f"got {type(result).__name__}")
        self.result = result
        self.device = resolve_device(device) if device is not None else result.device
        self.data = FitData(data, name=name, device=self.device)
        self.model, self.guide = result.model, result.guide
        for module in modules_of(self.model, self.guide).values():
            module.to(self.device)
        self.pass_num_data = accepts_keyword(self.model, "num_data")
        with self.scope():
            self.nesting = plate_nesting(self.model, self.guide, *self.call_args(
                self.data.batch(torch.arange(1, device=self.device))))

    def scope(self):
        return self.result.scope()

    def call_args(self, tensors):
        return self.data.call_args(tensors, self.data.num_data if self.pass_num_data else None)

    def log_weights(self, tensors, num_samples, guide=None):
        args, kwargs = self.call_args(tensors)
        with self.device_context():
            return log_weights(self.model, guide or self.guide, args, kwargs, num_samples,
                               self.nesting)

    def estimates(self, tensors, num_samples, chunk_size, guide=None):
        """Per-point (1/K sum_k log w_ik, log 1/K sum_k w_ik) over K draws in chunks."""
        total, lse, done = 0.0, None, 0
        while done < num_samples:
            k = min(chunk_size, num_samples - done)
            local, _ = self.log_weights(tensors, k, guide)
            total = total + local.sum(0)
            chunk_lse = torch.logsumexp(local, 0)
            lse = chunk_lse if lse is None else torch.logaddexp(lse, chunk_lse)
            done += k
        return total / num_samples, lse - math.log(num_samples)

    def device_context(self):
        """Inside the block, tensors are created on the fit's device (a GPU's, not the CPU's) and
        float32 linear layers use the fit's backend (:mod:`vi_toolkit.linear`)."""
        stack = contextlib.ExitStack()
        if self.device.type != "cpu":
            stack.enter_context(torch.device(self.device))
        stack.enter_context(linear_backend(self.result.config.get("linear_backend", "auto"), self.device))
        return stack
