"""vi-toolkit: variational inference for latent variable models, on Pyro and PyTorch.

Write a model and a guide as Pyro programs, then ``result = fit(model, guide, data)``;
``result`` is the fitted posterior (:class:`FitResult`): sample it, check it, evaluate it,
save it and :func:`load` it in another process.
"""

from importlib.metadata import version

from .callbacks import Callback, Checkpoint, Convergence, EarlyStopping, FitEvent, FitState
from .checkpoint import load_checkpoint, save_checkpoint
from .data import DataSets
from .devices import resolve_device
from .distributed import DistributedError
from .elbo import IWAE, make_elbo
from .engine import FitOptions, fit
from .errors import DivergenceError, FitError
from .loggers import CSVLogger, TensorBoardLogger
from .plates import data_plate
from .result import FitResult, load, load_fit
from .specs import Rebuildable

__version__ = version("vi-toolkit")  # one source: pyproject.toml

__all__ = ["fit", "FitOptions", "DataSets", "FitResult", "load", "load_fit", "Callback", "FitState", "FitEvent",
           "EarlyStopping", "Convergence", "Checkpoint", "CSVLogger", "TensorBoardLogger",
           "DivergenceError", "FitError", "DistributedError", "data_plate", "make_elbo", "IWAE",
           "Rebuildable", "resolve_device", "save_checkpoint", "load_checkpoint", "__version__"]
