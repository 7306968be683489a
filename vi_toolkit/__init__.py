"""vi-toolkit: variational inference for latent variable models, on Pyro and PyTorch.

Write a model and a guide as Pyro programs, then ``fit(model, guide, data)``.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .devices import resolve_device
from .distributed import DistributedError
from .elbo import IWAE, make_elbo
from .fit import DivergenceError, FitError, FitEvent, FitResult, fit
from .plates import data_plate

__version__ = "0.1.0"

__all__ = ["fit", "FitResult", "FitEvent", "DivergenceError", "FitError", "DistributedError", "data_plate", "make_elbo",
           "IWAE", "resolve_device", "save_checkpoint", "load_checkpoint", "__version__"]
