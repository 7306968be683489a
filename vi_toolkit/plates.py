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

Several data sets in one fit (:class:`vi_toolkit.data.DataSets`) each have a plate of
their own, named after the set: ``num_data`` is then the dict ``{set: N_s}`` and
``data_plate(x, num_data, name=set)`` scales the set's terms by N_s / B_s, so that

    ELBO_B = E_q[ log p(theta) - log q(theta)
                  + sum_s N_s/B_s sum_{i in B_s} (log p(x_si, z_si | theta) - log q(z_si | x_si)) ]

is unbiased for the ELBO of all the sets together. :func:`only_plate` keeps the terms of
one set's plate and masks out every other site (a set's own ELBO).
"""

import pyro
import torch
from pyro.poutine.messenger import Messenger

DATA_PLATE = "data"


def data_plate(x, num_data=None, *, dim=None, name=DATA_PLATE):
    """Plate over the leading dimension of ``x``, scaled to a data set of ``num_data`` points.

    Args:
        x: a tensor whose first dimension indexes data points (or an int, the batch size).
        num_data: the size N of the data set; ``None``: the batch is the whole data set; a
            dict ``{set: N_s}`` (a fit of several data sets): the size of the set ``name``.
        dim: the plate's dimension (Pyro's ``dim``).
        name: the plate's name; with several data sets, the set's name.

    Returns:
        ``pyro.plate(name, N, subsample=...)``, which scales the batch's terms by N / B.

    Raises:
        ValueError: the batch is larger than ``num_data``, or the dict has no set ``name``.
    """
    batch = x if isinstance(x, int) else x.shape[0]
    if isinstance(num_data, dict):
        if name not in num_data:
            raise ValueError(f"data_plate: num_data holds the sizes of the data sets {sorted(num_data)}, "
                             f"none named {name!r}; open each set's plate with name=<the set's name>")
        num_data = num_data[name]
    size = batch if num_data is None else int(num_data)
    if batch > size:
        raise ValueError(f"data_plate: the batch has {batch} points but num_data={size}")
    if size == batch:
        return pyro.plate(name, size, dim=dim)
    device = None if isinstance(x, int) else x.device
    return pyro.plate(name, size, subsample=torch.arange(batch, device=device), dim=dim)


def only_plate(name: str) -> Messenger:
    """A handler that keeps the log-densities of the sample sites inside plate ``name`` and
    masks out every other one.

    Inside ``with only_plate("labelled"):`` an ELBO computes the terms of that plate's sites
    alone (log p - log q, its enumerated sites summed out): the ELBO of one data set of a
    fit of several (:class:`vi_toolkit.data.DataSets`). Global sites and other sets' sites
    count zero. The handler must enclose the plates it looks for (it reads each site's
    plates after they have been entered).

    Args:
        name: the plate's name.

    Returns:
        A Pyro messenger, to use as a context manager or as ``only_plate(name)(fn)``.
    """
    return _OnlyPlate(name)


class _OnlyPlate(Messenger):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def _process_message(self, msg):
        if msg["type"] == "sample" and not any(f.name == self.name for f in msg["cond_indep_stack"]):
            msg["mask"] = False if msg["mask"] is None else msg["mask"] & False
