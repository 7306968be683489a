"""Figures shared by the examples, benchmarks and notebooks: one function per kind of figure.

Every function draws the data it is given and returns the matplotlib ``Figure``, so a
notebook shows it inline and a script saves it (``vi_toolkit.scripts.save_figure``)::

    fig = plots.elbo_curves(result.history)                 # a new figure
    fig, (left, right) = plt.subplots(1, 2)
    plots.elbo_curves(result.history, ax=left)               # into an axis of your own
    plots.khat_histogram(report["khat_points"], ax=right)

A figure of one panel takes ``ax=``; a figure of several takes ``axes=``, a sequence of as
many axes as it has panels. Importing this module leaves matplotlib's backend alone (the
notebook's inline backend, or whatever the user chose); only the scripts select Agg.

What the figures draw:

* ``khat_histogram``: PSIS k-hat with the thresholds of Yao, Vehtari, Simpson and Gelman
  (2018, "Yes, but did it work?"): k < 0.5 good, 0.5 <= k <= 0.7 usable, k > 0.7 unreliable.
* ``sbc_ranks``: the rank of the true value among L posterior draws is uniform on
  {0, ..., L} for a calibrated posterior (Talts et al. 2018); with n simulations in k bins each
  bin count is Binomial(n, 1/k), whose 0.5% and 99.5% quantiles give the grey band.
* ``mixture_ellipses``: the r-sigma ellipse of N(m, S) with S = U diag(l) U^T is
  {m + r U diag(l)^(1/2) (cos t, sin t) : t in [0, 2 pi)}, drawn for r = 1, 2.
* ``subspace_comparison``: data projected on the top two principal axes U (D, 2) as
  (x - mean) U, with PPCA's image of the unit sphere ``{W u : |u| = 1}`` projected by U^T.
"""

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def _axis(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """The figure and axis to draw in: ``ax`` and its figure, or a new figure of ``figsize``."""
    if ax is None:
        return plt.subplots(figsize=figsize)
    if not isinstance(ax, Axes):
        raise ValueError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
    return ax.get_figure(), ax


def _axes(axes: Sequence[Axes] | None, count: int, nrows: int, ncols: int,
          figsize: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """``count`` axes to draw in: the given ``axes`` or a new ``nrows`` x ``ncols`` grid."""
    if axes is None:
        fig, grid = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
        return fig, list(grid.flat)
    axes = list(np.asarray(axes, dtype=object).flat)
    if len(axes) != count or not all(isinstance(a, Axes) for a in axes):
        raise ValueError(f"axes must be {count} matplotlib Axes (one per panel), got "
                         f"{len(axes)} object(s) of type(s) {sorted({type(a).__name__ for a in axes})}")
    return axes[0].get_figure(), axes


def _figure_of(drawn) -> Figure:
    """The figure of what an ArviZ plot returns (one axis or an array of them)."""
    return np.asarray(drawn, dtype=object).flat[0].get_figure()


def _numpy(values) -> np.ndarray:
    """A tensor, array or list as a float NumPy array on the CPU."""
    return np.asarray(torch.as_tensor(values).detach().cpu(), dtype=float)


def elbo_curves(histories: Mapping, *, x: str = "step", title: str | None = "ELBO per data point",
                ax: Axes | None = None) -> Figure:
    """Training (solid) and held-out (dashed) ELBO per data point of one or more fits.

    Args:
        histories: a ``FitResult.history`` or a dict ``label -> history``.
        x: the history's key on the horizontal axis (``"step"``, ``"epoch"``, ...).
        title: the axis title.
        ax: the axis to draw in; a new figure when None.

    Returns:
        The figure drawn in.
    """
    if "elbo" in histories:
        histories = {"fit": histories}
    fig, ax = _axis(ax, (6, 4))
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
    return fig


def image_grid(images, *, nrow: int = 8, title: str | None = None,
               row_labels: Sequence[str] | None = None, ax: Axes | None = None) -> Figure:
    """Images in rows of ``nrow``, tiled into one picture with white gaps between them.

    Args:
        images: (N, H, W), (N, 1, H, W) or (N, 3, H, W) values in [0, 1].
        nrow: images per row.
        title: the axis title.
        row_labels: a label left of each row.
        ax: the axis to draw in; a new figure when None.

    Returns:
        The figure drawn in.

    Raises:
        ValueError: ``images`` is not a non-empty batch of grey or RGB images, or ``nrow`` < 1.
    """
    images = torch.as_tensor(images).detach().float().cpu()
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() == 4 and images.shape[1] == 3:
        images = images.permute(0, 2, 3, 1)
    elif images.dim() != 3 or len(images) == 0:
        raise ValueError(f"images must be (N, H, W), (N, 1, H, W) or (N, 3, H, W) with N >= 1, "
                         f"got {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    n, h, w = images.shape[:3]
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    pad = 1  # white pixels between the images
    canvas = torch.ones(rows * (h + pad) + pad, ncol * (w + pad) + pad, *images.shape[3:])
    for i, img in enumerate(images.clamp(0, 1)):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad):(r + 1) * (h + pad), pad + c * (w + pad):(c + 1) * (w + pad)] = img
    fig, ax = _axis(ax, (ncol * 0.9, rows * 0.9 + (0.4 if title else 0)))
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(rows)] if row_labels else [])
    if row_labels:
        ax.set_yticklabels(list(row_labels[:rows]) + [""] * (rows - len(row_labels[:rows])), fontsize=8)
        ax.tick_params(axis="y", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title)
    return fig


def posterior_densities(idata, *, var_names: Sequence[str] | None = None, title: str | None = None,
                        axes: Sequence[Axes] | None = None) -> Figure:
    """Marginal posterior densities with 94% HDIs, by ArviZ's ``plot_posterior``.

    Args:
        idata: an ``arviz.InferenceData`` with a ``posterior`` group.
        var_names: the variables to draw; all when None.
        title: the figure's title.
        axes: one axis per scalar variable, as ArviZ's ``ax``; new ones when None.

    Returns:
        The figure drawn in.
    """
    import arviz as az

    fig = _figure_of(az.plot_posterior(idata, var_names=var_names, ax=axes, show=False))
    if title:
        fig.suptitle(title, y=1.04)
    return fig


def posterior_predictive(idata, *, var_names: Sequence[str] | None = None, num_pp_samples: int = 50,
                         title: str | None = None, axes: Sequence[Axes] | None = None) -> Figure:
    """Observed data against draws of the posterior predictive, by ArviZ's ``plot_ppc``.

    Args:
        idata: an ``arviz.InferenceData`` with ``posterior_predictive`` and ``observed_data``.
        var_names: the observed variables to draw; all when None.
        num_pp_samples: predictive draws drawn as curves.
        title: the figure's title.
        axes: one axis per observed variable, as ArviZ's ``ax``; new ones when None.

    Returns:
        The figure drawn in.
    """
    import arviz as az

    fig = _figure_of(az.plot_ppc(idata, var_names=var_names, num_pp_samples=num_pp_samples, ax=axes,
                                 show=False))
    if title:
        fig.suptitle(title)
    return fig


def khat_histogram(khats, *, title: str | None = "PSIS k-hat per data point",
                   ax: Axes | None = None) -> Figure:
    """Histogram of k-hat values with the 0.5 (good) and 0.7 (unreliable) thresholds.

    Args:
        khats: k-hat values (non-finite ones are left out).
        title: the axis title.
        ax: the axis to draw in; a new figure when None.

    Returns:
        The figure drawn in.
    """
    khats = np.asarray(khats, dtype=float).ravel()
    fig, ax = _axis(ax, (6, 4))
    ax.hist(khats[np.isfinite(khats)], bins=30, color="C0", alpha=0.8)
    for value, label, color in ((0.5, "0.5: good below", "C2"), (0.7, "0.7: unreliable above", "C3")):
        ax.axvline(value, color=color, linestyle="--", label=label)
    ax.set_xlabel("k-hat")
    ax.set_ylabel("data points")
    ax.set_title(title)
    ax.legend()
    return fig


def sbc_ranks(ranks: Mapping, num_draws: int, *, bins: int | None = None,
              title: str | None = "Simulation-based calibration",
              axes: Sequence[Axes] | None = None) -> Figure:
    """Rank histograms, one panel per scalar latent, with the 99% band of a uniform histogram.

    Args:
        ranks: site name -> integer array (simulations, components) of ranks in
            {0, ..., num_draws}; a calibrated posterior gives flat histograms inside the band.
        num_draws: posterior draws each rank was taken among.
        bins: histogram bins; about one per five simulations when None.
        title: the figure's title.
        axes: one axis per scalar component, in the order of ``ranks``; a new row when None.

    Returns:
        The figure drawn in.
    """
    from scipy import stats

    ranks = {name: np.asarray(r).reshape(len(r), -1) for name, r in ranks.items()}
    panels = [(f"{name}[{c}]" if r.shape[1] > 1 else name, r[:, c])
              for name, r in ranks.items() for c in range(r.shape[1])]
    fig, axes = _axes(axes, len(panels), 1, len(panels), (4 * len(panels), 3.2))
    for ax, (label, r) in zip(axes, panels):
        n = len(r)
        k = bins or max(2, min(num_draws + 1, n // 5))
        ax.hist(r, bins=k, range=(-0.5, num_draws + 0.5), color="C0", alpha=0.8)
        lo, hi = stats.binom.ppf([0.005, 0.995], n, 1 / k)
        ax.axhspan(lo, hi, color="grey", alpha=0.25, label="99% band (uniform)")
        ax.axhline(n / k, color="grey")
        ax.set_xlabel(f"rank of the true value among {num_draws} draws")
        ax.set_title(label)
    axes[0].set_ylabel("simulations")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, y=1.04)
    return fig


def latent_scatter(codes, labels, *, class_names: Sequence[str] | None = None,
                   title: str | None = "Test codes by label", ax: Axes | None = None) -> Figure:
    """2-D codes as points coloured by their integer labels.

    Args:
        codes: (N, >= 2) codes; the first two dimensions are drawn.
        labels: (N,) integer labels.
        class_names: the legend's name of each label; the label itself when None.
        title: the axis title.
        ax: the axis to draw in; a new figure when None.

    Returns:
        The figure drawn in.
    """
    codes = _numpy(codes)[:, :2]
    labels = torch.as_tensor(labels).detach().cpu().numpy()
    fig, ax = _axis(ax, (6, 5))
    for k in np.unique(labels).tolist():
        sel = labels == k
        name = class_names[k] if class_names else str(k)
        ax.scatter(codes[sel, 0], codes[sel, 1], s=4, alpha=0.6, color=plt.cm.tab10(k % 10), label=name)
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title(title)
    ax.legend(markerscale=3, fontsize=7, loc="best")
    return fig


def inference_gaps(points: Mapping, *, title: str | None = "Inference gaps per data point",
                   ax: Axes | None = None) -> Figure:
    """Histograms of the approximation and amortization gaps (nats) of each point.

    Args:
        points: the ``"points"`` dict of :func:`vi_toolkit.evaluation.inference_gaps`.
        title: the axis title.
        ax: the axis to draw in; a new figure when None.

    Returns:
        The figure drawn in.
    """
    fig, ax = _axis(ax, (6, 4))
    for key, color in (("approximation_gap", "C0"), ("amortization_gap", "C1")):
        values = np.asarray(points[key], dtype=float)
        ax.hist(values, bins=30, alpha=0.6, color=color,
                label=f"{key.replace('_', ' ')} (mean {values.mean():.3g})")
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("nats")
    ax.set_ylabel("data points")
    ax.set_title(title)
    ax.legend()
    return fig


def bar_chart(values: Mapping[str, float], *, ylabel: str, title: str | None = None,
              ax: Axes | None = None) -> Figure:
    """One bar per ``label -> value`` (e.g. seconds per epoch of several implementations).

    Args:
        values: label -> height, drawn in order.
        ylabel: the vertical axis' label.
        title: the axis title.
        ax: the axis to draw in; a new figure when None.

    Returns:
        The figure drawn in.
    """
    fig, ax = _axis(ax, (max(4, 0.9 * len(values)), 4))
    ax.bar(range(len(values)), list(values.values()), color=[f"C{i % 10}" for i in range(len(values))])
    ax.set_xticks(range(len(values)), list(values), rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return fig


def mixture_ellipses(x, locs, covariances, *, labels=None, weights=None,
                     title: str | None = "Gaussian mixture: points and 1- and 2-sigma ellipses",
                     ax: Axes | None = None) -> Figure:
    """Points (first two dimensions) coloured by ``labels``, and each component's ellipses.

    Args:
        x: (N, D) points.
        locs: (K, D) means of the fitted components.
        covariances: (K, D, D) covariances of the fitted components.
        labels: (N,) component of each point, for its colour; grey points when None.
        weights: (K,) mixture weights, written beside each mean.
        title: the axis title.
        ax: the axis to draw in; a new figure when None.

    Returns:
        The figure drawn in.
    """
    x, locs, covs = _numpy(x)[:, :2], _numpy(locs)[:, :2], _numpy(covariances)[:, :2, :2]
    fig, ax = _axis(ax, (6, 5))
    colors = "grey" if labels is None else [plt.cm.tab10(int(k) % 10) for k in np.asarray(labels)]
    ax.scatter(x[:, 0], x[:, 1], s=4, alpha=0.5, c=colors)
    t = np.linspace(0, 2 * np.pi, 100)
    circle = np.stack([np.cos(t), np.sin(t)])
    for k, (m, c) in enumerate(zip(locs, covs)):
        evals, evecs = np.linalg.eigh(c)
        for r in (1, 2):
            pts = m[:, None] + r * evecs @ (np.sqrt(np.maximum(evals, 0))[:, None] * circle)
            ax.plot(pts[0], pts[1], color=plt.cm.tab10(k % 10), lw=1.5 if r == 1 else 0.8)
        label = f"{k}" if weights is None else f"{k}: w={float(weights[k]):.2f}"
        ax.plot(*m, "k+", ms=10)
        ax.annotate(label, m, xytext=(5, 5), textcoords="offset points", fontsize=8)
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title)
    return fig


def model_selection(ks: Sequence[int], curves: Mapping[str, Sequence[float]], *, chosen: int | None = None,
                    xlabel: str = "K", title: str | None = "Choosing K", ax: Axes | None = None) -> Figure:
    """One line per criterion against the model size, with the chosen size marked.

    Args:
        ks: the model sizes tried.
        curves: criterion label -> its value (nats per point) at each of ``ks``.
        chosen: the size chosen, drawn as a dashed line.
        xlabel: the horizontal axis' label.
        title: the axis title.
        ax: the axis to draw in; a new figure when None.

    Returns:
        The figure drawn in.
    """
    fig, ax = _axis(ax, (6, 4))
    for label, values in curves.items():
        ax.plot(ks, values, "o-", label=label)
    if chosen is not None:
        ax.axvline(chosen, color="grey", linestyle="--", label=f"chosen: {chosen}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("nats / data point")
    ax.set_xticks(list(ks))
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def state_sequences(sequences, lengths, states, marginals, *, num: int = 3,
                    title: str | None = "Decoded states (Viterbi) and posterior state marginals",
                    axes: Sequence[Axes] | None = None) -> Figure:
    """For ``num`` sequences: observations coloured by decoded state, then p(z_t = k | x).

    Args:
        sequences: (N, T) or (N, T, D) observations (the first dimension is drawn), padded
            beyond ``lengths``.
        lengths: (N,) length of each sequence.
        states: (N, T) decoded states.
        marginals: (N, T, K) posterior state marginals.
        num: sequences drawn (at most N).
        title: the figure's title.
        axes: 2 * num axes, two per sequence (observations, marginals); a new column when None.

    Returns:
        The figure drawn in.
    """
    seqs = torch.as_tensor(sequences).detach().cpu()
    seqs = (seqs[..., 0] if seqs.dim() == 3 else seqs).float().numpy()
    states = torch.as_tensor(states).detach().cpu().numpy()
    marginals = torch.as_tensor(marginals).detach().cpu().numpy()
    num = min(num, len(seqs))
    created = axes is None
    fig, axes = _axes(axes, 2 * num, 2 * num, 1, (9, 2.6 * num))
    K = marginals.shape[-1]
    for i in range(num):
        T = int(lengths[i])
        t = np.arange(T)
        ax = axes[2 * i]
        ax.plot(t, seqs[i, :T], color="lightgrey", lw=0.8, zorder=0)
        ax.scatter(t, seqs[i, :T], c=[plt.cm.tab10(int(k) % 10) for k in states[i, :T]], s=10)
        ax.set_ylabel(f"seq {i}: x")
        ax.set_xlim(-0.5, T - 0.5)
        ax = axes[2 * i + 1]
        ax.stackplot(t, marginals[i, :T].T, colors=[plt.cm.tab10(k % 10) for k in range(K)],
                     labels=[f"state {k}" for k in range(K)], step="mid")
        ax.set_ylim(0, 1)
        ax.set_xlim(-0.5, T - 0.5)
        ax.set_ylabel("p(z_t | x)")
    axes[1].legend(loc="upper right", fontsize=7, ncol=K)
    axes[-1].set_xlabel("t")
    if title:
        fig.suptitle(title)
    if created:
        fig.tight_layout()
    return fig


def subspace_comparison(x, pca_axes, W, mean, *, title: str | None = "PCA and PPCA principal subspaces",
                        ax: Axes | None = None) -> Figure:
    """Data projected on the first two principal axes, with PCA's axes and PPCA's W columns.

    Args:
        x: (N, D) data.
        pca_axes: (D, >= 2) orthonormal principal directions; the first two span the plane.
        W: (D, q) fitted PPCA loadings, projected into the same plane (arrows from the mean).
        mean: (D,) the data's mean.
        title: the axis title.
        ax: the axis to draw in; a new figure when None.

    Returns:
        The figure drawn in.
    """
    x, U, W, mean = _numpy(x), _numpy(pca_axes)[:, :2], _numpy(W), _numpy(mean)
    proj = (x - mean) @ U
    scale = proj.std(0)
    fig, ax = _axis(ax, (6, 5))
    ax.scatter(proj[:, 0], proj[:, 1], s=4, alpha=0.4, color="grey", label="data")
    for j in range(2):
        end = scale[j] * np.eye(2)[j]
        ax.plot([-end[0], end[0]], [-end[1], end[1]], color="C0", lw=2,
                label="PCA axes (±1 sd)" if j == 0 else None)
    Wp = W.T @ U
    t = np.linspace(0, 2 * np.pi, 200)
    ring = np.stack([np.cos(t), np.sin(t)] + [0 * t] * (W.shape[1] - 2))[:W.shape[1]]
    ax.plot(*(Wp.T @ ring), color="C3", lw=1.5, label="PPCA: {W u : |u| = 1} (projected)")
    for j, w in enumerate(Wp):
        ax.annotate("", xy=w, xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="C3", lw=2))
        ax.annotate(f"W[:, {j}]", w, color="C3", fontsize=8)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def gap_to_bound(histories: Mapping, bound: float, *, x: str = "step",
                 title: str | None = "Gap to the maximum log-likelihood", ax: Axes | None = None) -> Figure:
    """bound - ELBO per data point (log scale) of one or more fits: how close each gets.

    Args:
        histories: a ``FitResult.history`` or a dict ``label -> history``.
        bound: the value the ELBO cannot exceed (e.g. PPCA's L_max per point).
        x: the history's key on the horizontal axis.
        title: the axis title.
        ax: the axis to draw in; a new figure when None.

    Returns:
        The figure drawn in.
    """
    if "elbo" in histories:
        histories = {"fit": histories}
    fig, ax = _axis(ax, (6, 4))
    for i, (label, h) in enumerate(histories.items()):
        gap = np.maximum(bound - np.asarray(h["elbo"], dtype=float), 1e-6)
        ax.semilogy(h[x], gap, color=f"C{i}", label=f"{label}: final {gap[-1]:.3g}")
    ax.set_xlabel(x)
    ax.set_ylabel("L_max - ELBO (nats / data point)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return fig


def scaling(xs: Sequence[float], curves: Mapping[str, Sequence[float]], *, xlabel: str,
            ylabel: str = "seconds per epoch", title: str | None = None, ax: Axes | None = None) -> Figure:
    """Log-log lines, one per ``label -> values`` in ``curves``, against ``xs``.

    Args:
        xs: the sizes measured.
        curves: label -> the measurement at each of ``xs``.
        xlabel: the horizontal axis' label.
        ylabel: the vertical axis' label.
        title: the axis title.
        ax: the axis to draw in; a new figure when None.

    Returns:
        The figure drawn in.
    """
    fig, ax = _axis(ax, (6, 4))
    for label, values in curves.items():
        ax.loglog(xs, values, "o-", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return fig
