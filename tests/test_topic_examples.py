"""Smoke tests of the topic-model example (--quick): on a simulated corpus, and on Debian's
fortunes where the package is installed."""

import json

import pytest

from vi_toolkit.corpora import fortunes_installed


@pytest.fixture
def run(load_main, keep_threads):
    """Run the example with --quick; check its metrics.json holds what it returned."""

    def run(tmp_path, *extra):
        metrics = load_main("examples/topics.py")(["--quick", "--out", str(tmp_path), "--device", "cpu", *extra])
        with open(tmp_path / "metrics.json") as f:
            assert json.load(f) == json.loads(json.dumps(metrics, default=float))
        for png in ("elbo.png", "categories.png"):
            assert (tmp_path / png).stat().st_size > 0
        return metrics

    return run


def test_topics_example_recovers_simulated_topics(tmp_path, run, capsys):
    m = run(tmp_path, "--corpus", "synthetic")
    assert m["corpus"] == "synthetic"
    assert m["topic_cosine_min"] > 0.8
    assert m["heldout_perplexity"] < 0.95 * m["unigram_perplexity"]
    assert m["nmi_lda"] > m["nmi_random"] + 0.2
    assert "topic 4:" in capsys.readouterr().out


@pytest.mark.skipif(not fortunes_installed(), reason="Debian's fortunes package is not installed")
def test_topics_example_lines_fortune_topics_up_with_their_categories(tmp_path, run, capsys):
    m = run(tmp_path, "--corpus", "fortunes")
    assert m["categories"] == ["computers", "food", "love", "startrek"]
    assert m["nmi_lda"] > m["nmi_random"] + 0.2
    assert m["heldout_perplexity"] < m["unigram_perplexity"]
    out = capsys.readouterr().out
    assert "topic 3:" in out and "nmi_kmeans_tfidf" in out
