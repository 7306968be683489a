"""Reading a user's own data: a .csv or .npy file as a 2-D float array, with clear errors.

A CSV holds one data point per row and one number per cell, comma separated; a first
row that is entirely non-numeric is taken as a header. Any other non-numeric cell is
a ``ValueError`` naming the file, the line and the column.
"""

import csv
import os

import numpy as np


def _number(cell):
    try:
        return float(cell)
    except ValueError:
        return None


def read_csv(path):
    """The numbers of a CSV file as an array (rows, columns); see the module docstring."""
    with open(path, newline="") as f:
        rows = [(i + 1, [c.strip() for c in row]) for i, row in enumerate(csv.reader(f))
                if any(c.strip() for c in row)]
    if rows and all(_number(c) is None for c in rows[0][1]):
        rows = rows[1:]  # a header
    if not rows:
        raise ValueError(f"{path}: no data rows")
    width = len(rows[0][1])
    values = []
    for line, cells in rows:
        if len(cells) != width:
            raise ValueError(f"{path}: line {line} has {len(cells)} cells, the first data row "
                             f"has {width}")
        numbers = [_number(c) for c in cells]
        for column, (cell, number) in enumerate(zip(cells, numbers)):
            if number is None:
                raise ValueError(f"{path}: line {line}, column {column + 1}: {cell!r} is not a "
                                 "number")
        values.append(numbers)
    return np.asarray(values, dtype=float)


def load_array(path, *, ndim=None):
    """A .csv or .npy file as a float array; ``ndim`` (1, 2, ...) is checked if given.

    Raises ``ValueError`` naming the file for a missing file, an unknown extension,
    non-numeric content or the wrong number of dimensions.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        array = read_csv(path)
    elif ext == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path}: not a numeric .npy array ({err})") from err
        if array.dtype.kind not in "biuf":
            raise ValueError(f"{path}: the array has dtype {array.dtype}, not numbers")
        array = array.astype(float)
    else:
        raise ValueError(f"{path}: unknown file type {ext!r}; use .csv or .npy")
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{path}: expected a {ndim}-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: {int((~np.isfinite(array)).sum())} NaN or infinite value(s)")
    return array
