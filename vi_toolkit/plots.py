"""Figures shared by every example: one function per kind of figure, each writing a PNG.

Every function takes the data to draw and a ``path``, writes the figure there and
returns the path, so scripts read ``plots.elbo_curves(result.history, out / "elbo.png")``.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def save(fig, path):
    """Write ``fig`` to ``path`` (creating its folder), close it and return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def elbo_curves(histories, path, *, x="step", title="ELBO per data point"):
    """Training (solid) and held-out (dashed) ELBO per data point of one or more fits.

    ``histories`` is a ``FitResult.history`` or a dict ``label -> history``.
    """
    if "elbo" in histories:
        histories = {"fit": histories}
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, h) in enumerate(histories.items()):
        color = f"C{i}"
        ax.plot(h[x], h["elbo"], color=color, label=f"{label} (train)")
        if h.get("val_elbo"):
            ax.plot(h[x][:len(h["val_elbo"])], h["val_elbo"], "--", color=color,
                    label=f"{label} (held out)")
    ax.set_xlabel(x)
    ax.set_ylabel("ELBO / data point (nats)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return save(fig, path)


def image_grid(images, path, *, nrow=8, title=None, row_labels=None):
    """Images (N, H, W) or (N, C, H, W) with values in [0, 1], ``nrow`` per row."""
    images = torch.as_tensor(images).detach().float().cpu()
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    n = images.shape[0]
    ncol = min(nrow, n)
    rows = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(rows, ncol, figsize=(ncol * 0.9, rows * 0.9 + (0.4 if title else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if i < n:
            img = images[i]
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1) if img.dim() == 3 else img,
                      cmap="gray", vmin=0, vmax=1)
    if row_labels:
        for r, label in enumerate(row_labels[:rows]):
            axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    return save(fig, path)
