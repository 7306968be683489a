"""Topic models: latent Dirichlet allocation fitted with an amortized logistic-normal encoder.

The corpus is Debian's fortunes (``apt-get install fortunes``: short texts filed by category,
one file a category, read by ``vi_toolkit.corpora``), or with ``--corpus synthetic`` documents
simulated from known topics; ``auto`` (the default) takes the fortunes when the package is
installed. ``vi_toolkit.recipes.fit_lda`` fits ``vi_toolkit.models.topics`` with one topic a
category (the guide of ``vi_toolkit.guides.topics``), and the script prints

* each topic's top words, ranked by relevance (Sievert & Shirley 2014)
  lambda log beta_kv + (1 - lambda) log(beta_kv / p_v), lambda = 0.6, p_v the training
  corpus's add-one frequency of word v (lambda = 1 is the plain ranking, dominated by words
  of every topic);
* the normalized mutual information (NMI) between the held-out documents' dominant topics,
  argmax_k E_q[theta_dk], and their categories (of a simulated document: its largest true
  proportion), beside a random assignment and k-means on tf-idf vectors (scikit-learn), and
  beside the same model fitted by scikit-learn's ``LatentDirichletAllocation`` (batch
  variational Bayes, the same priors) as a reference;
* the held-out perplexity (an upper bound, ``vi_toolkit.guides.topics.heldout_perplexity``)
  beside the unigram baseline and scikit-learn's topics (the same estimator, its proposal the
  prior);
* on the simulated corpus, the cosine similarity of each true topic with its fitted match.

Figures: ``elbo.png`` (the ELBO per document, training and held out) and ``categories.png``
(the share of each category's held-out documents whose dominant topic is k).
"""

import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import LatentDirichletAllocation as SklearnLDA
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.metrics import normalized_mutual_info_score

from vi_toolkit import plots
from vi_toolkit.corpora import Corpus, fortunes_installed, load_fortunes
from vi_toolkit.guides.topics import heldout_perplexity
from vi_toolkit.models.topics import LatentDirichletAllocation, match_topics, perplexity, unigram_log_likelihood
from vi_toolkit.recipes import fit_lda
from vi_toolkit.scripts import parse_args, print_summary, save_figure, script_parser, write_metrics

CATEGORIES = ("art", "computers", "food", "love", "medicine", "politics", "science", "sports", "startrek")
QUICK_CATEGORIES = ("computers", "food", "love", "startrek")
RELEVANCE = 0.6


def load_corpus(args):
    """The corpus, split 80/20, and the true topics (None for the fortunes)."""
    if args.corpus == "auto":
        args.corpus = "fortunes" if fortunes_installed() else "synthetic"
        if args.corpus == "synthetic":
            print("(Debian's fortunes are not installed: apt-get install fortunes; a synthetic corpus instead)")
    if args.corpus == "fortunes":
        categories = args.categories or (QUICK_CATEGORIES if args.quick else CATEGORIES)
        corpus = load_fortunes(list(categories), max_features=500 if args.quick else args.vocabulary, min_df=3)
        return (*corpus.split(0.2, seed=args.seed), None)
    K, V = 5, 200
    topics = torch.as_tensor(np.random.default_rng(args.seed).dirichlet(np.full(V, 0.1), size=K),
                             dtype=torch.float32)
    num_docs = 1200 if args.quick else 3000
    counts, theta = LatentDirichletAllocation(K, V, alpha=1.0).simulate(topics, num_docs, 50, seed=args.seed + 1)
    corpus = Corpus(counts, tuple(f"w{v}" for v in range(V)), theta.argmax(-1),
                    tuple(f"topic {k}" for k in range(K)), [""] * num_docs)
    return (*corpus.split(0.2, seed=args.seed), topics)


def top_words(topics, frequencies, vocabulary, n=8):
    """Each topic's ``n`` most relevant words (module docstring)."""
    log_beta = topics.double().log()
    relevance = RELEVANCE * log_beta + (1 - RELEVANCE) * (log_beta - frequencies.double().log())
    return [[vocabulary[v] for v in row] for row in relevance.topk(n, dim=-1).indices.tolist()]


def main(argv=None):
    parser = script_parser(__doc__.splitlines()[0], "out/topics")
    parser.add_argument("--corpus", choices=("auto", "fortunes", "synthetic"), default="auto")
    parser.add_argument("--categories", nargs="+", help=f"fortune categories (default: {' '.join(CATEGORIES)})")
    parser.add_argument("--vocabulary", type=int, default=1000, help="words kept, the most frequent (500 with --quick)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--samples", type=int, default=1000, help="importance draws a document for the perplexity")
    args = parse_args(parser, argv)
    start = time.perf_counter()
    train, test, truth = load_corpus(args)
    K, V = len(train.categories), len(train.vocabulary)
    lda = LatentDirichletAllocation(K, V) if truth is None else LatentDirichletAllocation(K, V, alpha=1.0)
    result, guide = fit_lda(lda, train.counts, val_counts=test.counts, num_epochs=20 if args.quick else args.epochs,
                            seed=args.seed, device=args.device)
    topics = guide.topic_words(result)
    dominant = guide.topic_proportions(result, test.counts).argmax(-1)

    tfidf = TfidfTransformer().fit(train.counts.numpy())
    kmeans = KMeans(K, n_init=10, random_state=args.seed).fit(tfidf.transform(train.counts.numpy()))
    chance = np.random.default_rng(args.seed).integers(0, K, len(test))
    sklearn = SklearnLDA(K, doc_topic_prior=lda.alpha, topic_word_prior=lda.eta, learning_method="batch",
                         max_iter=10 if args.quick else 50, max_doc_update_iter=20 if args.quick else 100,
                         random_state=args.seed).fit(train.counts.numpy())
    nmi = {name: float(normalized_mutual_info_score(test.labels.numpy(), labels)) for name, labels in (
        ("lda", dominant.numpy()), ("kmeans_tfidf", kmeans.predict(tfidf.transform(test.counts.numpy()))),
        ("random", chance), ("sklearn_lda", sklearn.transform(test.counts.numpy()).argmax(-1)))}
    sklearn_topics = torch.as_tensor(sklearn.components_ / sklearn.components_.sum(-1, keepdims=True))
    samples = 100 if args.quick else args.samples

    frequencies = (train.counts.sum(0) + 1) / (train.counts.sum() + V)  # add-one: no word at 0
    words = top_words(topics, frequencies, train.vocabulary)
    print(f"\nTopics of {args.corpus} ({K} topics, {V} words), by relevance (lambda = {RELEVANCE}):")
    for k, row in enumerate(words):
        print(f"  topic {k}: {' '.join(row)}")
    metrics = {"corpus": args.corpus, "categories": list(train.categories), "num_train": len(train),
               "num_test": len(test), "vocabulary": V, "mean_words_per_document": float(train.counts.sum(-1).mean()),
               "heldout_elbo_per_document": result.val_elbo,
               "nmi_lda": nmi["lda"], "nmi_kmeans_tfidf": nmi["kmeans_tfidf"], "nmi_random": nmi["random"],
               "nmi_sklearn_lda": nmi["sklearn_lda"],
               "heldout_perplexity": heldout_perplexity(result, test.counts, num_samples=samples, seed=args.seed),
               "unigram_perplexity": perplexity(test.counts, unigram_log_likelihood(train.counts, test.counts)),
               "sklearn_lda_perplexity": perplexity(test.counts, lda.log_likelihood(
                   test.counts, sklearn_topics, num_samples=samples, seed=args.seed))}
    if truth is not None:
        metrics["topic_cosine_min"] = float(match_topics(topics, truth)[1].min())
    metrics["top_words"] = {f"topic {k}": " ".join(row) for k, row in enumerate(words)}

    save_figure(plots.elbo_curves(result.history, x="epoch", title="LDA: ELBO per document"), args.out, "elbo")
    share = torch.zeros(K, K)
    share.index_put_((test.labels, dominant), torch.ones(len(test)), accumulate=True)
    share /= share.sum(-1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(3 + 0.6 * K, 1.5 + 0.5 * K))
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(K), [f"{k}: {words[k][0]}" for k in range(K)], rotation=45, ha="right")
    ax.set_yticks(range(K), train.categories)
    ax.set_xlabel("dominant topic (its most relevant word)")
    ax.set_title(f"Held-out documents by category\nNMI {nmi['lda']:.3f} "
                 f"(k-means tf-idf {nmi['kmeans_tfidf']:.3f}, random {nmi['random']:.3f})", fontsize=9)
    fig.colorbar(image, ax=ax, label="share of the category's documents")
    save_figure(fig, args.out, "categories")
    metrics["seconds"] = time.perf_counter() - start
    write_metrics(args.out, metrics)
    print_summary(f"Latent Dirichlet allocation on {args.corpus}",
                  {k: v for k, v in metrics.items() if k not in ("categories", "top_words")})
    return metrics


if __name__ == "__main__":
    main()
