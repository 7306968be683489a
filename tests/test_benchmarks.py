"""Smoke tests of the benchmarks' quick modes: each runs, writes its outputs, and does equal work.

No timing is asserted: the figures are the benchmarks' to report, not the tests' to check.
"""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_quick(tmp_path, load_main, keep_threads, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # benchmarks import each other

    def run(script, *figures, args=()):
        metrics = load_main(f"benchmarks/{script}")(["--quick", "--out", str(tmp_path), "--device", "cpu", *args])
        for name in figures + ("metrics.json",):
            assert (tmp_path / name).stat().st_size > 0, name
        with open(tmp_path / "metrics.json") as f:
            assert json.load(f).keys() == metrics.keys()
        return metrics

    return run


def test_classic_models_reach_the_references_log_likelihood(run_quick):
    pytest.importorskip("hmmlearn")
    metrics = run_quick("classic_models.py", "seconds_to_target.png")
    rows = {row["model"].split(" ")[0]: row for row in metrics["rows"]}
    assert set(rows) == {"GMM", "HMM", "PPCA"}
    for name in ("GMM", "HMM"):  # L-BFGS on the exact marginal gets to EM's optimum
        row = rows[name]
        assert row["toolkit_seconds_to_target"] is not None, name
        assert row["toolkit_final_loglik"] >= row["target_loglik"]
        assert row["reference_seconds_to_target"] is not None, name


def test_iwae_throughput_estimates_agree_with_hand_written_pytorch(run_quick):
    metrics = run_quick("iwae_throughput.py", "iwae_throughput.png")
    assert abs(metrics["difference_in_standard_errors"]) < 4  # the same estimator, other draws
    assert metrics["best_toolkit_samples_per_second"] > 0


def test_scaling_sweeps_points_and_widths(run_quick):
    metrics = run_quick("scaling.py", "scaling_points.png", "scaling_width.png")
    assert len(metrics["fit_seconds_by_points"]) == len(metrics["sizes"])
    assert len(metrics["pyro_loop_seconds_by_width"]) == len(metrics["widths"])
    assert all(seconds > 0 for seconds in metrics["fit_seconds_by_points"] + metrics["fit_seconds_by_width"])


def test_gradient_estimators_stl_lowers_the_variance_and_dreg_keeps_the_encoder_snr(run_quick):
    metrics = run_quick("gradient_estimators.py", "snr.png", "elbo_curves.png")
    for fitted in ("trace", "stl"):  # the score term is noise wherever q is near the posterior
        assert metrics[f"stl_grad_variance_at_{fitted}_fit"] < metrics[f"trace_grad_variance_at_{fitted}_fit"]
    assert metrics["iwae-dreg_snr_k100"] > metrics["iwae_snr_k100"]
    assert metrics["iwae_snr_k100"] < metrics["iwae_snr_k1"]  # Rainforth et al.'s decay with K


def test_small_models_do_equal_work_and_quick_waits_on_no_compiler(run_quick):
    """The MAP mixture's objective is deterministic: fit, Pyro's loop and NumPyro, from the same
    k-means start, reach the same -ELBO, also in a repeated run (--repeats: the start is drawn
    again, not found in the parameter store); --quick leaves out the compiled step."""
    pytest.importorskip("numpyro")
    metrics = run_quick("small_models.py", "ms_per_step.png", args=("--models", "gmm", "--repeats", "2"))
    assert len(metrics["gmm_numpyro_ms_per_step_runs"]) == 2
    reference = metrics["gmm_numpyro_neg_elbo"]
    for impl in ("fit", "pyro_SVI"):
        assert metrics[f"gmm_{impl}_neg_elbo"] == pytest.approx(reference, rel=1e-4), impl
        assert metrics[f"gmm_{impl}_ms_per_step"] > 0
    assert not any(key.startswith("gmm_fit_compiled") for key in metrics)
