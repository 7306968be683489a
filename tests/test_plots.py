"""Plots for notebooks and scripts: importing the toolkit leaves matplotlib's backend alone, every
plot returns its Figure and draws into the axes it is given, the figures show their data
(checked against scikit-learn's PCA, Mahalanobis distances and NumPy histograms), and the
scripts' savers write readable PNG and GIF files."""

import inspect
import math
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from vi_toolkit import plots
from vi_toolkit.scripts import save_figure, save_gif

az = pytest.importorskip("arviz")

RNG = np.random.default_rng(0)
HISTORY = {"step": [1, 2, 3, 4], "elbo": [-3.0, -2.0, -1.5, -1.4], "val_elbo": [-3.1, -2.2, -1.7, -1.6]}
IMAGES = torch.rand(10, 1, 4, 5, generator=torch.Generator().manual_seed(0))
KHATS = np.concatenate([np.linspace(-0.2, 1.2, 50), [np.inf]])
LOCS = np.array([[0.0, 0.0], [4.0, 1.0]])
COVS = np.array([[[2.0, 0.8], [0.8, 1.0]], [[0.5, -0.2], [-0.2, 0.3]]])
X2 = RNG.normal(size=(40, 2))
X3 = RNG.normal(size=(40, 3)) @ np.array([[3.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.5, 0.2]])
PCA_AXES = np.linalg.eigh(np.cov(X3.T))[1][:, ::-1].copy()
W = np.array([[2.0, 0.0], [1.0, 0.5], [0.0, 0.1]])
MARGINALS = RNG.dirichlet(np.ones(2), size=(3, 6))
IDATA = az.from_dict(posterior={"mu": RNG.normal(size=(1, 50))},
                     posterior_predictive={"x": RNG.normal(size=(1, 50, 20))},
                     observed_data={"x": RNG.normal(size=20)})

# name -> (draw(**axis keyword) -> Figure, panels, axis keyword)
CASES = {
    "elbo_curves": (lambda **kw: plots.elbo_curves(HISTORY, **kw), 1, "ax"),
    "image_grid": (lambda **kw: plots.image_grid(IMAGES, nrow=4, row_labels=["a", "b"], **kw), 1, "ax"),
    "posterior_densities": (lambda **kw: plots.posterior_densities(IDATA, var_names=["mu"], **kw), 1, "axes"),
    "posterior_predictive": (lambda **kw: plots.posterior_predictive(IDATA, num_pp_samples=5, **kw), 1, "axes"),
    "khat_histogram": (lambda **kw: plots.khat_histogram(KHATS, **kw), 1, "ax"),
    "sbc_ranks": (lambda **kw: plots.sbc_ranks({"mu": RNG.integers(0, 100, (40, 1)),
                                                "w": RNG.integers(0, 100, (40, 2))}, 99, **kw), 3, "axes"),
    "latent_scatter": (lambda **kw: plots.latent_scatter(X2, np.arange(40) % 3, **kw), 1, "ax"),
    "inference_gaps": (lambda **kw: plots.inference_gaps({"approximation_gap": RNG.random(20),
                                                          "amortization_gap": RNG.random(20)}, **kw), 1, "ax"),
    "bar_chart": (lambda **kw: plots.bar_chart({"fit": 1.0, "loop": 2.5}, ylabel="s", **kw), 1, "ax"),
    "mixture_ellipses": (lambda **kw: plots.mixture_ellipses(X2, LOCS, COVS, labels=np.arange(40) % 2,
                                                             weights=[0.4, 0.6], **kw), 1, "ax"),
    "model_selection": (lambda **kw: plots.model_selection([1, 2, 3], {"held out": [-3, -2, -2.1]},
                                                           chosen=2, **kw), 1, "ax"),
    "state_sequences": (lambda **kw: plots.state_sequences(RNG.normal(size=(3, 6)), [6, 5, 4],
                                                           RNG.integers(0, 2, (3, 6)), MARGINALS, num=2, **kw),
                        4, "axes"),
    "subspace_comparison": (lambda **kw: plots.subspace_comparison(X3, PCA_AXES[:, :2], W, X3.mean(0), **kw),
                            1, "ax"),
    "gap_to_bound": (lambda **kw: plots.gap_to_bound(HISTORY, -1.0, **kw), 1, "ax"),
    "scaling": (lambda **kw: plots.scaling([10, 100], {"fit": [0.1, 1.0]}, xlabel="N", **kw), 1, "ax"),
}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def drawn(ax):
    """Whether anything was drawn in ``ax`` (lines, markers, bars, images, bands)."""
    return bool(ax.lines or ax.collections or ax.patches or ax.images)


def test_importing_the_toolkit_leaves_the_backend_alone_and_scripts_choose_agg():
    """Every module of the package (models and guides included) imports under a non-Agg
    backend without switching it; building a script's parser then switches to Agg, which
    shows that the check sees a switch."""
    code = """
import importlib, pkgutil
import matplotlib
import vi_toolkit, vi_toolkit.guides, vi_toolkit.models, vi_toolkit.plots
for package in (vi_toolkit, vi_toolkit.models, vi_toolkit.guides):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
print(matplotlib.get_backend())
from vi_toolkit.scripts import script_parser
script_parser("a script", "out")
print(matplotlib.get_backend())
"""
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, MPLBACKEND="svg"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.lower() for line in proc.stdout.split()] == ["svg", "agg"]


def test_every_public_plot_is_covered():
    public = {name for name, fn in inspect.getmembers(plots, inspect.isfunction)
              if not name.startswith("_") and fn.__module__ == plots.__name__}
    assert public == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_plot_returns_its_figure(name):
    draw, panels, _ = CASES[name]
    before = set(plt.get_fignums())
    fig = draw()
    assert isinstance(fig, Figure)
    assert set(plt.get_fignums()) - before == {fig.number}  # one new figure, the one returned
    assert sum(drawn(ax) for ax in fig.axes) >= panels


@pytest.mark.parametrize("name", sorted(CASES))
def test_ax_draws_into_the_given_axes(name):
    draw, panels, keyword = CASES[name]
    fig, grid = plt.subplots(1, panels + 1)
    before = set(plt.get_fignums())
    given = grid[1:] if keyword == "axes" else grid[1]
    assert draw(**{keyword: given}) is fig
    assert set(plt.get_fignums()) == before  # no figure of its own
    assert not drawn(grid[0]) and all(drawn(ax) for ax in grid[1:])


def test_wrong_axes_are_value_errors_naming_them():
    fig, grid = plt.subplots(1, 2)
    with pytest.raises(ValueError, match="ax must be a matplotlib Axes"):
        plots.elbo_curves(HISTORY, ax=fig)
    with pytest.raises(ValueError, match="axes must be 4 matplotlib Axes"):
        CASES["state_sequences"][0](axes=grid)
    with pytest.raises(ValueError, match="images must be"):
        plots.image_grid(torch.rand(4, 2, 3, 3))


def test_curves_show_the_history():
    ax = plots.elbo_curves(HISTORY).axes[0]
    train, held_out = ax.lines
    np.testing.assert_array_equal(train.get_ydata(), HISTORY["elbo"])
    np.testing.assert_array_equal(held_out.get_ydata(), HISTORY["val_elbo"])
    assert held_out.get_linestyle() == "--"
    (gap,) = plots.gap_to_bound(HISTORY, -1.0).axes[0].lines
    np.testing.assert_allclose(gap.get_ydata(), -1.0 - np.array(HISTORY["elbo"]))


def test_image_grid_tiles_the_images_row_by_row_with_white_gaps():
    ax = plots.image_grid(IMAGES, nrow=4, row_labels=["first", "second"]).axes[0]
    canvas = np.asarray(ax.images[0].get_array())
    h, w = 4, 5
    assert canvas.shape == (3 * (h + 1) + 1, 4 * (w + 1) + 1)  # 10 images in rows of 4
    for i, img in enumerate(IMAGES[:, 0].numpy()):
        r, c = divmod(i, 4)
        np.testing.assert_array_equal(canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w],
                                      img)
    assert (canvas[0] == 1).all() and (canvas[:, 0] == 1).all() and (canvas[-h - 1:, -w - 1:] == 1).all()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["first", "second", ""]


def test_mixture_ellipses_are_the_one_and_two_sigma_contours():
    """(p - m)^T S^-1 (p - m) = r^2 on the r-sigma ellipse of each component; the other
    component's covariance (a wrong one) does not give it."""
    lines = plots.mixture_ellipses(X2, LOCS, COVS).axes[0].lines
    ellipses = [line for line in lines if len(line.get_xdata()) > 1]
    assert len(ellipses) == 4
    for i, line in enumerate(ellipses):
        k, r = divmod(i, 2)
        d = np.column_stack([line.get_xdata(), line.get_ydata()]) - LOCS[k]
        np.testing.assert_allclose(np.einsum("ni,ij,nj->n", d, np.linalg.inv(COVS[k]), d), (r + 1) ** 2,
                                   rtol=1e-9)
        wrong = np.einsum("ni,ij,nj->n", d, np.linalg.inv(COVS[1 - k]), d)
        assert np.abs(wrong - (r + 1) ** 2).max() > 0.5


def test_subspace_comparison_projects_the_data_like_scikit_learns_pca():
    from sklearn.decomposition import PCA

    ax = plots.subspace_comparison(X3, PCA_AXES[:, :2], W, X3.mean(0)).axes[0]
    proj = np.asarray(ax.collections[0].get_offsets())
    reference = PCA(2).fit_transform(X3)
    signs = np.sign((proj * reference).sum(0))  # principal directions are defined up to sign
    np.testing.assert_allclose(proj, reference * signs, atol=1e-9)
    # PPCA's ring is {U^T W u : |u| = 1}: map its points back to u
    ring = next(line for line in ax.lines if len(line.get_xdata()) == 200)
    u = np.linalg.solve(PCA_AXES[:, :2].T @ W, np.vstack([ring.get_xdata(), ring.get_ydata()]))
    np.testing.assert_allclose(np.linalg.norm(u, axis=0), 1.0, rtol=1e-9)


def test_khat_histogram_counts_the_finite_values_and_marks_the_thresholds():
    ax = plots.khat_histogram(KHATS).axes[0]
    counts, _ = np.histogram(KHATS[np.isfinite(KHATS)], bins=30)
    np.testing.assert_array_equal([bar.get_height() for bar in ax.patches], counts)
    assert sorted(line.get_xdata()[0] for line in ax.lines) == [0.5, 0.7]


def test_sbc_band_is_the_central_99_percent_of_a_uniform_bin_count():
    ranks = RNG.integers(0, 100, (40, 1))
    ax = plots.sbc_ranks({"mu": ranks}, 99, bins=8).axes[0]
    counts, _ = np.histogram(ranks, bins=8, range=(-0.5, 99.5))
    *bars, band = ax.patches  # the histogram's bars, then the band
    np.testing.assert_array_equal([bar.get_height() for bar in bars], counts)
    # Binomial(40, 1/8) quantiles by summing its probabilities
    cdf = np.cumsum([math.comb(40, k) * (1 / 8) ** k * (7 / 8) ** (40 - k) for k in range(41)])
    lo, hi = np.searchsorted(cdf, 0.005), np.searchsorted(cdf, 0.995)
    assert (band.get_y(), band.get_y() + band.get_height()) == (lo, hi)


def test_save_figure_writes_a_readable_png_and_closes_the_figure(tmp_path):
    fig = plots.bar_chart({"a": 1.0, "b": 3.0}, ylabel="s")
    path = save_figure(fig, str(tmp_path / "figures"), "bars")
    assert path == str(tmp_path / "figures" / "bars.png")
    assert fig.number not in plt.get_fignums()
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > 100 and png.height > 100
        pixels = np.asarray(png.convert("L"))
    assert pixels.min() < 100 and pixels.max() == 255  # dark ink on a white background
    for bad in ("bars.png", "sub/bars", ""):
        with pytest.raises(ValueError, match="name must be a file name"):
            save_figure(plots.bar_chart({"a": 1.0}, ylabel="s"), str(tmp_path), bad)
    with pytest.raises(ValueError, match="fig must be a matplotlib Figure"):
        save_figure(plt.subplots()[1], str(tmp_path), "axis")


def test_save_gif_writes_every_frame_scaled(tmp_path):
    frames = torch.rand(3, 1, 4, 5, generator=torch.Generator().manual_seed(1))
    path = save_gif(frames, str(tmp_path), "walk", scale=2)
    assert path == str(tmp_path / "walk.gif")
    expected = (frames[:, 0] * 255).round().to(torch.uint8).numpy().repeat(2, 1).repeat(2, 2)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 3 and gif.size == (10, 8)
        for t in range(3):
            gif.seek(t)
            np.testing.assert_array_equal(np.asarray(gif.convert("L")), expected[t])
    with pytest.raises(ValueError, match="frames must be"):
        save_gif(torch.rand(4, 5), str(tmp_path), "flat")
