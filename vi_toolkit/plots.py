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
            ax.imshow((img.permute(1, 2, 0).clamp(0, 1) if img.dim() == 3 else img).numpy(),
                      cmap="gray", vmin=0, vmax=1)
    if row_labels:
        for r, label in enumerate(row_labels[:rows]):
            axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def _figure_of(axes):
    return np.asarray(axes).flat[0].get_figure()


def posterior_densities(idata, path, *, var_names=None, title=None):
    """Marginal posterior densities with 94% HDIs, by ArviZ's ``plot_posterior``."""
    import arviz as az

    axes = az.plot_posterior(idata, var_names=var_names, show=False)
    fig = _figure_of(axes)
    if title:
        fig.suptitle(title, y=1.04)
    return save(fig, path)


def posterior_predictive(idata, path, *, var_names=None, num_pp_samples=50, title=None):
    """Observed data against draws of the posterior predictive, by ArviZ's ``plot_ppc``."""
    import arviz as az

    axes = az.plot_ppc(idata, var_names=var_names, num_pp_samples=num_pp_samples, show=False)
    fig = _figure_of(axes)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def khat_histogram(khats, path, *, title="PSIS k-hat per data point"):
    """Histogram of k-hat values with the 0.5 (good) and 0.7 (unreliable) thresholds."""
    khats = np.asarray(khats, dtype=float).ravel()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(khats[np.isfinite(khats)], bins=30, color="C0", alpha=0.8)
    for value, label, color in ((0.5, "0.5: good below", "C2"), (0.7, "0.7: unreliable above", "C3")):
        ax.axvline(value, color=color, linestyle="--", label=label)
    ax.set_xlabel("k-hat")
    ax.set_ylabel("data points")
    ax.set_title(title)
    ax.legend()
    return save(fig, path)


def sbc_ranks(ranks, num_draws, path, *, bins=None, title="Simulation-based calibration"):
    """Rank histograms, one per scalar latent, with the 99% band of a uniform histogram.

    ``ranks`` maps a site name to an integer array (simulations, components) of ranks
    in {0, ..., num_draws}; a calibrated posterior gives flat histograms inside the band.
    """
    from scipy import stats

    ranks = {name: np.asarray(r).reshape(len(r), -1) for name, r in ranks.items()}
    panels = [(f"{name}[{c}]" if r.shape[1] > 1 else name, r[:, c])
              for name, r in ranks.items() for c in range(r.shape[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (label, r) in zip(axes[0], panels):
        n = len(r)
        k = bins or max(2, min(num_draws + 1, n // 5))
        ax.hist(r, bins=k, range=(-0.5, num_draws + 0.5), color="C0", alpha=0.8)
        lo, hi = stats.binom.ppf([0.005, 0.995], n, 1 / k)
        ax.axhspan(lo, hi, color="grey", alpha=0.25, label="99% band (uniform)")
        ax.axhline(n / k, color="grey")
        ax.set_xlabel(f"rank of the true value among {num_draws} draws")
        ax.set_title(label)
    axes[0, 0].set_ylabel("simulations")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, y=1.04)
    return save(fig, path)


def latent_scatter(codes, labels, path, *, class_names=None, title="Test codes by label"):
    """2-D codes (N, 2) as points coloured by their integer ``labels``."""
    codes = torch.as_tensor(codes).detach().cpu()[:, :2].numpy()
    labels = torch.as_tensor(labels).detach().cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    for k in np.unique(labels).tolist():
        sel = labels == k
        name = class_names[k] if class_names else str(k)
        ax.scatter(codes[sel, 0], codes[sel, 1], s=4, alpha=0.6, color=plt.cm.tab10(k % 10), label=name)
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title(title)
    ax.legend(markerscale=3, fontsize=7, loc="best")
    return save(fig, path)


def animated_gif(frames, path, *, duration_ms=80, scale=4):
    """Images (T, H, W) or (T, 1, H, W) in [0, 1] as a looping animated GIF, each pixel ``scale``-fold."""
    from PIL import Image

    frames = torch.as_tensor(frames).detach().float().cpu()
    if frames.dim() == 4:
        frames = frames[:, 0]
    pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
              for f in pixels]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path


def inference_gaps(points, path, *, title="Inference gaps per data point"):
    """Histograms of the approximation and amortization gaps (nats) of each point.

    ``points`` is the ``"points"`` dict of :func:`vi_toolkit.evaluation.inference_gaps`.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, color in (("approximation_gap", "C0"), ("amortization_gap", "C1")):
        values = np.asarray(points[key], dtype=float)
        ax.hist(values, bins=30, alpha=0.6, color=color,
                label=f"{key.replace('_', ' ')} (mean {values.mean():.3g})")
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("nats")
    ax.set_ylabel("data points")
    ax.set_title(title)
    ax.legend()
    return save(fig, path)


def bar_chart(values, path, *, ylabel, title=None):
    """One bar per ``label -> value`` (e.g. seconds per epoch of several implementations)."""
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(values)), 4))
    ax.bar(range(len(values)), list(values.values()), color=[f"C{i % 10}" for i in range(len(values))])
    ax.set_xticks(range(len(values)), list(values), rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def mixture_ellipses(x, locs, covariances, path, *, labels=None, weights=None,
                     title="Gaussian mixture: points and 1- and 2-sigma ellipses"):
    """Points (first two dimensions) coloured by ``labels``, each component's ellipses.

    ``locs`` (K, D) and ``covariances`` (K, D, D) of the fitted components.
    """
    x = np.asarray(torch.as_tensor(x).detach().cpu())[:, :2]
    locs = np.asarray(torch.as_tensor(locs).detach().cpu())[:, :2]
    covs = np.asarray(torch.as_tensor(covariances).detach().cpu())[:, :2, :2]
    fig, ax = plt.subplots(figsize=(6, 5))
    colors = None if labels is None else [plt.cm.tab10(int(k) % 10) for k in np.asarray(labels)]
    ax.scatter(x[:, 0], x[:, 1], s=4, alpha=0.5, c=colors if colors is not None else "grey")
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
    return save(fig, path)


def model_selection(ks, curves, path, *, chosen=None, xlabel="K", title="Choosing K"):
    """One line per criterion in ``curves`` (label -> values per k, nats per point) against ``ks``."""
    fig, ax = plt.subplots(figsize=(6, 4))
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
    return save(fig, path)


def state_sequences(sequences, lengths, states, marginals, path, *, num=3,
                    title="Decoded states (Viterbi) and posterior state marginals"):
    """For ``num`` sequences: observations coloured by decoded state, then p(z_t = k | x).

    ``sequences`` (N, T) or (N, T, D) (the first dimension is drawn), ``states`` (N, T)
    and ``marginals`` (N, T, K), padded beyond ``lengths``.
    """
    seqs = torch.as_tensor(sequences).detach().cpu()
    seqs = (seqs[..., 0] if seqs.dim() == 3 else seqs).float().numpy()
    states = torch.as_tensor(states).detach().cpu().numpy()
    marginals = torch.as_tensor(marginals).detach().cpu().numpy()
    num = min(num, len(seqs))
    fig, axes = plt.subplots(2 * num, 1, figsize=(9, 2.6 * num), squeeze=False)
    K = marginals.shape[-1]
    for i in range(num):
        T = int(lengths[i])
        t = np.arange(T)
        ax = axes[2 * i, 0]
        ax.plot(t, seqs[i, :T], color="lightgrey", lw=0.8, zorder=0)
        ax.scatter(t, seqs[i, :T], c=[plt.cm.tab10(int(k) % 10) for k in states[i, :T]], s=10)
        ax.set_ylabel(f"seq {i}: x")
        ax.set_xlim(-0.5, T - 0.5)
        ax = axes[2 * i + 1, 0]
        ax.stackplot(t, marginals[i, :T].T, colors=[plt.cm.tab10(k % 10) for k in range(K)],
                     labels=[f"state {k}" for k in range(K)], step="mid")
        ax.set_ylim(0, 1)
        ax.set_xlim(-0.5, T - 0.5)
        ax.set_ylabel("p(z_t | x)")
    axes[1, 0].legend(loc="upper right", fontsize=7, ncol=K)
    axes[-1, 0].set_xlabel("t")
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def subspace_comparison(x, pca_axes, W, mean, path, *, title="PCA and PPCA principal subspaces"):
    """Data projected on the first two principal axes, with PCA's axes and PPCA's W columns.

    ``pca_axes`` (D, 2) orthonormal principal directions; ``W`` (D, q) the fitted PPCA
    loadings, projected into the same plane (arrows from the mean).
    """
    as_np = lambda t: np.asarray(torch.as_tensor(t).detach().cpu(), dtype=float)  # noqa: E731
    x, U, W, mean = as_np(x), as_np(pca_axes)[:, :2], as_np(W), as_np(mean)
    proj = (x - mean) @ U
    scale = proj.std(0)
    fig, ax = plt.subplots(figsize=(6, 5))
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
    return save(fig, path)


def gap_to_bound(histories, bound, path, *, x="step", title="Gap to the maximum log-likelihood"):
    """bound - ELBO per data point (log scale) of one or more fits: how close each gets."""
    if "elbo" in histories:
        histories = {"fit": histories}
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, h) in enumerate(histories.items()):
        gap = np.maximum(bound - np.asarray(h["elbo"], dtype=float), 1e-6)
        ax.semilogy(h[x], gap, color=f"C{i}", label=f"{label}: final {gap[-1]:.3g}")
    ax.set_xlabel(x)
    ax.set_ylabel("L_max - ELBO (nats / data point)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return save(fig, path)


def scaling(xs, curves, path, *, xlabel, ylabel="seconds per epoch", title=None):
    """Log-log lines, one per ``label -> values`` in ``curves``, against ``xs``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in curves.items():
        ax.loglog(xs, values, "o-", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return save(fig, path)
