"""Smoke tests of the GMM, HMM and PPCA examples (--quick), and of reading a user's data file."""

import numpy as np
import pytest

from vi_toolkit.io import load_array


def test_gmm_example(tmp_path, run_example, capsys):
    m = run_example("examples/gmm.py", tmp_path, "--quick", figures=("mixture.png", "select_K.png"))
    assert m["chosen_K"] == m["true_K"] == 3
    assert abs(m["heldout_loglik"] - m["true_params_heldout_loglik"]) < 0.05
    assert m["max_loc_error"] < 0.3 and m["max_weight_error"] < 0.05
    assert "chosen_K" in capsys.readouterr().out


def test_hmm_example(tmp_path, run_example):
    m = run_example("examples/hmm.py", tmp_path, "--quick", figures=("states.png",))
    assert abs(m["heldout_loglik_per_step"] - m["true_params_heldout_loglik_per_step"]) < 0.02
    assert m["viterbi_state_accuracy"] > m["viterbi_state_accuracy_true_params"] - 0.02


def test_ppca_example(tmp_path, run_example):
    m = run_example("examples/ppca.py", tmp_path, "--quick", figures=("subspace.png", "elbo_gap.png"))
    assert m["amortized_gap_to_L_max"] < 0.01
    assert abs(m["amortized_sigma2"] / m["sigma2_ml"] - 1) < 0.01
    assert m["amortized_subspace_angle_deg"] < 1


def test_examples_read_the_users_csv_and_npy(tmp_path, run_example):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 1, (60, 2)), rng.normal(3, 1, (60, 2))])
    np.savetxt(tmp_path / "points.csv", x, delimiter=",", header="a,b", comments="")
    m = run_example("examples/gmm.py", tmp_path / "gmm", "--quick", "--data", str(tmp_path / "points.csv"))
    assert m["num_train"] + m["num_test"] == 120 and m["chosen_K"] == 2
    np.save(tmp_path / "points.npy", x + rng.normal(0, 1, (120, 1)) * [1, 1])
    m = run_example("examples/ppca.py", tmp_path / "ppca", "--quick", "--data", str(tmp_path / "points.npy"),
                    "--q", "1")
    assert m["N"] == 120 and m["D"] == 2
    ids = np.repeat(np.arange(6), 20)[:, None]
    np.savetxt(tmp_path / "seqs.csv", np.hstack([ids, rng.normal(size=(120, 1))]), delimiter=",")
    m = run_example("examples/hmm.py", tmp_path / "hmm", "--quick", "--data", str(tmp_path / "seqs.csv"),
                    "--K", "2")
    assert m["num_train_sequences"] + m["num_test_sequences"] == 6


def test_bad_files_are_value_errors_naming_the_file(tmp_path, run_example):
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1.0,2.0\n3.0,abc\n")
    with pytest.raises(ValueError, match=r"bad.csv: line 3, column 2: 'abc' is not a number"):
        load_array(bad)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2\n3\n")
    with pytest.raises(ValueError, match=r"ragged.csv: line 2 has 1 cells"):
        load_array(ragged)
    with pytest.raises(ValueError, match=r"missing.npy: no such file"):
        load_array(tmp_path / "missing.npy")
    (tmp_path / "x.txt").write_text("1\n")
    with pytest.raises(ValueError, match=r"x.txt: unknown file type '.txt'"):
        load_array(tmp_path / "x.txt")
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"s.npy: the array has dtype <U1, not numbers"):
        load_array(tmp_path / "s.npy")
    np.save(tmp_path / "v.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"v.npy: expected a 2-D array, got shape \(3,\)"):
        load_array(tmp_path / "v.npy", ndim=2)
    with pytest.raises(ValueError, match="bad.csv: line 3"):
        run_example("examples/gmm.py", tmp_path / "o", "--quick", "--data", str(bad))
