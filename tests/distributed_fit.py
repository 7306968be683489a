"""A deterministic data-parallel fit, run by ``tests/test_distributed.py`` in several processes.

    python -m torch.distributed.run --standalone --nproc_per_node=2 distributed_fit.py fit OUT
    (RANK=.. WORLD_SIZE=.. ... python distributed_fit.py crash OUT)

The model has a global latent with a point-mass (Delta) guide, a Pyro parameter and a
network registered with ``pyro.module``: the ELBO has no Monte Carlo noise, so a
data-parallel fit must follow a single-process fit with the same seed and batch.
"""

import datetime
import os
import sys

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from vi_toolkit import data_plate, fit
from vi_toolkit.distributed import rank, setup

SETTINGS = dict(lr=0.05, batch_size=15, seed=3, progress=False)  # 70 points: batches of 8 + 7


def data():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(70, 2, generator=g, dtype=torch.float64)
    y = t @ torch.tensor([1.5, -0.5], dtype=torch.float64) + 0.3 * torch.randn(
        70, generator=g, dtype=torch.float64)
    return t, y


def model_and_guide(init_seed):
    torch.manual_seed(init_seed)
    net = torch.nn.Linear(2, 1, dtype=torch.float64)

    def model(t, y, num_data=None):
        pyro.module("net", net)
        shift = pyro.sample("shift", dist.Normal(y.new_tensor(0.0), y.new_tensor(1.0)))
        scale = pyro.param("scale", y.new_tensor(1.0), constraint=constraints.positive)
        with data_plate(y, num_data):
            pyro.sample("y", dist.Normal(net(t).squeeze(-1) + shift, scale), obs=y)

    def guide(t, y, num_data=None):
        pyro.sample("shift", dist.Delta(pyro.param("shift_loc", y.new_tensor(0.0))))

    return model, guide


def run(init_seed=0, distributed="auto", **kwargs):
    t, y = data()
    model, guide = model_and_guide(init_seed)
    return fit(model, guide, (t, y), val_data=(t[:23], y[:23]),
               options={"val_batch_size": 5, "distributed": distributed}, **SETTINGS, **kwargs)


def summary(result):
    return {"params": result.params, "history": result.history}


def main(mode, out):
    setup("cpu", timeout=datetime.timedelta(seconds=60))
    if mode == "fit":  # each rank initialises differently: fit must broadcast rank 0's start
        full = run(init_seed=rank(), num_epochs=4)
        path = os.path.join(out, "fit.pt")
        run(init_seed=rank(), num_epochs=2, checkpoint=path)
        resumed = run(init_seed=rank(), num_epochs=4, checkpoint=path, resume=True)
        torch.save({"full": summary(full), "resumed": summary(resumed)},
                   os.path.join(out, f"rank{rank()}.pt"))
    elif mode == "crash":  # rank 1 dies in the middle of its second step
        calls = []

        def transform(tensors):
            calls.append(1)
            if rank() == 1 and len(calls) == 3:
                os._exit(3)
            return tensors

        run(num_epochs=4, transform=transform)
    else:
        raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
