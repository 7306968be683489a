"""vi-toolkit: variational inference for latent variable models, on Pyro and PyTorch.

Write a model and a guide as Pyro programs, then ``fit(model, guide, data)``.
"""

from importlib.metadata import version

from .checkpoint import load_checkpoint, save_checkpoint
from .devices import resolve_device
from .distributed import DistributedError
from .elbo import IWAE, make_elbo
from .fit import DivergenceError, FitError, FitEvent, FitResult, fit
from .plates import data_plate

__version__ = version("vi-toolkit")  # one source: pyproject.toml

__all__ = ["fit", "FitResult", "FitEvent", "DivergenceError", "FitError", "DistributedError", "data_plate", "make_elbo",
           "IWAE", "resolve_device", "save_checkpoint", "load_checkpoint", "__version__"]
