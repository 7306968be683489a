"""The data-plate convention shared by every model and guide of the project.

A model and its guide take the data as arguments plus the keyword ``num_data``,
the size N of the whole data set. ``fit`` always passes it; calling a model by
hand with the whole data set, ``num_data`` may be left at ``None``. Inside, the
plate over data points is opened with :func:`data_plate`::

    def model(x, num_data=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))           # global
        with data_plate(x, num_data):                             # local
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

For a minibatch of B points ``data_plate`` is ``pyro.plate("data", N, subsample=...)``,
so Pyro multiplies every log-density inside it by N / B and leaves the global
terms alone: the minibatch ELBO

    ELBO_B = E_q[ log p(theta) - log q(theta)
                  + N/B sum_{i in B} (log p(x_i, z_i | theta) - log q(z_i | x_i)) ]

is an unbiased estimate of the full-data ELBO. The guide opens the same plate for
its local sites. When a guide keeps parameters per data point, the data carry an
index tensor (``data=(x, torch.arange(N))``) that arrives as an argument.
"""

import pyro
import torch

DATA_PLATE = "data"


def data_plate(x, num_data=None, *, dim=None, name=DATA_PLATE):
    """Plate over the leading dimension of ``x``, scaled to a data set of ``num_data`` points.

    ``x`` is a tensor whose first dimension indexes data points (or an int, the
    batch size). ``num_data=None`` means the batch is the whole data set.
    """
    batch = x if isinstance(x, int) else x.shape[0]
    size = batch if num_data is None else int(num_data)
    if batch > size:
        raise ValueError(f"data_plate: the batch has {batch} points but num_data={size}")
    if size == batch:
        return pyro.plate(name, size, dim=dim)
    device = None if isinstance(x, int) else x.device
    return pyro.plate(name, size, subsample=torch.arange(batch, device=device), dim=dim)
