"""How a fit runs across processes: one process, or data-parallel (:mod:`vi_toolkit.distributed`).

The loop talks to a strategy only; the two kinds share one interface:

* ``connect()``; ``rank``, ``world``, ``device``, ``is_main`` (shows progress, writes files);
* ``broadcast_object(obj)``, ``gather_objects(obj)``, ``broadcast_(tensors)`` (rank 0's values
  everywhere), ``sum(tensor)`` over processes;
* ``shard(index)`` (this process's part of a batch, and its share of it) and
  ``reduce_gradients(params, share)`` (the gradient of the loss on the whole batch);
* ``seed_stream(seed)``, ``restore_stream(states)`` (independent guide noise per process).

:class:`SingleProcess` makes each of these the identity, so a single-process fit pays
nothing for them.
"""


from .devices import resolve_device
from .distributed import DataParallel, launched


class SingleProcess:
    """One process: every collective is the identity."""

    rank, world, is_main = 0, 1, True

    def __init__(self, device):
        self.device = resolve_device(device)

    def connect(self):
        """Nothing to join."""

    def broadcast_object(self, obj):
        return obj

    def gather_objects(self, obj):
        return [obj]

    def broadcast_(self, tensors):
        """Nothing to overwrite."""

    def sum(self, tensor):
        return tensor

    def shard(self, index):
        return index, 1.0

    def reduce_gradients(self, params, share):
        """The gradients are already those of the whole batch."""

    def seed_stream(self, seed):
        """Rank 0 keeps the seeded stream."""

    def restore_stream(self, rng_states):
        """The checkpoint's own RNG state is already restored."""


class DataParallelStrategy(DataParallel):
    """Data-parallel over the processes ``torchrun`` started (see :mod:`vi_toolkit.distributed`)."""

    @property
    def is_main(self):
        return self.rank == 0

    def shard(self, index):
        part = super().shard(index)
        return part, part.numel() / index.numel()


def make_strategy(distributed, device):
    """``SingleProcess`` or ``DataParallelStrategy`` for ``fit(distributed=...)``.

    Args:
        distributed: ``"auto"`` (data-parallel when ``torchrun`` launched the process),
            ``True`` (required) or ``False``.
        device: the fit's ``device`` argument.
    """
    if distributed not in ("auto", True, False):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
    if distributed is True or (distributed == "auto" and launched()):
        return DataParallelStrategy(device)
    return SingleProcess(device)
