"""The data of a fit: one tensor, or a tuple or dict of tensors sharing dimension 0.

Dimension 0 indexes data points. A fit calls ``model(x, num_data=N)`` for a tensor,
``model(*batch, num_data=N)`` for a tuple and ``model(**batch, num_data=N)`` for a
dict, with every tensor indexed by the same minibatch (:class:`FitData`).

Several data sets of their own sizes, in one fit (:class:`DataSets`): a model and guide of
sets s = 1..S, each of N_s points minibatched B_s at a time, get one keyword per set and
``num_data={s: N_s}``, and scale each set's terms by its own N_s / B_s (its own plate,
:func:`vi_toolkit.plates.data_plate`), so that

    ELBO_B = E_q[ global terms + sum_s N_s/B_s sum_{i in B_s} local terms of point i of set s ]

is unbiased for the full ELBO whatever the batch sizes.
"""

import math
import numbers

import numpy as np
import torch


def _is_count(value, most: int) -> bool:
    """Whether ``value`` is an integer (not a bool) between 1 and ``most``."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and 1 <= value <= most


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

    def first(self, num_points) -> "FitData":
        """The first ``num_points`` points (at most all) as data of their own."""
        return FitData(self.head(num_points), name=self.name, device=self.device)

    def batch_sizes(self, batch_size) -> int:
        """The batch size B: ``batch_size``, or N for ``None`` (the full batch).

        Raises:
            ValueError: ``batch_size`` is not an integer between 1 and N.
        """
        if batch_size is None:
            return self.num_data
        if not _is_count(batch_size, self.num_data):
            raise ValueError(f"batch_size must be an integer between 1 and the number of "
                             f"data points ({self.num_data}), got {batch_size!r}")
        return int(batch_size)

    def minibatched(self, batch_size: int) -> bool:
        """Whether batches of ``batch_size`` points are smaller than the data."""
        return batch_size < self.num_data

    def steps_per_epoch(self, batch_size: int, drop_last: bool = False) -> int:
        """Steps of an epoch in batches of ``batch_size`` (the last, smaller one dropped or not)."""
        n = self.num_data
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    def batches(self, batch_size):
        """Consecutive batches covering the data once, in order (for evaluation)."""
        n = self.num_data
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(start + batch_size, n), device=self.device)
            yield self.batch(index)


class DataSets:
    """Several data sets in one fit, each with its own size, minibatches and plate.

    ``DataSets(labelled=(x_l, y_l), unlabelled=x_u)`` names each set by a keyword; its value
    is data as :func:`vi_toolkit.fit` takes them (a tensor, or a tuple or dict of tensors
    sharing dimension 0). A fit calls the model and the guide with one keyword per set, the
    set's minibatch in its own structure, and ``num_data`` the dict of the sets' sizes::

        model(labelled=(x_b, y_b), unlabelled=u_b, num_data={"labelled": N_l, "unlabelled": N_u})

    and the model opens each set's plate with
    ``vi_toolkit.data_plate(x_b, num_data, name="labelled")``, so that the set's terms are
    scaled by its own N_s / B_s (see :mod:`vi_toolkit.plates`). Set s is minibatched with its
    own batch size B_s (:meth:`batch_sizes`) from a permutation of its own. An epoch is the
    pass of the set that needs the most batches: every set starts a new permutation with
    each epoch, and a set covered before the epoch ends starts another, so that each epoch
    covers every set at least once.

    Within the fit's machinery a ``DataSets`` stands where a :class:`FitData` does: its
    ``tensors`` are every set's tensors in order (``labelled[0], labelled[1], unlabelled``),
    and ``num_data`` is the total N = sum_s N_s.

    Raises:
        ValueError: no set, a name that cannot be a keyword (or is ``num_data``), or a set's
            data invalid as :class:`FitData` checks them (the message names the set).
    """

    kind = "sets"

    def __init__(self, **sets):
        if not sets:
            raise ValueError("DataSets needs at least one named data set, e.g. "
                             "DataSets(labelled=(x, y), unlabelled=u)")
        for name in sets:
            if not name.isidentifier() or name == "num_data":
                raise ValueError(f"DataSets: {name!r} cannot name a data set (the model gets each "
                                 "set as a keyword argument, beside num_data)")
        self.sets = {name: value if isinstance(value, FitData) else FitData(value, name=name)
                     for name, value in sets.items()}
        self.name, self.keys = "data", list(self.sets)
        self.sizes = {name: part.num_data for name, part in self.sets.items()}
        self.num_data = sum(self.sizes.values())
        self.tensors = [t for part in self.sets.values() for t in part.tensors]
        self.device = self.tensors[0].device

    def to(self, device) -> "DataSets":
        """The same sets on ``device`` (moved once, then checked where they live)."""
        return DataSets(**{name: FitData(part.structured(part.tensors), name=name, device=device)
                           for name, part in self.sets.items()})

    def batch_sizes(self, batch_size) -> dict:
        """Each set's batch size B_s, ``{set: B_s}``.

        Args:
            batch_size: ``None`` (every set whole), an int B (proportional: with
                S = ceil(N / B) steps an epoch, B_s = ceil(N_s / S), so that an epoch covers
                every set once) or a dict ``{set: B_s}`` naming every set.

        Raises:
            ValueError: a dict whose sets differ from these, or a batch size that is not an
                integer between 1 and its set's size (the message names the set).
        """
        if batch_size is None:
            return dict(self.sizes)
        if isinstance(batch_size, dict):
            if set(batch_size) != set(self.sizes):
                raise ValueError(f"batch_size: a dict must give the batch size of each data set "
                                 f"{sorted(self.sizes)}, got one for {sorted(batch_size)}")
            sizes = {}
            for name, b in batch_size.items():
                n = self.sizes[name]
                if not _is_count(b, n):
                    raise ValueError(f"batch_size[{name!r}] must be an integer between 1 and the size "
                                     f"of data set {name!r} ({n} points), got {b!r}")
                sizes[name] = int(b)
            return {name: sizes[name] for name in self.sizes}
        if not _is_count(batch_size, self.num_data):
            raise ValueError(f"batch_size must be an integer between 1 and the number of data points "
                             f"of all the sets ({self.num_data}), or a dict {{set: size}}, got {batch_size!r}")
        steps = math.ceil(self.num_data / batch_size)
        return {name: math.ceil(n / steps) for name, n in self.sizes.items()}

    def minibatched(self, batch_sizes: dict) -> bool:
        """Whether any set's batches are smaller than the set."""
        return any(part.minibatched(batch_sizes[name]) for name, part in self.sets.items())

    def steps_per_epoch(self, batch_sizes: dict, drop_last: bool = False) -> int:
        """Steps of an epoch: those of the set that needs the most batches of its size."""
        return max(part.steps_per_epoch(batch_sizes[name], drop_last) for name, part in self.sets.items())

    def fingerprint(self):
        """The sets' names and each set's :meth:`FitData.fingerprint`."""
        return "sets;" + ";".join(f"{name}=({part.fingerprint()})" for name, part in self.sets.items())

    def split(self, tensors) -> dict:
        """``tensors`` (every set's, in order) as ``{set: that set's tensors}``."""
        out, start = {}, 0
        for name, part in self.sets.items():
            out[name] = list(tensors[start:start + len(part.tensors)])
            start += len(part.tensors)
        return out

    def batch(self, index=None):
        """Every set's tensors at ``index``: ``{set: LongTensor, or None for the whole set}``."""
        if index is None:
            return self.tensors
        return [t for name, part in self.sets.items() for t in part.batch(index[name])]

    def call_args(self, tensors, num_data):
        """``((), {set: batch, ..., "num_data": {set: N_s}})`` for a model of these sets.

        ``num_data=None`` leaves ``num_data`` out (a model that does not take it); any other
        value passes the sets' own sizes.
        """
        kwargs = self.structured(tensors)
        if num_data is not None:
            kwargs["num_data"] = dict(self.sizes)
        return (), kwargs

    def labels(self):
        """The name of each tensor, as error messages give it: ``labelled[0]``, ``unlabelled``."""
        return [label for part in self.sets.values() for label in part.labels()]

    def structured(self, tensors):
        """``tensors`` (every set's, in order) as ``{set: data in the set's own structure}``."""
        return {name: part.structured(ts) for (name, part), ts in
                zip(self.sets.items(), self.split(tensors).values())}

    def head(self, num_points):
        """The first ``num_points`` points of each set: ``{set: data in its own structure}``."""
        return {name: part.head(num_points) for name, part in self.sets.items()}

    def first(self, num_points) -> "DataSets":
        """The first ``num_points`` points of each set, as sets of their own."""
        return DataSets(**{name: part.first(num_points) for name, part in self.sets.items()})


def as_fit_data(data, *, name: str = "data", device=None):
    """``data`` as a fit takes it: a :class:`DataSets` on ``device``, or the :class:`FitData` of
    a tensor, or a tuple or dict of tensors (``name`` in its error messages)."""
    return data.to(device) if isinstance(data, DataSets) else FitData(data, name=name, device=device)
