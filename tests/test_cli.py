"""The command line: help, the demo's exact-posterior sections, one-line errors, and
``vi-toolkit evaluate`` on saved fits, with the classic models' exact marginal beside the
estimates (against the hand-written references of test_evaluation)."""

import re
import subprocess
import sys

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from test_evaluation import (D, Q, gmm_data, gmm_log_joint, hmm_data, np_hmm_log_likelihood, ppca_data,
                             ppca_exact)

from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.recipes import fit_gmm
from vi_toolkit.recipes import fit_hmm
from vi_toolkit.guides.ppca import LinearEncoder
from vi_toolkit.models import conjugate
from vi_toolkit.models.gmm import GaussianMixture
from vi_toolkit.models.hmm import HiddenMarkovModel
from vi_toolkit.models.ppca import PPCA
from vi_toolkit import fit
from vi_toolkit.cli import main
from vi_toolkit.demo import SECTIONS
from vi_toolkit.cli import evaluate_checkpoint, load_data_file


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "vi_toolkit", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "usage: vi-toolkit" in out and "demo" in out


def test_bad_input_is_one_line_not_a_traceback(capsys, tmp_path):
    assert main(["demo", "--device", "tpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vi-toolkit demo: error: unknown device 'tpu'") and "Traceback" not in err


def test_demo_sections_agree_with_the_closed_forms():
    for section in SECTIONS:
        title, rows = section(seed=0, device="cpu", quick=True)
        for name, fitted, exact in rows:
            tolerance = 0.1 if name.startswith("corr") else 0.05 * max(abs(exact), 0.1)
            assert abs(fitted - exact) < tolerance, (title, name, fitted, exact)


def test_evaluate_prints_the_heldout_estimates_of_a_checkpoint(tmp_path, capsys):
    x = 3.0 + torch.randn(40, generator=torch.Generator().manual_seed(0))
    fit(conjugate.model, conjugate_guide.guide, x, elbo="meanfield", num_steps=200, lr=0.1,
        progress=False, seed=0, checkpoint=tmp_path / "fit.pt")
    torch.save(x, tmp_path / "x.pt")
    argv = ["evaluate", str(tmp_path / "fit.pt"), "--model", "vi_toolkit.models.conjugate:model",
            "--guide", "vi_toolkit.guides.conjugate:guide", "--model-kwargs", '{"prior_scale": 10.0}',
            "--data", str(tmp_path / "x.pt"), "--num-samples", "300", "--khat-samples", "500",
            "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = evaluate_checkpoint(tmp_path / "fit.pt", conjugate.model, conjugate_guide.guide, x,
                                 num_samples=300, khat_samples=500, device="cpu", seed=0)
    assert f"{report['iwae']:.6g}" in out and f"{report['elbo']:.6g}" in out
    assert "PSIS k-hat (joint)" in out and report["reading"] == "good"
    assert "exact" not in out  # a model function has no exact log-likelihood
    # the predictive density of a new point under q(mu) ~ N(x_bar, 1/N): N(x_bar, 1 + 1/N)
    mean, sd = conjugate.posterior(x)
    exact = dist.Normal(mean, (1 + sd**2) ** 0.5).log_prob(x).mean()
    assert abs(report["iwae"] - float(exact)) < 0.01
    assert main(argv[:3] + ["no_such_module:model"] + argv[4:]) == 2
    assert "cannot import 'no_such_module'" in capsys.readouterr().err


def gmm_case(tmp_path):
    """A MAP fit of models/gmm.py; its exact held-out log-likelihood, by hand."""
    mixture = GaussianMixture(3, 2)
    result, guide = fit_gmm(mixture, gmm_data(150), checkpoint=tmp_path / "fit.pt")
    x = gmm_data(60, seed=1)
    exact = gmm_log_joint(x, guide.point_estimate(result)).logsumexp(-1)
    return x, ["vi_toolkit.models.gmm:GaussianMixture", '{"K": 3, "D": 2}', "vi_toolkit.guides.gmm:MAPGuide"], exact


def hmm_case(tmp_path):
    """A MAP fit of models/hmm.py on padded sequences; the numpy forward algorithm."""
    sequences, lengths = hmm_data(30)
    result, guide = fit_hmm(HiddenMarkovModel(3), sequences, lengths, checkpoint=tmp_path / "fit.pt")
    data = hmm_data(10, seed=1)
    exact = torch.from_numpy(np_hmm_log_likelihood(*data, guide.point_estimate(result)))
    return data, ["vi_toolkit.models.hmm:HiddenMarkovModel", '{"K": 3}', "vi_toolkit.guides.hmm:MAPGuide"], exact


def ppca_case(tmp_path):
    """A short fit of models/ppca.py with its linear encoder; log N(x | mu, W W^T + s^2 I), by hand."""
    ppca = PPCA(D, Q)
    result = fit(ppca.model, LinearEncoder(ppca), ppca_data(), num_steps=100, lr=0.05,
                 progress=False, seed=0, checkpoint=tmp_path / "fit.pt")
    x = ppca_data(50, seed=1)
    exact = torch.from_numpy(ppca_exact(result.params, x)[0])
    return x, ["vi_toolkit.models.ppca:PPCA", f'{{"D": {D}, "q": {Q}}}', "vi_toolkit.guides.ppca:LinearEncoder"], exact


def printed(out, label):
    """The number printed after ``label``."""
    return float(re.search(rf"{re.escape(label)}\s+(\S+)", out).group(1))


@pytest.mark.parametrize("case", [gmm_case, hmm_case, ppca_case])
def test_evaluate_prints_the_exact_marginal_of_a_classic_model(case, tmp_path, capsys):
    data, (model, model_kwargs, guide), exact = case(tmp_path)
    torch.save(data, tmp_path / "data.pt")
    argv = ["evaluate", str(tmp_path / "fit.pt"), "--model", model, "--model-kwargs", model_kwargs,
            "--guide", guide, "--data", str(tmp_path / "data.pt"), "--num-samples", "1000",
            "--khat-samples", "100", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert printed(out, "exact log-likelihood / point") == pytest.approx(float(exact.mean()), abs=2e-4)
    assert abs(printed(out, "exact - IWAE")) < 0.01  # exact for the MAP guides, Monte Carlo for PPCA
    argv[argv.index(guide)] = "vi_toolkit.guides.conjugate:guide"  # a function cannot take the model
    assert main(argv) == 2
    assert "--guide: vi_toolkit.guides.conjugate:guide is a function" in capsys.readouterr().err


def test_a_data_file_that_is_not_numbers_is_named_in_one_line(tmp_path, capsys):
    """Issue 12, item 16: an object array (never unpickled) or an array of strings, in a .npy or an
    .npz file, is one line naming the file (and the array), not numpy's message alone."""
    np.save(tmp_path / "objects.npy", np.array([1.0, "a", None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "strings.npy", np.array(["1.0", "2.0"]))
    np.savez(tmp_path / "mixed.npz", x=np.ones(3), labels=np.array([1, "b", None], dtype=object))
    expected = {"objects.npy": "is not a numeric array (Object arrays cannot be loaded",
                "strings.npy": "holds dtype <U3, not numbers",
                "mixed.npz": "array 'labels', is not a numeric array"}
    for name, message in expected.items():
        path = str(tmp_path / name)
        argv = ["evaluate", str(tmp_path / "fit.pt"), "--model", "vi_toolkit.models.conjugate:model",
                "--guide", "vi_toolkit.guides.conjugate:guide", "--data", path, "--device", "cpu"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vi-toolkit evaluate: error: data file {path!r}") and message in err
        assert err.count("\n") == 1
    np.savez(tmp_path / "numbers.npz", x=np.ones(3), lengths=np.arange(3))  # numbers still load
    loaded = load_data_file(tmp_path / "numbers.npz")
    assert loaded["lengths"].dtype.kind == "i" and np.array_equal(loaded["x"], np.ones(3))
