"""examples/quickstart.ipynb runs end to end in a Jupyter kernel and prints the right posterior.

The notebook fits Bayesian linear regression with known noise, whose posterior N(m_N, S_N),
S_N^-1 = I / s0^2 + X^T X / sigma^2, m_N = S_N X^T y / sigma^2 (Bishop, PRML eq. 3.53-3.54),
and posterior predictive N(x^T m_N, sigma^2 + x^T S_N x) are computed here from the
notebook's data, independently of what the notebook prints. The notebook runs once for the
module, in a temporary folder (it writes its saved fit there); a last cell appended here
prints its data and draws as JSON.
"""

import ast
import json
import os
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "quickstart.ipynb")
PROBE = """
import json
print("PROBE", json.dumps({
    "X_train": X_train.tolist(), "y_train": y_train.tolist(), "X_test": X_test.tolist(),
    "y_test": y_test.tolist(), "noise": noise, "prior_sd": prior_sd,
    "num_rep": y_rep.shape[0], "y_rep_mean": y_rep.mean(0).tolist(), "y_rep_var": y_rep.var(0).tolist(),
    "same_params": all(torch.equal(value, loaded.params[name]) for name, value in result.params.items()),
}))
"""
FIT_TOL = 0.03  # of the fitted mean and covariance against the closed form (SVI noise)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The executed notebook: ``{"stdout": {cell id: text}, "results": {cell id: text/plain of its
    value}, "images": number of PNG figures, "probe": the appended cell's JSON, "dir": its folder}``."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE, id="probe"))
    folder = tmp_path_factory.mktemp("quickstart")
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(folder)}})
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    stdout, results, images = {}, {}, 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        stdout[cell.id] = "".join(out.text for out in cell.outputs
                                  if out.output_type == "stream" and out.name == "stdout")
        for out in cell.outputs:
            if out.output_type == "execute_result":
                results[cell.id] = out.data["text/plain"]
            elif out.output_type == "display_data" and "image/png" in out.data:
                images += 1
    probe = json.loads(stdout["probe"].split("PROBE", 1)[1])
    return {"stdout": stdout, "results": results, "images": images, "probe": probe, "dir": folder}


def printed(text, label):
    """The Python literal printed after ``label:`` at the start of a line of ``text``."""
    match = re.search("^" + re.escape(label) + r":\s*(.+)$", text, re.MULTILINE)
    assert match, f"the notebook printed no {label!r} line in:\n{text}"
    return ast.literal_eval(match.group(1).strip())


def closed_form(p):
    """(m_N, S_N, precision) of the exact posterior, from the notebook's training data."""
    X, y = np.array(p["X_train"], dtype=float), np.array(p["y_train"], dtype=float)
    precision = np.eye(X.shape[1]) / p["prior_sd"] ** 2 + X.T @ X / p["noise"] ** 2
    cov = np.linalg.inv(precision)
    return cov @ X.T @ y / p["noise"] ** 2, cov, precision


def test_the_notebook_runs_and_shows_its_figures_inline(run):
    # the ELBO curve, the predictive check's histogram, and ArviZ's posterior, pair and ppc plots
    assert run["images"] >= 5
    assert run["results"]["fit"].startswith("FitResult(")


def test_the_printed_posterior_is_the_closed_form(run):
    mean, cov, precision = closed_form(run["probe"])
    fitted_mean = np.array(printed(run["stdout"]["posterior"], "fitted posterior mean"))
    fitted_cov = np.array(printed(run["stdout"]["posterior"], "fitted posterior covariance"))
    assert np.abs(fitted_mean - mean).max() < FIT_TOL
    assert np.abs(fitted_cov - cov).max() < FIT_TOL
    # negative controls: least squares (no prior) and a mean-field Gaussian's covariance miss
    X, y = np.array(run["probe"]["X_train"]), np.array(run["probe"]["y_train"])
    assert np.abs(np.linalg.solve(X.T @ X, X.T @ y) - mean).max() > FIT_TOL
    assert np.abs(np.diag(1 / np.diag(precision)) - cov).max() > FIT_TOL


def test_the_draws_have_the_posterior_moments(run):
    mean, cov, _ = closed_form(run["probe"])
    text = run["stdout"]["sample"]
    n = printed(text, "draws")[0]
    draws_mean = np.array(printed(text, "mean of the draws"))
    draws_cov = np.array(printed(text, "covariance of the draws"))
    mean_se = np.sqrt(np.diag(cov) / n)
    cov_se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert np.all(np.abs(draws_mean - mean) < FIT_TOL + 4 * mean_se)
    assert np.all(np.abs(draws_cov - cov) < FIT_TOL + 4 * cov_se)


def test_the_predictive_draws_are_the_exact_posterior_predictive(run):
    p = run["probe"]
    mean, cov, _ = closed_form(p)
    X = np.array(p["X_test"])
    exact_mean = X @ mean
    exact_var = p["noise"] ** 2 + np.einsum("id,de,ie->i", X, cov, X)
    rep_mean, rep_var = np.array(p["y_rep_mean"]), np.array(p["y_rep_var"])
    # each point's mean within the fit's tolerance on w plus 4 Monte Carlo standard errors
    bound = FIT_TOL * np.abs(X).sum(1) + 4 * np.sqrt(exact_var / p["num_rep"])
    assert np.all(np.abs(rep_mean - exact_mean) < bound)
    # the predictive variance carries the posterior's, x^T S_N x, beside the noise
    assert abs(rep_var.mean() - exact_var.mean()) < 0.05
    # negative controls: least squares' predictions, and the noise alone as the variance
    Xtr, ytr = np.array(p["X_train"]), np.array(p["y_train"])
    ols = np.linalg.solve(Xtr.T @ Xtr, Xtr.T @ ytr)
    assert np.any(np.abs(X @ ols - exact_mean) > bound)
    assert abs(p["noise"] ** 2 - exact_var.mean()) > 0.05


def test_the_held_out_evaluation_is_the_exact_predictive_density(run):
    p = run["probe"]
    mean, cov, _ = closed_form(p)
    X, y, s2 = np.array(p["X_test"]), np.array(p["y_test"]), p["noise"] ** 2
    mu, spread = X @ mean, np.einsum("id,de,ie->i", X, cov, X)
    # log N(y; x^T m_N, s2 + x^T S_N x), which IWAE estimates for a global latent, and
    # E_q[log N(y; x^T w, s2)], the ELBO of a held-out point
    predictive = np.mean(-0.5 * np.log(2 * np.pi * (s2 + spread)) - (y - mu) ** 2 / (2 * (s2 + spread)))
    expected = np.mean(-0.5 * np.log(2 * np.pi * s2) - ((y - mu) ** 2 + spread) / (2 * s2))
    report = ast.literal_eval(run["results"]["evaluate"])
    assert report["num_data"] == len(y)
    assert abs(report["iwae"] - predictive) < 0.01
    assert abs(report["elbo"] - expected) < 0.01
    # negative control: the ELBO is a bound, not the predictive density
    assert abs(report["elbo"] - predictive) > 0.01
    assert printed(run["stdout"]["evaluate"], "exact predictive log density per point") == pytest.approx(
        predictive, abs=1e-3)


def test_the_loaded_fit_gives_the_same_draws_and_evaluation(run):
    assert os.path.isfile(run["dir"] / "quickstart_fit.pt")
    notes = run["stdout"]["save"]
    assert "pass model=... to vi_toolkit.load" in notes and "pass guide=... to vi_toolkit.load" in notes
    assert run["probe"]["same_params"]
    assert printed(run["stdout"]["compare"], "same draws") is True
    assert ast.literal_eval(run["results"]["compare"]) == ast.literal_eval(run["results"]["evaluate"])
