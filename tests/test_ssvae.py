"""The semi-supervised VAE M2: its objective against the identities it must satisfy, bad input,
the example (quick smoke test; the digits figure against logistic regression, slow)."""

import pyro
import pytest
import torch

import vi_toolkit
from vi_toolkit import DataSets, fit, make_elbo
from vi_toolkit.guides.ssvae import SemiSupervisedGuide
from vi_toolkit.models.ssvae import SemiSupervisedVAE
from vi_toolkit.datasets import load_images

C, D = 4, 6  # classes; latent dimension
FIGURES = ("elbo.png", "analogies.png")  # what examples/ssvae.py draws


@pytest.fixture(scope="module")
def images():
    data = load_images("digits", device="cpu")
    return data.train[:5], data.train_labels[:5] % C


def _pair(alpha=0.0):
    torch.manual_seed(0)
    model = SemiSupervisedVAE((1, 8, 8), C, D, hidden=(32,), alpha=alpha)
    return model, SemiSupervisedGuide(model, hidden=(32,))


def _loss(model, guide, particles, **sets):
    """-ELBO of the sets given, the unlabelled images' classes enumerated."""
    elbo = make_elbo("enum" if "unlabelled" in sets else "trace", num_particles=particles)
    return elbo.differentiable_loss(model, guide, **sets).detach()


def test_unlabelled_elbo_is_the_classifier_weighted_labelled_elbo_plus_its_entropy(images):
    """U(x) = sum_y q(y | x) L(x, y) + H[q(y | x)]: the enumerated class, the shared classifier and
    the two plates together compute Kingma et al.'s unlabelled bound."""
    x, _ = images
    model, guide = _pair()
    pyro.set_rng_seed(1)
    unlabelled = -_loss(model, guide, 4000, unlabelled=x)
    with torch.no_grad():
        q = model.classifier(x).probs  # (B, C)
    pairs_x, pairs_y = x.repeat_interleave(C, 0), torch.arange(C).repeat(len(x))
    # each pair (x_i, y) weighted by q(y | x_i): sum_i sum_y q(y | x_i) L(x_i, y)
    with pyro.poutine.scale(scale=q.reshape(-1)):
        weighted = -_loss(model, guide, 4000, labelled=(pairs_x, pairs_y))
    entropy = -(q * q.log()).sum()
    # 0.25 nats: about ten times the spread of these 4000-draw estimates (0.01 to 0.04 over seeds),
    # against a bound of -223 nats for the five images
    assert abs(float(unlabelled - (weighted + entropy))) < 0.25
    # without the entropy (6.9 nats here) the same check fails
    assert abs(float(unlabelled - weighted)) > 0.25


def test_the_classification_term_is_alpha_log_q_of_the_label(images):
    x, y = images
    model, guide = _pair(alpha=0.0)
    pyro.set_rng_seed(2)
    plain = _loss(model, guide, 1, labelled=(x, y))
    model.alpha = 3.0
    pyro.set_rng_seed(2)  # the same draws of z
    weighted = _loss(model, guide, 1, labelled=(x, y))
    with torch.no_grad():
        log_q = torch.log_softmax(model.classifier.network(x)[0], -1)[torch.arange(len(y)), y].sum()
    assert float(plain - weighted) == pytest.approx(3.0 * float(log_q), rel=1e-5)


def test_the_guide_shares_the_models_classifier():
    model, guide = _pair()
    assert guide.classifier is model.classifier
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in guide.named_parameters()}
    assert any(n.startswith("classifier.") for n in names)


def test_a_saved_fit_loads_in_a_new_model_and_guide_with_the_same_classifier(images, tmp_path):
    x, y = images
    model, guide = _pair(alpha=1.0)
    result = fit(model, guide, DataSets(labelled=(x[:3], y[:3]), unlabelled=x[3:]), num_steps=3,
                 progress=False, seed=0)
    assert result.save(tmp_path / "m2.pt") == []  # both have specs: the guide's nests the model's
    loaded = vi_toolkit.load(tmp_path / "m2.pt", device="cpu")
    assert loaded.model is not model and loaded.guide.classifier is not model.classifier
    with result.scope():
        expected = model.predict_proba(x)
    with loaded.scope():
        assert torch.equal(loaded.model.predict_proba(x), expected)
        assert torch.equal(loaded.guide.classifier(x).probs, expected)


def test_bad_input_is_a_value_error_naming_it(images):
    x, y = images
    model, guide = _pair()
    with pytest.raises(ValueError, match=r"labels must lie in 0..3, got values in 0..4"):
        model(labelled=(x, torch.tensor([0, 1, 2, 3, 4])))
    with pytest.raises(ValueError, match="labels must be integers"):
        model(labelled=(x, y.float()))
    with pytest.raises(ValueError, match=r"images in \[0, 1\]"):
        model(unlabelled=2 * x + 1)
    with pytest.raises(ValueError, match="must be a vi_toolkit.models.ssvae.SemiSupervisedVAE"):
        SemiSupervisedGuide(object())
    with pytest.raises(ValueError, match="num_classes must be an integer of at least 2"):
        SemiSupervisedVAE((1, 8, 8), 1, D)


def test_ssvae_example_quick(tmp_path, run_example, capsys):
    m = run_example("examples/ssvae.py", tmp_path, "--quick", figures=FIGURES)
    assert m["num_labelled"] == round(0.1 * (m["num_labelled"] + m["num_unlabelled"]))
    assert m["ssvae_test_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert m["elbo_unlabelled"] > m["elbo_labelled"]  # the labelled ELBO carries alpha log q(y | x) < 0
    assert "logistic_regression_test_accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_ssvae_with_10_percent_of_the_digits_labelled_beats_logistic_regression(tmp_path, run_example):
    m = run_example("examples/ssvae.py", tmp_path, figures=FIGURES)
    assert m["ssvae_test_accuracy"] > m["logistic_regression_test_accuracy"]
