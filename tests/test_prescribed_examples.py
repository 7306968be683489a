"""Smoke tests of the examples of prescribed latent variable models (--quick): linear discriminant
analysis and a Bayesian network with a latent node."""

def test_discriminant_example(tmp_path, run_example, capsys):
    m = run_example("examples/discriminant.py", tmp_path, "--quick", figures=("regions.png",))
    assert m["supervised_max_loc_diff_vs_sklearn"] < 0.01
    assert m["supervised_cov_rel_diff_vs_sklearn"] < 0.01
    assert m["supervised_max_proba_diff_vs_sklearn"] < 0.01
    assert abs(m["unsupervised_heldout_loglik"] - m["tied_em_heldout_loglik"]) < 0.01
    assert m["semi_supervised_accuracy"] > m["labelled_only_accuracy"]
    assert m["semi_supervised_accuracy"] > m["true_params_accuracy"] - 0.05
    assert "semi_supervised_accuracy" in capsys.readouterr().out


def test_bayesnet_example(tmp_path, run_example):
    m = run_example("examples/bayesnet.py", tmp_path, "--quick", figures=("cpts.png",))
    assert m["max_cpt_error"] < 0.2  # 1000 points: each CPT row from a few hundred
    assert abs(m["heldout_loglik"] - m["true_cpts_heldout_loglik"]) < 0.05
    assert abs(m["exact_minus_iwae"]) < 1e-4  # MAP guide, the class summed out: exact weights
    assert m["class_accuracy"] > m["class_accuracy_true_cpts"] - 0.03
