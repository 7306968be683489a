"""Data-parallel fits on PyTorch's own distributed engine, launched with ``torchrun``.

Launch the same script once per process with ``torchrun``; it sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and ``fit`` then
runs data-parallel on its own (``distributed="auto"``)::

    torchrun --nproc_per_node=4 train.py                        # one node, 4 processes
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT train.py  # on each of two nodes

What a data-parallel fit does, step by step:

* every process joins the default process group (gloo on the CPU, NCCL on CUDA, each
  process on GPU ``LOCAL_RANK``) with a timeout, so a process whose peer died or hung
  stops with a :class:`DistributedError` instead of waiting for ever;
* the seed is rank 0's, parameters are initialised from it and then broadcast from
  rank 0, so every process starts from identical parameters; afterwards each process
  draws the guide's noise from a stream of its own (rank 0 keeps the single-process
  stream), so the processes' Monte Carlo samples are independent;
* each epoch rank 0 draws the permutation of the data and broadcasts it; each
  minibatch of ``batch_size`` indices (the global batch, as without distribution) is
  split across the processes, so each computes its loss on about
  ``batch_size / world_size`` points, with ``num_data`` the size N of the whole data
  set, an unbiased estimate of the full-data loss;
* the gradients of all optimised parameters (Pyro's parameter store and
  ``nn.Module``\\ s alike, in the fit's sorted order) are flattened and summed with one
  all-reduce, each process weighted by its share of the batch ``B_r / B``. The result
  is exactly the gradient a single process would get on the whole batch (up to the
  Monte Carlo noise of the guide), and every process takes the same optimiser step;
* the losses stay on each process until the fit reads them back (once per logging
  interval), then they are summed across processes, so the history holds the global
  loss; held-out ELBOs are computed on a share of the validation batches per process
  and summed;
* rank 0 alone shows the progress bar and writes checkpoints; a checkpoint holds the
  random number generator state of every process, and on resume rank 0 reads it and
  broadcasts it, so the other nodes need no shared file system.

Every process holds the whole data set (moved once to its device) and indexes its
share of each batch from it. Callbacks run in every process (with identical
parameters and history); work only rank 0 should do can test :func:`rank`.
"""

import atexit
import datetime
import os

import numpy as np
import pyro
import torch
import torch.distributed as dist

from .checkpoint import set_rng_state
from .devices import resolve_device

DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective operation failed: another process crashed, or hung past the timeout."""


def launched():
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank():
    """This process's rank (0 when not distributed): only rank 0 should print or write files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _check_environment():
    missing = [key for key in _ENV if key not in os.environ]
    if missing:
        raise ValueError(f"a distributed fit needs the environment torchrun sets; {missing} "
                         "missing. Launch with torchrun --nproc_per_node=N script.py, or pass "
                         "distributed=False")


def local_device(device="auto"):
    """This process's device: CUDA (``"auto"`` with GPUs, or ``"cuda"``) means GPU ``LOCAL_RANK``."""
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return device


def setup(device="auto", timeout=DEFAULT_TIMEOUT):
    """Join the process group ``torchrun`` describes; return this process's ``torch.device``.

    NCCL for CUDA devices (see :func:`local_device`), gloo for the CPU. A collective
    that waits longer than ``timeout`` fails. A process group that is already
    initialised is used as it is: ``fit`` calls this itself, call it first to choose
    another timeout.
    """
    _check_environment()
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        # a group left open at exit can abort the process ("terminate called without an
        # active exception" from the backend's threads): close what this module opened
        atexit.register(_close)
    return device


def _close():
    if dist.is_initialized():
        dist.destroy_process_group()


class DataParallel:
    """The collectives of one data-parallel fit over the default process group.

    Created from the environment, without communicating; :meth:`connect` joins the group.
    """

    def __init__(self, device):
        _check_environment()
        self.device = local_device(device)
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])

    def connect(self):
        """Join the process group (see :func:`setup`)."""
        setup(self.device)
        if dist.get_world_size() != self.world or dist.get_rank() != self.rank:
            raise ValueError(f"the process group (rank {dist.get_rank()} of "
                             f"{dist.get_world_size()}) does not match the environment "
                             f"(RANK={self.rank}, WORLD_SIZE={self.world})")

    def _run(self, what, op, *args, **kwargs):
        try:
            return op(*args, **kwargs)
        except RuntimeError as err:  # gloo and NCCL errors, timeouts included
            raise DistributedError(
                f"process {self.rank} of {self.world}: {what} failed; another process has "
                f"probably crashed or hung beyond the process group's timeout ({err})") from err

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every process."""
        box = [obj]
        self._run("broadcast of an object", dist.broadcast_object_list, box, src=0)
        return box[0]

    def gather_objects(self, obj):
        """Every process's ``obj``, in rank order."""
        boxes = [None] * self.world
        self._run("gather of objects", dist.all_gather_object, boxes, obj)
        return boxes

    def broadcast_(self, tensors):
        """Overwrite ``tensors`` (a tensor or a list of them) with rank 0's values, in place."""
        tensors = [tensors] if torch.is_tensor(tensors) else list(tensors)
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        self._run("broadcast of tensors", dist.broadcast, flat, src=0)
        self._unflatten(flat, tensors)

    def sum(self, tensor):
        """The sum of ``tensor`` over the processes (a new tensor)."""
        total = tensor.detach().clone()
        self._run("all-reduce of losses", dist.all_reduce, total)
        return total

    def shard(self, index):
        """This process's part of a batch of indices; the parts differ in size by one at most."""
        return index.tensor_split(self.world)[self.rank]

    def reduce_gradients(self, params, weight):
        """Replace each gradient by the ``weight``-weighted sum of the processes' gradients.

        With ``weight`` the process's share of the batch, the result is the gradient of the
        loss on the whole batch. One all-reduce on the flattened gradients.
        """
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]) * weight
        self._run("all-reduce of gradients", dist.all_reduce, flat)
        self._unflatten(flat, grads)

    def seed_stream(self, seed):
        """Give each process its own random stream for the guide's noise (rank 0 keeps its own)."""
        if self.rank:
            pyro.set_rng_seed(int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0]))

    def restore_stream(self, rng_states):
        """Restore this process's random streams from a checkpoint's per-process states."""
        set_rng_state(rng_states[self.rank])

    @staticmethod
    @torch.no_grad()
    def _unflatten(flat, tensors):
        start = 0
        for t in tensors:
            t.copy_(flat[start:start + t.numel()].view_as(t))
            start += t.numel()
