"""Smoke tests of the topic-model example (--quick): on a simulated corpus, and on Debian's
fortunes where the package is installed."""

import pytest

from vi_toolkit.corpora import fortunes_installed

FIGURES = ("elbo.png", "categories.png")


def test_topics_example_recovers_simulated_topics(tmp_path, run_example, capsys):
    m = run_example("examples/topics.py", tmp_path, "--quick", "--corpus", "synthetic", figures=FIGURES)
    assert m["corpus"] == "synthetic"
    assert m["topic_cosine_min"] > 0.8
    assert m["heldout_perplexity"] < 0.95 * m["unigram_perplexity"]
    assert m["nmi_lda"] > m["nmi_random"] + 0.2
    assert "topic 4:" in capsys.readouterr().out


@pytest.mark.skipif(not fortunes_installed(), reason="Debian's fortunes package is not installed")
def test_topics_example_lines_fortune_topics_up_with_their_categories(tmp_path, run_example, capsys):
    m = run_example("examples/topics.py", tmp_path, "--quick", "--corpus", "fortunes", figures=FIGURES)
    assert m["categories"] == ["computers", "food", "love", "startrek"]
    assert m["nmi_lda"] > m["nmi_random"] + 0.2
    assert m["heldout_perplexity"] < m["unigram_perplexity"]
    out = capsys.readouterr().out
    assert "topic 3:" in out and "nmi_kmeans_tfidf" in out
