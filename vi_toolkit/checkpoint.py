"""Checkpoint files: the whole state of a fit in one file, written atomically, loaded safely.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts saved with
``torch.save``. It is written to a temporary file in the same folder, flushed to
disk and renamed over the target, so a crash mid-write leaves the previous
checkpoint intact; it is read with ``torch.load(weights_only=True)``, which never
unpickles arbitrary objects.
"""

import os
import random
import tempfile

import numpy as np
import torch

FORMAT = "vi-toolkit-checkpoint"
VERSION = 1


def save_checkpoint(path, state):
    """Write ``state`` to ``path`` atomically (temporary file + fsync + rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by :func:`save_checkpoint`; a clear ``ValueError`` otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path!r} is not a readable vi-toolkit checkpoint "
                         f"(truncated, corrupted or unsafe): {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a vi-toolkit checkpoint")
    if state.get("version") != VERSION:
        raise ValueError(f"checkpoint {path!r} has format version {state.get('version')}, "
                         f"this vi-toolkit reads version {VERSION}")
    return state


def get_rng_state(host: bool = True):
    """The state of every random number generator a fit draws from, as safe types; with
    ``host=False`` torch's only, without Python's and NumPy's, which only Python code draws
    from (a model run eagerly, a callback) and whose states take ~60 us to read."""
    state = {"torch": torch.get_rng_state()}
    if host:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, _ = random.getstate()
        state["python"] = [*internal, version]
        state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_initialized():  # not is_available, which asks the driver (26 us, at every read-back)
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what :func:`get_rng_state` returned (the generators it holds)."""
    torch.set_rng_state(state["torch"])
    if "python" in state:
        *internal, version = state["python"]
        random.setstate((version, tuple(internal), None))
        np_state = state["numpy"]
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
