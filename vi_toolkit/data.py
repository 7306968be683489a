"""The data of a fit: one tensor, or a tuple or dict of tensors sharing dimension 0.

Dimension 0 indexes data points. A fit calls ``model(x, num_data=N)`` for a tensor,
``model(*batch, num_data=N)`` for a tuple and ``model(**batch, num_data=N)`` for a
dict, with every tensor indexed by the same minibatch.
"""

import numpy as np
import torch


def _label(name, key):
    return name if key is None else f"{name}[{key!r}]"


def _as_tensor(value, label):
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            return torch.as_tensor(value, dtype=torch.get_default_dtype())
        if value.dtype.kind in "iub":
            return torch.as_tensor(value)
        raise ValueError(f"{label} is a numpy array of dtype {value.dtype}, not numbers")
    if not torch.is_tensor(value):
        raise ValueError(f"{label} must be a tensor or numpy array, got {type(value).__name__}")
    # data are constants of the objective: a tensor still attached to an autograd graph would
    # be back-propagated through at every step (and fail at the second)
    return value.detach()


def _moved(t, device, label):
    try:
        return t.to(device)
    except (RuntimeError, NotImplementedError) as err:
        raise ValueError(f"{label} is on device {t.device} and cannot be moved to the fit's device "
                         f"{device}: {err}") from err


class FitData:
    """Validated data, moved once to ``device``; ``batch(idx)`` indexes every tensor alike.

    Checks, each a ``ValueError`` naming the offending tensor: not empty, the same
    leading dimension everywhere, no NaN or infinite values. (Whether integer data suit the
    model is checked against its observed sites: :func:`vi_toolkit.engine.check_sites`.)
    """

    def __init__(self, data, *, name="data", device=None):
        if isinstance(data, dict):
            if not data:
                raise ValueError(f"{name} is an empty dict")
            self.kind, keys, values = "dict", list(data), list(data.values())
        elif isinstance(data, (tuple, list)):
            if not data:
                raise ValueError(f"{name} is an empty tuple")
            self.kind, keys, values = "tuple", list(range(len(data))), list(data)
        else:
            self.kind, keys, values = "tensor", [None], [data]
        tensors = [_as_tensor(v, _label(name, k)) for k, v in zip(keys, values)]
        if device is not None:  # moved once, then checked where they live
            tensors = [_moved(t, device, _label(name, k)) for k, t in zip(keys, tensors)]
        self.name, self.keys = name, keys
        for key, t in zip(keys, tensors):
            label = _label(name, key)
            if t.dim() == 0:
                raise ValueError(f"{label} is a scalar; dimension 0 must index data points")
            if t.shape[0] == 0:
                raise ValueError(f"{label} is empty (shape {tuple(t.shape)})")
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).nonzero()[0].tolist()
                count = int((~torch.isfinite(t)).sum())
                raise ValueError(f"{label} has {count} NaN or infinite value(s), the first at "
                                 f"index {tuple(bad)}")
        sizes = {_label(name, k): t.shape[0] for k, t in zip(keys, tensors)}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{name}: tensors must share the leading (data-point) dimension, "
                             f"got {sizes}")
        self.num_data = tensors[0].shape[0]
        self.tensors = tensors
        self.device = self.tensors[0].device

    def fingerprint(self):
        """A cheap summary that tells data sets apart: structure, shapes, dtypes and a hash of
        up to 4,096 evenly spaced values of each tensor (for resuming the right checkpoint)."""
        parts = []
        for key, t in zip(self.keys, self.tensors):
            flat = t.reshape(-1)
            sample = flat[::max(1, flat.numel() // 4096)].double()
            weights = torch.arange(1, sample.numel() + 1, dtype=torch.float64, device=sample.device)
            parts.append(f"{key}:{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}:"
                         f"{float(sample.sum()):.10g}:{float((sample * weights).sum()):.10g}")
        return f"{self.kind};" + ";".join(parts)

    def check_like(self, other):
        """Raise unless ``other`` has this data's structure and per-point shapes."""
        if self.kind != other.kind or self.keys != other.keys:
            raise ValueError(f"{other.name} must have the structure of {self.name} "
                             f"({self.kind} with keys {self.keys}), got {other.kind} "
                             f"with keys {other.keys}")
        for key, a, b in zip(self.keys, self.tensors, other.tensors):
            if a.shape[1:] != b.shape[1:]:
                raise ValueError(f"{_label(other.name, key)} has per-point shape "
                                 f"{tuple(b.shape[1:])}, {_label(self.name, key)} has "
                                 f"{tuple(a.shape[1:])}")

    def batch(self, index=None):
        """The tensors at ``index`` (a LongTensor on the data's device), or all of them."""
        if index is None:
            return self.tensors
        return [t.index_select(0, index) for t in self.tensors]

    def call_args(self, tensors, num_data):
        """(args, kwargs) for calling a model on ``tensors`` drawn from this data."""
        kwargs = {} if num_data is None else {"num_data": num_data}
        if self.kind == "dict":
            kwargs.update(zip(self.keys, tensors))
            return (), kwargs
        return tuple(tensors), kwargs

    def labels(self):
        """The name of each tensor, as error messages give it: ``data``, ``data[0]``, ``data['x']``."""
        return [_label(self.name, k) for k in self.keys]

    def structured(self, tensors):
        """``tensors`` (drawn from this data) in the data's own structure: tensor, tuple or dict."""
        if self.kind == "tensor":
            return tensors[0]
        if self.kind == "dict":
            return dict(zip(self.keys, tensors))
        return tuple(tensors)

    def head(self, num_points):
        """The first ``num_points`` points (at most all), in the data's own structure."""
        index = torch.arange(min(num_points, self.num_data), device=self.device)
        return self.structured(self.batch(index))

    def batches(self, batch_size):
        """Consecutive batches covering the data once, in order (for evaluation)."""
        n = self.num_data
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(start + batch_size, n), device=self.device)
            yield self.batch(index)
