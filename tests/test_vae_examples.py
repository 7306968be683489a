"""Smoke tests: each auto-encoder / VAE example script runs with --quick and writes its outputs."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPTS = {
    "examples/autoencoders.py": ["linear_ae_vs_pca.png", "reconstructions.png", "interpolation.png"],
    "examples/denoising.py": ["denoise_gaussian.png", "denoise_mask.png", "denoise_salt_pepper.png",
                              "ambiguous.png"],
    "examples/latent_sampling.py": ["samples.png"],
    "examples/vae_kl.py": ["elbo_curves.png", "samples_meanfield.png", "samples_trace.png"],
    "examples/kingma_welling.py": ["lower_bound_vs_samples.png", "manifold_2d.png", "test_codes_2d.png",
                                   "samples.png"],
    "examples/latent_walk.py": ["latent_walk.gif", "latent_walk.png"],
    "benchmarks/vae_vs_pyro_loop.py": ["train_elbo.png"],
    "benchmarks/vae_speed.py": ["seconds_per_epoch.png"],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_quick(script, tmp_path, load_main, keep_threads, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # benchmarks import each other
    metrics = load_main(script)(["--quick", "--out", str(tmp_path), "--device", "cpu"])
    for name in SCRIPTS[script] + ["metrics.json"]:
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f)["dataset"] == metrics["dataset"] == "digits"
    assert "digits" in capsys.readouterr().out  # the printed summary
    if script == "examples/autoencoders.py":  # the linear auto-encoder finds PCA's subspace
        assert metrics["linear_ae_vs_pca_max_angle_deg"] < 5
        assert metrics["linear_ae_test_sq_error"] < 1.05 * metrics["pca_test_sq_error"]
    if script == "examples/latent_sampling.py":  # the codes are not Gaussian: a mixture fits better
        assert metrics["ae_gmm_test_code_loglik"] > metrics["ae_gaussian_test_code_loglik"]
    if script == "benchmarks/vae_vs_pyro_loop.py":  # same model, data and steps: same quality
        assert metrics["fit_elbo"] == "trace"
        assert abs(metrics["fit_test_elbo"] - metrics["pyro_loop_test_elbo"]) < 2
    if script == "benchmarks/vae_speed.py":  # equal work: the same objective reaches the same ELBO
        assert abs(metrics["b128_fit_train_elbo"] - metrics["b128_pyro_loop_train_elbo"]) < 2
        assert abs(metrics["b128_fit_train_elbo"] - metrics["b128_torch_train_elbo"]) < 2



def test_vae_vs_pyro_loop_meanfield(tmp_path, load_main, keep_threads):
    """--fit-elbo meanfield: fit's analytic-KL estimate of the same ELBO, scored like the loop."""
    metrics = load_main("benchmarks/vae_vs_pyro_loop.py")(
        ["--quick", "--out", str(tmp_path), "--device", "cpu", "--fit-elbo", "meanfield"])
    assert metrics["fit_elbo"] == "meanfield"
    assert abs(metrics["fit_test_elbo"] - metrics["pyro_loop_test_elbo"]) < 2


def test_autoencoders_linear_dim_beyond_rank(tmp_path, load_main, keep_threads):
    """PPCA degenerates (sigma^2 = 0) once d reaches the rank of the centred images: refused."""
    with pytest.raises(ValueError, match="rank 60"):  # the digits' training split
        load_main("examples/autoencoders.py")(["--quick", "--out", str(tmp_path), "--device", "cpu",
                                               "--linear-dim", "60"])
