"""Linear discriminant analysis: supervised against scikit-learn's LDA, unsupervised against a
tied-covariance EM, semi-supervised against the labelled points alone, and the label mask's
exact log-likelihood."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.mixture import GaussianMixture

from vi_toolkit.evaluation import evaluate
from vi_toolkit.initialization import discriminant_init
from vi_toolkit.recipes import fit_discriminant
from vi_toolkit.models.discriminant import LinearDiscriminant, label_data

TRUE = {"weights": torch.tensor([0.5, 0.3, 0.2]),
        "locs": torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, 3.0]]),
        "scales": torch.tensor([1.0, 1.5]),
        "corr_cholesky": torch.linalg.cholesky(torch.tensor([[1.0, 0.6], [0.6, 1.0]]))}


@pytest.fixture(scope="module")
def data():
    lda = LinearDiscriminant(3, 2)
    gen = torch.Generator().manual_seed(0)
    x, z = lda.simulate(TRUE, 900, generator=gen)
    x_test, z_test = lda.simulate(TRUE, 900, generator=gen)
    return lda, x, z, x_test, z_test


def test_supervised_fit_matches_sklearn_lda(data):
    lda, x, z, x_test, _ = data
    result, guide = fit_discriminant(lda, label_data(x, z))
    est = guide.point_estimate(result)
    sk = LinearDiscriminantAnalysis(solver="lsqr").fit(x.double().numpy(), z.numpy())
    assert np.abs(est["weights"].numpy() - sk.priors_).max() < 1e-4  # Dir(1): the frequencies
    assert np.abs(est["locs"].numpy() - sk.means_).max() < 5e-3
    cov = lda.covariance(est).double().numpy()
    assert np.linalg.norm(cov - sk.covariance_) / np.linalg.norm(sk.covariance_) < 5e-3
    w, b = lda.linear_discriminants(est)
    assert np.abs(w.numpy() - sk.coef_).max() < 0.01 and np.abs(b.numpy() - sk.intercept_).max() < 0.01
    proba, sk_proba = lda.predict_proba(x_test, est).numpy(), sk.predict_proba(x_test.double().numpy())
    assert np.abs(proba - sk_proba).max() < 5e-3
    # negative control: the same fit without its class proportions (pi uniform) misses them
    uniform = lda.predict_proba(x_test, {**est, "weights": torch.full((3,), 1 / 3)}).numpy()
    assert np.abs(uniform - sk_proba).max() > 0.05


def test_unsupervised_heldout_loglik_equals_tied_covariance_em(data):
    lda, x, _, x_test, _ = data
    result, guide = fit_discriminant(lda, label_data(x))
    heldout = lda.log_likelihood(*label_data(x_test), guide.point_estimate(result)).mean().item()
    x_np, x_test_np = x.double().numpy(), x_test.double().numpy()
    em = GaussianMixture(3, covariance_type="tied", n_init=5, tol=1e-8, max_iter=2000,
                         random_state=0).fit(x_np)
    assert abs(heldout - em.score(x_test_np)) < 0.01
    # negative control: EM with per-class diagonal covariances misses the shared correlation
    diag = GaussianMixture(3, covariance_type="diag", n_init=5, tol=1e-8, max_iter=2000,
                           random_state=0).fit(x_np)
    assert abs(heldout - diag.score(x_test_np)) > 0.05


def test_semi_supervised_accuracy_beats_the_supervised_fit_on_the_labelled_points_alone():
    corr = torch.tensor([[1.0, 0.7, 0.3, 0.0], [0.7, 1.0, 0.5, 0.2],
                         [0.3, 0.5, 1.0, 0.4], [0.0, 0.2, 0.4, 1.0]])
    truth = {"weights": torch.tensor([0.4, 0.35, 0.25]),
             "locs": torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.5, -1.0, 1.0, 0.5], [-1.0, 1.0, 1.5, -1.0]]),
             "scales": torch.tensor([1.0, 1.2, 0.8, 1.0]), "corr_cholesky": torch.linalg.cholesky(corr)}
    lda = LinearDiscriminant(3, 4)
    x, z = lda.simulate(truth, 600, generator=torch.Generator().manual_seed(1))
    known = torch.cat([(z == k).nonzero().flatten()[:4] for k in range(3)])  # 4 labels a class
    y = torch.full_like(z, -1)
    y[known] = z[known]
    data = label_data(x, y)
    unlabelled = ~data[2]
    result, guide = fit_discriminant(lda, data)  # one model: 12 labels observed, 588 summed out
    semi = (lda.predict(x[unlabelled], guide.point_estimate(result)) == z[unlabelled]).float().mean()
    result, guide = fit_discriminant(lda, label_data(x[known], z[known]))
    supervised = (lda.predict(x[unlabelled], guide.point_estimate(result)) == z[unlabelled]).float().mean()
    bayes = (lda.predict(x[unlabelled], truth) == z[unlabelled]).float().mean()  # the true parameters
    assert semi > supervised + 0.05
    assert semi > bayes - 0.01


def test_labelled_points_score_their_class_and_unlabelled_points_the_sum_over_classes(data):
    lda, x, z, _, _ = data
    x, z = x[:200], z[:200]
    y = z.clone()
    y[1::2] = -1  # every other label unknown
    data = label_data(x, y)
    result, guide = fit_discriminant(lda, data)
    est = guide.point_estimate(result)
    cov = lda.covariance(est).double().numpy()
    joint = np.stack([np.log(est["weights"][k].item()) + multivariate_normal(
        est["locs"][k].double().numpy(), cov).logpdf(x.double().numpy()) for k in range(3)], 1)
    expected = np.where(data[2].numpy(), joint[np.arange(200), z.numpy()], np.logaddexp.reduce(joint, 1))
    assert np.allclose(lda.log_likelihood(*data, est).numpy(), expected, atol=1e-4)
    posterior = np.exp(joint - np.logaddexp.reduce(joint, 1, keepdims=True))
    assert np.allclose(lda.predict_proba(x, est).numpy(), posterior, atol=1e-5)
    # the enumerated program sums z out to the same value (a point-mass guide: ELBO = IWAE = exact)
    report = evaluate(result, data, num_samples=4, exact=lda)
    assert abs(report["iwae"] - expected.mean()) < 1e-4 and abs(report["elbo"] - expected.mean()) < 1e-4


def test_init_takes_the_labelled_class_means_and_k_means_for_classes_without_labels(data):
    lda, x, z, _, _ = data
    y = torch.where(z == 2, -1, z)  # class 2 never labelled
    init = discriminant_init(lda, *label_data(x, y))
    for k in (0, 1):
        assert torch.allclose(init["locs"][k], x[z == k].mean(0), atol=1e-5)
    assert torch.linalg.norm(init["locs"][2] - TRUE["locs"][2]) < 0.5  # a k-means centre far from them
    assert torch.allclose(init["weights"].sum(), torch.tensor(1.0))


def test_bad_input_is_a_value_error_naming_it(data):
    lda, x, z, _, _ = data
    for K in (1, 2.0, True):
        with pytest.raises(ValueError, match="K .*must be an integer >= 2"):
            LinearDiscriminant(K, 2)
    with pytest.raises(ValueError, match="D .*must be an integer >= 1"):
        LinearDiscriminant(2, 0)
    with pytest.raises(ValueError, match="concentration must be positive"):
        LinearDiscriminant(2, 2, concentration=0.0)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2\)"):
        fit_discriminant(lda, label_data(torch.zeros(5, 3)))
    with pytest.raises(ValueError, match=r"y must be \(900,\) integer labels"):
        label_data(x, z.float())
    with pytest.raises(ValueError, match=r"labelled must be a \(900,\) boolean mask"):
        label_data(x, z, torch.ones(900))
    with pytest.raises(ValueError, match=r"y\[0\] = -1 is marked labelled"):
        label_data(x, torch.full_like(z, -1), torch.ones(900, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"y\[\d+\] = 3 is marked labelled but the classes are 0..2"):
        fit_discriminant(lda, label_data(x, torch.where(z == 2, 3, z)))
    with pytest.raises(ValueError, match=r"data must be the tuple \(x, y, labelled\) of label_data"):
        fit_discriminant(lda, x)
    with pytest.raises(ValueError, match="restarts must be a positive integer"):
        fit_discriminant(lda, label_data(x, z), restarts=0)
