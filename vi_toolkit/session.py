"""A fitted model and guide on a data set: device, parameters, plate nesting, log weights.

Every analysis of a fit (held-out evaluation, ArviZ export, PSIS, inference gaps) runs the
fit's model and guide on new data with the fit's parameters, on the fit's device, with the
fit's linear-layer backend; a :class:`FitSession` holds that context once. Its
:meth:`FitSession.estimates` are the per-point ELBO and IWAE estimates over K importance
samples drawn in chunks (see :mod:`vi_toolkit.evaluation` for the math), and
:meth:`FitSession.pointwise_batches` the guide that gives them per point: the fit's own
guide when it factorizes over data points, the per-point conditionals of a Gaussian
joint guide (``AutoMultivariateNormal``, :mod:`vi_toolkit.joint_guides`) on the data it
was fitted to, and a ``ValueError`` saying why for any other joint guide.
"""

import contextlib
import math

import pyro
import torch

from .data import FitData
from .devices import resolve_device
from .joint_guides import GaussianConditionals, joint_local_sites
from .linear import linear_backend
from .traces import accepts_keyword, modules_of, trace_pair
from .weights import log_weights


def plate_nesting(traces) -> int:
    """The number of plate dimensions a model's and guide's ``traces`` use (the depth of nesting)."""
    dims = [-f.dim for tr in traces for site in tr.nodes.values() if site["type"] == "sample"
            for f in site["cond_indep_stack"] if f.vectorized]
    return max(dims, default=0)


class FitSession:
    """A fit's model and guide on a data set: device, parameters, call arguments.

    ``nesting`` is the depth of their plates; ``joint_sites`` names the model's local latent
    sites that the guide draws from one joint site outside the data plate
    (:func:`~vi_toolkit.joint_guides.joint_local_sites`; empty for a factorized guide).
    """

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
        probe = self.call_args(self.data.batch(torch.arange(1, device=self.device)))
        with self.scope(), torch.enable_grad():  # gradients tell what the guide's values depend on
            try:
                traces = trace_pair(self.model, self.guide, *probe)
            except ValueError as err:
                missing = err.__cause__.args[0] if isinstance(err.__cause__, KeyError) else None
                if not isinstance(missing, str) or missing in pyro.get_param_store():
                    raise
                raise ValueError(
                    f"{err}: {missing!r} is not a parameter of this fit "
                    f"({sorted(pyro.get_param_store().keys())}). Each fit has a parameter store "
                    "of its own, so pyro.param(name) outside it raises KeyError: read "
                    "result.params, or run code inside `with result.scope():`") from err
            self.nesting = plate_nesting(traces)
            self.joint_sites = joint_local_sites(*traces)

    def scope(self):
        return self.result.scope()

    def call_args(self, tensors):
        return self.data.call_args(tensors, self.data.num_data if self.pass_num_data else None)

    def pointwise_batches(self, batch_size: int):
        """``(tensors, guide)`` for consecutive batches of the data, covering it once.

        Args:
            batch_size: data points per batch.

        Yields:
            The batch's tensors and a guide that gives each of its points a density
            q(z_i | x_i, theta) of its own: the fit's guide, or for a guide whose per-point
            latents live in one joint site (``joint_sites``) its Gaussian conditionals
            (:class:`~vi_toolkit.joint_guides.GaussianConditionals`).

        Raises:
            ValueError: a joint guide that is not Gaussian, or data other than the points a
                joint guide was fitted to.
        """
        if self.joint_sites:
            self.check_fitted_data()
        n = self.data.num_data
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(start + batch_size, n), device=self.device)
            tensors = self.data.batch(index)
            if not self.joint_sites:
                yield tensors, self.guide
                continue
            args, kwargs = self.call_args(tensors)
            with self.device_context():
                guide = GaussianConditionals(self.guide, index, args, kwargs)
            yield tensors, guide

    def check_fitted_data(self) -> None:
        """Check that the data are those the fit ran on (a joint guide holds latents for those only).

        Raises:
            ValueError: the data's size or fingerprint differs from the fit's.
        """
        config = self.result.config
        fingerprint, num_data = config.get("data_fingerprint"), config.get("num_data")
        if (fingerprint is not None and fingerprint != self.data.fingerprint()) or (
                num_data is not None and num_data != self.data.num_data):
            raise ValueError(
                f"{self.data.name}: the guide {type(self.guide).__name__} holds the latents "
                f"{self.joint_sites} of the {num_data} points it was fitted to in one joint site, "
                "so it has no latents for other data; evaluate it on the data of the fit, or use "
                "a guide that takes the data (an encoder) for held-out points")

    def require_factorized(self, what: str) -> None:
        """Check that the guide gives each data point a density of its own.

        Args:
            what: the caller, named in the error.

        Raises:
            ValueError: the guide's per-point latents live in one joint site (``joint_sites``).
        """
        if self.joint_sites:
            raise ValueError(
                f"{what}: the guide {type(self.guide).__name__} draws the latents "
                f"{self.joint_sites} of all data points from one joint site outside the data "
                "plate, so per point it has no density q(z_i | x_i) to work with; use a guide "
                "that factorizes over data points (AutoNormal, an encoder)")

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
