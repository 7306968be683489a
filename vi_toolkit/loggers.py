"""Loggers: callbacks that write a fit's progress where other tools read it.

Each writes, at every recorded epoch (a full-batch fit: every logging interval), the step,
the epoch, the training ELBO per data point, the held-out ELBO (if there is ``val_data``),
the learning rate and the throughput in data points per second since the last record:

* :class:`CSVLogger`: one row a record in a CSV file (header first);
* :class:`TensorBoardLogger`: scalars ``elbo``, ``val_elbo``, ``lr``, ``points_per_second``
  at the global step, in an event file under ``log_dir``
  (``torch.utils.tensorboard``; install the ``tensorboard`` extra).

In a distributed fit only rank 0 writes.
"""

import csv
import os
import time

from .callbacks import Callback

FIELDS = ("step", "epoch", "elbo", "val_elbo", "lr", "points_per_second")


class _RecordLogger(Callback):
    """The record both loggers write; subclasses say where."""

    def on_fit_start(self, state):
        self.last = (state.step, time.perf_counter())

    def record(self, state):
        step, now = state.step, time.perf_counter()
        points = (step - self.last[0]) * state.config["batch_size"]
        rate = points / max(now - self.last[1], 1e-9)
        self.last = (step, now)
        return {"step": step, "epoch": state.epoch, "elbo": state.elbo, "val_elbo": state.val_elbo,
                "lr": state.history["lr"][-1] if state.history["lr"] else None,
                "points_per_second": rate}

    def on_fit_end(self, state):
        self.close()


class CSVLogger(_RecordLogger):
    """Append one row a record to the CSV file ``path`` (see the module)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.file = None

    def on_fit_start(self, state):
        super().on_fit_start(state)
        if state.is_main:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.file = open(self.path, "w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=FIELDS)
            self.writer.writeheader()

    def on_epoch_end(self, state):
        row = self.record(state)
        if self.file is not None:
            self.writer.writerow({k: "" if v is None else v for k, v in row.items()})
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


class TensorBoardLogger(_RecordLogger):
    """Scalars for TensorBoard under ``log_dir`` (see the module)."""

    def __init__(self, log_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError("TensorBoardLogger needs the tensorboard package: pip install "
                             "'vi-toolkit[tensorboard]'") from err
        self.log_dir, self.writer_class, self.writer = os.fspath(log_dir), SummaryWriter, None

    def on_fit_start(self, state):
        super().on_fit_start(state)
        if state.is_main:
            self.writer = self.writer_class(log_dir=self.log_dir)

    def on_epoch_end(self, state):
        row = self.record(state)
        if self.writer is None:
            return
        for key in FIELDS[2:]:
            if row[key] is not None:
                self.writer.add_scalar(key, row[key], global_step=row["step"])
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
