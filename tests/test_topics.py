"""Topic models: latent Dirichlet allocation with the amortized logistic-normal guide against the
known topics of a simulated corpus, its importance-sampled likelihood against quadrature, the
logistic normal and the Laplace approximation against closed forms, and the fortune-file reader."""

import collections
import itertools
import math
import re
import types

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity

import vi_toolkit
from vi_toolkit.corpora import fortune_files, fortunes_installed, load_fortunes, read_fortunes
from vi_toolkit.guides.topics import TopicEncoder, heldout_perplexity, laplace_approximation, logistic_normal
from vi_toolkit.initialization import topics_init
from vi_toolkit.models.topics import (LatentDirichletAllocation, check_counts, match_topics,
                                      multinomial_log_coefficient, perplexity, unigram_log_likelihood)
from vi_toolkit.recipes import fit_lda

K, V = 5, 200


needs_fortunes = pytest.mark.skipif(not fortunes_installed(),
                                    reason="Debian's fortunes package is not installed (apt-get install fortunes)")


@pytest.fixture(scope="module")
def corpus():
    """Five sparse topics over 200 words; 1000 training and 200 test documents of about 50 words."""
    true = torch.as_tensor(np.random.default_rng(0).dirichlet(np.full(V, 0.1), size=K), dtype=torch.float32)
    lda = LatentDirichletAllocation(K, V, alpha=1.0)
    counts, theta = lda.simulate(true, 1200, 50, seed=1)
    return lda, true, counts[:1000], counts[1000:], theta


@pytest.fixture(scope="module")
def fitted(corpus):
    lda, _, train, _, _ = corpus
    return fit_lda(lda, train, num_epochs=25, batch_size=200, lr=0.03, seed=0)


def exact_log_likelihood_two_topics(counts, topics, alpha, n=4000):
    """log p(x_d | beta) for K = 2 by the midpoint rule: theta_1 = t ~ Beta(alpha, alpha), each half
    of (0, 1) written t = w^(1/alpha) (t^(alpha-1) dt = dw / alpha, a smooth integrand)."""
    x, b = counts.double(), topics.double()
    top = 0.5 ** alpha
    w = (torch.arange(n, dtype=torch.float64) + 0.5) * top / n
    t = w ** (1 / alpha)
    log_beta_fn = 2 * math.lgamma(alpha) - math.lgamma(2 * alpha)
    log_jacobian = (alpha - 1) * torch.log1p(-t) - math.log(alpha) - log_beta_fn + math.log(top / n)
    terms = [x @ (th[:, None] * b[0] + (1 - th[:, None]) * b[1]).log().T + log_jacobian for th in (t, 1 - t)]
    log_coef = torch.lgamma(x.sum(-1) + 1) - torch.lgamma(x + 1).sum(-1)
    return log_coef + torch.cat(terms, -1).logsumexp(-1)


# -- the fit against the known topics -------------------------------------------------------

def test_every_simulated_topic_is_recovered_by_a_distinct_fitted_topic(corpus, fitted):
    _, true, train, _, _ = corpus
    result, guide = fitted
    estimated = guide.topic_words(result)
    cosine = cosine_similarity(true.double().numpy(), estimated.double().numpy())
    best = cosine.argmax(1)
    assert len(set(best.tolist())) == K  # each true topic's best match is a different fitted topic
    assert cosine.max(1).min() > 0.8
    # the Hungarian pairing of match_topics is the best of all K! pairings, found here by brute force
    brute = max(itertools.permutations(range(K)), key=lambda p: cosine[range(K), p].sum())
    index, matched = match_topics(estimated, true)
    assert index.tolist() == list(brute) == best.tolist()
    assert np.allclose(matched.numpy(), cosine[range(K), best])
    # negative controls: the k-means starting point, and every topic the corpus's frequencies, fail
    assert match_topics(topics_init(train, K), true)[1].min() < 0.8
    unigram = (train.sum(0) / train.sum()).expand(K, V)
    assert match_topics(unigram, true)[1].min() < 0.8


def test_heldout_perplexity_is_below_the_unigram_baseline(corpus, fitted):
    _, _, train, test, _ = corpus
    result, _ = fitted
    unigram = perplexity(test, unigram_log_likelihood(train, test))
    assert heldout_perplexity(result, test, num_samples=200) < 0.9 * unigram
    # negative control: test documents whose words were shuffled among them (same lengths, same
    # frequencies, no topics left) are no better explained than by the unigram frequencies
    tokens = torch.repeat_interleave(torch.arange(V).repeat(len(test)), test.long().flatten())
    tokens = tokens[torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))]
    docs = torch.repeat_interleave(torch.arange(len(test)), test.long().sum(-1))
    shuffled = torch.zeros_like(test).index_put_((docs, tokens), torch.ones(len(tokens)), accumulate=True)
    assert heldout_perplexity(result, shuffled, num_samples=200) > perplexity(
        shuffled, unigram_log_likelihood(train, shuffled))


def test_dominant_topics_follow_the_simulated_proportions(corpus, fitted):
    lda, true, _, test, theta = corpus
    result, guide = fitted
    index, _ = match_topics(guide.topic_words(result), true)
    estimated = guide.topic_proportions(result, test)[:, index]  # columns in the true topics' order
    assert torch.allclose(estimated.sum(-1), torch.ones(len(test)), atol=1e-5)
    truth = theta[1000:]
    assert (estimated - truth).abs().mean() < 0.08  # 50 words a document: posterior sds near 0.05
    # negative control: the proportions of other documents of the same corpus
    assert (estimated.roll(1, 0) - truth).abs().mean() > 0.15


# -- the estimators against closed forms and quadrature --------------------------------------

def test_importance_sampled_log_likelihood_matches_quadrature_with_two_topics():
    lda = LatentDirichletAllocation(2, 20)  # alpha = 1/2
    topics = torch.as_tensor(np.random.default_rng(2).dirichlet(np.full(20, 0.5), size=2))
    counts, _ = lda.simulate(topics, 40, 20, seed=3)
    exact = exact_log_likelihood_two_topics(counts, topics, lda.alpha)
    prior_only = lda.log_likelihood(counts, topics, num_samples=20000, chunk_size=2000)
    assert (prior_only - exact).mean().abs() < 0.01 and (prior_only - exact).abs().max() < 0.06
    # a narrow proposal in the wrong place: the prior's share of it keeps the estimate consistent
    wrong = logistic_normal(torch.tensor([3.0, 0.0], dtype=torch.float64).expand(40, 2),
                            torch.full((40, 2), 0.2, dtype=torch.float64))
    defended = lda.log_likelihood(counts, topics, wrong, num_samples=20000, defensive=0.5, chunk_size=2000)
    assert (defended - exact).mean().abs() < 0.01 and (defended - exact).abs().max() < 0.06
    # negative control: without that share, the same proposal misses most of the posterior
    undefended = lda.log_likelihood(counts, topics, wrong, num_samples=20000, defensive=1e-12, chunk_size=2000)
    assert (exact - undefended).mean() > 1.0
    assert perplexity(counts, prior_only) == pytest.approx(perplexity(counts, exact), rel=2e-3)


def test_meanfield_fit_perplexity_matches_quadrature_and_survives_save_and_load(tmp_path):
    lda = LatentDirichletAllocation(2, 30)
    topics = torch.as_tensor(np.random.default_rng(4).dirichlet(np.full(30, 0.3), size=2), dtype=torch.float32)
    counts, _ = lda.simulate(topics, 500, 30, seed=5)
    train, test = counts[:400], counts[400:]
    result, guide = fit_lda(lda, train, topics="meanfield", num_epochs=20, batch_size=100, lr=0.03, seed=0)
    assert result.config["elbo"] == "meanfield"
    fitted = guide.topic_words(result)
    assert match_topics(fitted, topics)[1].min() > 0.9
    exact = perplexity(test, exact_log_likelihood_two_topics(test, fitted, lda.alpha))
    estimate = heldout_perplexity(result, test, num_samples=500)
    assert estimate == pytest.approx(exact, rel=5e-3)
    result.save(tmp_path / "lda.pt")
    loaded = vi_toolkit.load(tmp_path / "lda.pt")
    assert isinstance(loaded.guide, TopicEncoder) and loaded.guide.topics == "meanfield"
    assert torch.allclose(loaded.guide.topic_words(loaded), fitted)
    assert heldout_perplexity(loaded, test, num_samples=500) == pytest.approx(estimate, rel=1e-6)


def test_logistic_normal_density_is_the_change_of_variables():
    loc, scale = torch.tensor([0.3, -0.5], dtype=torch.float64), torch.tensor([0.8, 0.6], dtype=torch.float64)
    theta1 = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    theta = torch.stack([theta1, 1 - theta1], -1)
    # K = 2: logit(theta_1) = h_1 - h_2 ~ N(mu_1 - mu_2, s_1^2 + s_2^2), d theta_1 / du = theta_1 theta_2
    u = torch.distributions.Normal(loc[0] - loc[1], scale.pow(2).sum().sqrt())
    closed = u.log_prob(torch.logit(theta1)) - (theta1 * (1 - theta1)).log()
    assert torch.allclose(logistic_normal(loc, scale).log_prob(theta), closed, atol=1e-10)
    # K = 3: the density integrates to one over the simplex (the Dirichlet's measure d theta_1 d theta_2)
    q = logistic_normal(torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64),
                        torch.tensor([0.5, 0.7, 0.6], dtype=torch.float64))
    n = 600
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    inside = a + b < 1
    points = torch.stack([a[inside], b[inside], 1 - a[inside] - b[inside]], -1)
    assert q.log_prob(points).exp().sum() / n ** 2 == pytest.approx(1.0, abs=2e-3)


def test_laplace_approximation_is_the_mode_and_inverse_hessian_in_the_softmax_basis():
    alpha = torch.tensor([0.3, 1.2, 2.0, 0.5], dtype=torch.float64)
    loc, scale = laplace_approximation(alpha)

    def log_density(h):  # log Dir(softmax(h)) + log |Jacobian| = sum_k alpha_k log softmax(h)_k + const
        return (alpha * h.log_softmax(-1)).sum()

    start = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([start], max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")
    optimizer.step(lambda: (optimizer.zero_grad(), (-log_density(start)).backward(), -log_density(start))[-1])
    mode = start.detach() - start.detach().mean()
    assert torch.allclose(loc, mode, atol=1e-6)
    hessian = torch.autograd.functional.hessian(lambda h: -log_density(h), loc)
    assert torch.allclose(scale ** 2, torch.linalg.pinv(hessian).diagonal(), atol=1e-8)


def test_simulated_corpus_has_the_requested_lengths_and_mixtures(corpus):
    lda, true, train, test, theta = corpus
    counts = torch.cat([train, test])
    assert counts.dtype == torch.float32 and counts.shape == (1200, V)
    assert abs(counts.sum(-1).mean().item() - 50) < 1.5
    # each document's words are drawn from its mixture theta_d^T beta: the pooled frequencies agree
    expected = (counts.sum(-1, keepdim=True) * (theta @ true)).sum(0)
    assert (counts.sum(0) - expected).abs().max() < 5 * expected.max().sqrt()
    assert multinomial_log_coefficient(torch.tensor([[2.0, 1.0]])).item() == pytest.approx(math.log(3))


# -- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("counts, match", [
    (torch.ones(3, 4, dtype=torch.long), "float tensor"),
    (torch.tensor([[1.0, -1.0, 0.0, 1.0]]), "non-negative whole numbers"),
    (torch.tensor([[1.5, 0.0, 0.0, 1.0]]), "non-negative whole numbers"),
    (torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]), "document 1 has no words"),
    (torch.ones(3, 5), "vocabulary of 5 words, the model has 4"),
    (torch.ones(4), "count matrix"),
])
def test_bad_counts_are_refused_naming_the_argument(counts, match):
    with pytest.raises(ValueError, match=match):
        LatentDirichletAllocation(2, 4).check(counts, "val_counts")
    with pytest.raises(ValueError, match="val_counts"):
        LatentDirichletAllocation(2, 4).check(counts, "val_counts")


def test_bad_arguments_are_refused_naming_them():
    with pytest.raises(ValueError, match="K"):
        LatentDirichletAllocation(1, 10)
    with pytest.raises(ValueError, match="alpha"):
        LatentDirichletAllocation(3, 10, alpha=0.0)
    lda = LatentDirichletAllocation(2, 4)
    with pytest.raises(ValueError, match="topics must be one of"):
        TopicEncoder(lda, topics="gibbs")
    with pytest.raises(ValueError, match="init must have shape"):
        TopicEncoder(lda, init=torch.ones(3, 4) / 4)
    counts = torch.ones(6, 4)
    with pytest.raises(ValueError, match="warmup"):
        fit_lda(lda, counts, warmup=1.0)
    with pytest.raises(ValueError, match="defensive"):
        lda.log_likelihood(counts, torch.ones(2, 4) / 4, defensive=0.0)
    with pytest.raises(ValueError, match=r"topics must be \(2, 4\)"):
        lda.log_likelihood(counts, torch.ones(3, 4) / 4)
    with pytest.raises(ValueError, match="TopicEncoder"):
        heldout_perplexity(types.SimpleNamespace(guide=lambda counts: None), counts)
    with pytest.raises(ValueError, match="smoothing"):
        topics_init(counts, 2, smoothing=0.0)
    with pytest.raises(ValueError, match="counts"):
        check_counts(torch.ones(2, 3, 4))


# -- the fortune-file reader ------------------------------------------------------------------

FORTUNES = ("The cat sat on the mat.\n%\nA _\bw_\bo_\br_\bd in b\bbo\bol\bld type!\n"
            "And a second line: the cat, the cat.\n%\n%\nDogs bark; cats purr.\n%\n")


def test_read_fortunes_splits_at_percent_lines_and_removes_overstrikes(tmp_path):
    path = tmp_path / "animals"
    path.write_text(FORTUNES)
    assert read_fortunes(str(path)) == ["The cat sat on the mat.",
                                        "A word in bold type! And a second line: the cat, the cat.",
                                        "Dogs bark; cats purr."]


def test_load_fortunes_counts_each_texts_words_by_category(tmp_path):
    (tmp_path / "animals").write_text(FORTUNES)
    (tmp_path / "weather").write_text("Rain, rain, go away.\n%\nSun and rain make rainbows.\n%\nOk.\n")
    corpus = load_fortunes(["weather", "animals"], root=str(tmp_path), min_df=1, max_df=1.0, min_words=2)
    # the reference: lower-cased runs of three or more letters, English stop words left out
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    expected = []
    for text in corpus.texts:
        words = [w for w in re.findall(r"[a-z]{3,}", text.lower()) if w not in ENGLISH_STOP_WORDS]
        expected.append(collections.Counter(words))
    assert corpus.categories == ("weather", "animals")
    assert corpus.texts[0] == "Rain, rain, go away." and "Ok." not in corpus.texts  # "Ok." has no word left
    assert corpus.labels.tolist() == [0, 0, 1, 1, 1]
    assert set(corpus.vocabulary) == set().union(*expected)
    for row, counter in zip(corpus.counts, expected):
        assert {w: int(c) for w, c in zip(corpus.vocabulary, row) if c} == dict(counter)
    train, test = corpus.split(0.4, seed=0)
    assert len(train) == 3 and len(test) == 2 and train.vocabulary == corpus.vocabulary
    assert sorted(train.texts + test.texts) == sorted(corpus.texts)


def test_missing_fortunes_are_errors_naming_the_file_category_or_package(tmp_path):
    with pytest.raises(ValueError, match="no-such-file"):
        read_fortunes(str(tmp_path / "no-such-file"))
    (tmp_path / "animals").write_text(FORTUNES)
    with pytest.raises(ValueError, match="'plants'.*animals"):
        load_fortunes(["plants"], root=str(tmp_path))
    with pytest.raises(ValueError, match="no-such-fortunes-package"):
        fortune_files(("no-such-fortunes-package",))


@needs_fortunes
def test_debian_fortunes_hold_every_text_of_each_category():
    files = fortune_files()
    assert {"art", "science", "love", "politics"} <= set(files)
    corpus = load_fortunes(["science", "love"], min_words=1)
    for label, category in enumerate(corpus.categories):
        with open(files[category], encoding="utf-8") as f:
            blocks = [b for b in re.split(r"^%\s*$", f.read(), flags=re.MULTILINE) if b.strip()]
        kept = int((corpus.labels == label).sum())
        assert 0.8 * len(blocks) < kept <= len(blocks)  # the texts left with a word in the vocabulary
    assert corpus.counts.shape == (len(corpus), len(corpus.vocabulary)) and corpus.counts.sum(-1).min() >= 1
