"""Latent Dirichlet allocation (Blei, Ng & Jordan 2003) on bag-of-words counts::

    beta_k ~ Dir(eta 1_V)                       k = 1..K   topic-word distributions
    theta_d ~ Dir(alpha 1_K)                    d = 1..D   topic proportions (the data plate)
    z_dn | theta_d ~ Cat(theta_d),  w_dn | z_dn ~ Cat(beta_{z_dn})       n = 1..N_d

Summing out each word's topic z_dn, the words of document d are drawn from the mixture
theta_d^T beta, so its count vector x_d (V,) is::

    x_d | theta_d, beta ~ Multinomial(N_d, theta_d^T beta),
    log p(x_d | theta_d, beta) = log C(x_d) + sum_v x_dv log (theta_d^T beta)_v,

with C(x_d) = N_d! / prod_v x_dv! the multinomial coefficient. Documents are the data
points: the data are a count matrix (D, V), documents on dimension 0, and the model opens
its plate over documents with ``vi_toolkit.data_plate``, so minibatches of documents are
scaled by D/B. The guides (``vi_toolkit.guides.topics``) are Srivastava & Sutton's (2017)
amortized logistic-normal encoder for theta_d and a point mass or a Dirichlet for beta.

**Held-out perplexity** (Blei et al. 2003, section 7) of documents w_1..w_D at topics beta is::

    perplexity = exp(-sum_d log p(w_d | beta) / sum_d N_d),

with log p(w_d | beta) = log p(x_d | beta) - log C(x_d), the probability of the document's
word sequence (the count vector's probability counts every order of its words). Its
marginal, log p(x_d | beta) = log int p(x_d | theta, beta) Dir(theta | alpha) d theta, is
intractable for K > 2. :meth:`LatentDirichletAllocation.log_likelihood` estimates it by
importance sampling (as Wallach et al. 2009 evaluate topic models at point topics), with the
defensive proposal (Hesterberg 1995)::

    r(theta) = (1 - epsilon) q(theta | x_d) + epsilon Dir(theta | alpha),
    log p_S(x_d | beta) = log 1/S sum_s p(x_d | theta_s, beta) Dir(theta_s | alpha) / r(theta_s).

By Jensen's inequality E[log p_S] <= log p(x_d | beta): the estimate is a stochastic lower
bound (the IWAE bound of the proposal r, Burda et al. 2016), so the perplexity from it is an
upper bound in expectation of its logarithm, tight as S grows. The prior's share bounds every
weight by p(x_d | theta) / epsilon, so the estimate converges for any q; with q alone
(epsilon = 0), a logistic-normal q (Gaussian tails in the softmax basis) under the heavier
tails of a Dirichlet with alpha < 1 gives weights of infinite variance, and a gap that more
draws close only very slowly.
:func:`vi_toolkit.guides.topics.heldout_perplexity` takes q from a fitted encoder. The
unigram baseline (:func:`unigram_log_likelihood`) is one topic for every document: the
training corpus's word frequencies with add-one smoothing.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import is_validation_enabled
from scipy.optimize import linear_sum_assignment

from vi_toolkit.plates import data_plate
from vi_toolkit.specs import Rebuildable
from vi_toolkit.traces import positive_int


def check_counts(counts: torch.Tensor, name: str = "counts", V: int | None = None) -> None:
    """Raise a ValueError unless ``counts`` is a (D, V) matrix of word counts.

    Args:
        counts: the bag-of-words matrix, one document a row.
        name: the argument's name in the error message.
        V: the vocabulary size the matrix must have (None: any).

    Raises:
        ValueError: naming ``name``: not a 2-D float tensor, another vocabulary size, negative
            or fractional entries, or a document without words.
    """
    if not isinstance(counts, torch.Tensor) or counts.dim() != 2:
        shape = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise ValueError(f"{name} must be a (num_docs, vocab) count matrix, got {shape}")
    if V is not None and counts.shape[1] != V:
        raise ValueError(f"{name} has a vocabulary of {counts.shape[1]} words, the model has {V}")
    if not counts.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of counts, got dtype {counts.dtype}")
    if bool((counts < 0).any()) or bool((counts != counts.round()).any()):
        raise ValueError(f"{name} must hold non-negative whole numbers (word counts)")
    empty = (counts.sum(-1) == 0).nonzero()
    if len(empty):
        raise ValueError(f"{name}: document {int(empty[0])} has no words (drop empty documents)")


class LatentDirichletAllocation(Rebuildable):
    """LDA with ``K`` topics on a vocabulary of ``V`` words; ``model(counts, num_data)`` is the program.

    Sites: ``topic_words`` (K, V), the topics beta, in the plate ``topics``;
    ``topic_proportions`` (D, K), theta, in the data plate; ``counts``, the observed rows.
    """

    def __init__(self, K: int, V: int, *, alpha: float | None = None, eta: float = 0.1):
        """Declare the model and its priors.

        Args:
            K: the number of topics (>= 2).
            V: the vocabulary size (>= 2).
            alpha: the topic proportions' symmetric Dirichlet concentration (default 1/K).
            eta: the topics' symmetric Dirichlet concentration.

        Raises:
            ValueError: naming the bad argument.
        """
        for value, label in ((K, "K (the number of topics)"), (V, "V (the vocabulary size)")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise ValueError(f"{label} must be an integer >= 2, got {value!r}")
        alpha = 1.0 / K if alpha is None else alpha
        for value, label in ((alpha, "alpha"), (eta, "eta")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{label} (a Dirichlet concentration) must be a positive number, got {value!r}")
        self.K, self.V, self.alpha, self.eta = K, V, float(alpha), float(eta)

    def __repr__(self):
        return f"LatentDirichletAllocation(K={self.K}, V={self.V}, alpha={self.alpha:g}, eta={self.eta:g})"

    def check(self, counts: torch.Tensor, name: str = "counts") -> None:
        """Raise a ValueError unless ``counts`` is a (D, V) count matrix for this model (:func:`check_counts`)."""
        check_counts(counts, name, self.V)

    def model(self, counts: torch.Tensor, num_data: int | None = None) -> None:
        """The Pyro program p(x, theta, beta) of the module docstring, the words' topics summed out."""
        if is_validation_enabled():  # the checks read values back from the device
            self.check(counts)
        with pyro.plate("topics", self.K, dim=-1):
            beta = pyro.sample("topic_words", dist.Dirichlet(counts.new_full((self.V,), self.eta)))
        with data_plate(counts, num_data, dim=-1):
            theta = pyro.sample("topic_proportions", dist.Dirichlet(counts.new_full((self.K,), self.alpha)))
            # the log-density reads N_d from each row; total_count only bounds the support
            words = dist.Multinomial(int(counts.sum(-1).max()), probs=theta @ beta)
            pyro.sample("counts", words, obs=counts)

    @torch.no_grad()
    def log_likelihood(self, counts: torch.Tensor, topics: torch.Tensor, proposal=None, *,
                       num_samples: int = 1000, defensive: float = 0.1, seed: int = 0,
                       chunk_size: int = 100) -> torch.Tensor:
        """Importance-sampled log p(x_d | beta) of each document at the topics ``topics`` (module docstring).

        Args:
            counts: (D, V) the documents.
            topics: (K, V) the topics beta, rows on the simplex.
            proposal: q(theta_d | x_d), a distribution of batch shape (D,) and event shape (K,)
                (the guide's, :func:`vi_toolkit.guides.topics.heldout_perplexity`); its draws
                are cast to float64 and its density evaluated at every draw. None: the
                prior alone (epsilon = 1).
            num_samples: S, the draws per document.
            defensive: epsilon, the prior's share of the proposal, in (0, 1].
            seed: seeds the draws (torch's global generator is left as it was).
            chunk_size: draws held in memory at a time.

        Returns:
            (D,) float64 estimates on the CPU, each a stochastic lower bound of log p(x_d | beta).

        Raises:
            ValueError: for counts or topics that do not fit the model, or an argument out of range.
        """
        self.check(counts)
        if tuple(topics.shape) != (self.K, self.V) or bool((topics < 0).any()):
            raise ValueError(f"topics must be ({self.K}, {self.V}) non-negative rows, got shape {tuple(topics.shape)}")
        positive_int(num_samples, "num_samples")
        positive_int(chunk_size, "chunk_size")
        if not 0 < defensive <= 1:
            raise ValueError(f"defensive (the prior's share of the proposal) must be in (0, 1], got {defensive!r}")
        x = counts.detach().double().cpu()
        # each document's distinct words: its M largest counts (the zeros beyond contribute nothing)
        cnt, words = x.topk(int((x > 0).sum(-1).max()), dim=-1)
        topics_of_words = topics.detach().double().cpu().T[words]  # (D, M, K)
        prior = dist.Dirichlet(x.new_full((self.K,), self.alpha))
        log_w = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, num_samples, chunk_size):
                size = (min(chunk_size, num_samples - start), len(x))
                theta = prior.sample(size)
                log_prior = prior.log_prob(theta)
                log_r = log_prior
                if proposal is not None and defensive < 1:
                    draw = proposal.sample(size[:1])
                    from_q = torch.rand(size) >= defensive
                    theta = torch.where(from_q.unsqueeze(-1), draw.double().cpu(), theta)
                    log_prior = prior.log_prob(theta)
                    log_q = proposal.log_prob(theta.to(draw)).double().cpu()
                    log_r = torch.logaddexp(math.log1p(-defensive) + log_q, math.log(defensive) + log_prior)
                probs = torch.einsum("sdk,dmk->sdm", theta, topics_of_words)
                log_lik = torch.where(cnt > 0, cnt * probs.log(), 0.0).sum(-1)
                log_w.append(log_lik + log_prior - log_r)
        return multinomial_log_coefficient(x) + torch.cat(log_w).logsumexp(0) - math.log(num_samples)

    def simulate(self, topics: torch.Tensor, num_docs: int, doc_length: float, *,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw a corpus from the model with topic-word distributions ``topics``.

        Args:
            topics: (K, V) rows on the simplex.
            num_docs: documents to draw.
            doc_length: the mean document length; N_d ~ 1 + Poisson(doc_length - 1).
            seed: seeds the draws (NumPy's generator; torch's global one is left alone).

        Returns:
            ``(counts, theta)``: the (num_docs, V) count matrix and the (num_docs, K)
            proportions, of the dtype of ``topics``.

        Raises:
            ValueError: if ``topics`` is not (K, V) or ``doc_length`` < 1.
        """
        if tuple(topics.shape) != (self.K, self.V):
            raise ValueError(f"topics must have shape ({self.K}, {self.V}), got {tuple(topics.shape)}")
        if not doc_length >= 1:
            raise ValueError(f"doc_length must be >= 1, got {doc_length!r}")
        rng = np.random.default_rng(seed)
        theta = rng.dirichlet(np.full(self.K, self.alpha), size=num_docs)
        probs = theta @ topics.detach().double().cpu().numpy()
        lengths = 1 + rng.poisson(doc_length - 1.0, size=num_docs)
        counts = rng.multinomial(lengths, probs / probs.sum(-1, keepdims=True))
        return torch.as_tensor(counts, dtype=topics.dtype), torch.as_tensor(theta, dtype=topics.dtype)


def multinomial_log_coefficient(counts: torch.Tensor) -> torch.Tensor:
    """log C(x_d) = log N_d! - sum_v log x_dv! per document, shape (D,)."""
    return torch.lgamma(counts.sum(-1) + 1) - torch.lgamma(counts + 1).sum(-1)


def perplexity(counts: torch.Tensor, log_likelihood: torch.Tensor) -> float:
    """exp(-sum_d (log p(x_d) - log C(x_d)) / sum_d N_d): the per-word perplexity of a corpus.

    Args:
        counts: (D, V) the documents.
        log_likelihood: (D,) log p(x_d) of each count vector (the model's Multinomial), or a
            lower bound of it (then the result is an upper bound of the perplexity).

    Returns:
        The perplexity.

    Raises:
        ValueError: if ``counts`` is not a count matrix or ``log_likelihood`` has not one value
            a document.
    """
    check_counts(counts)
    log_likelihood = torch.as_tensor(log_likelihood, dtype=torch.float64).reshape(-1).cpu()
    if log_likelihood.numel() != counts.shape[0]:
        raise ValueError(f"log_likelihood has {log_likelihood.numel()} values for {counts.shape[0]} documents")
    counts = counts.detach().double().cpu()
    log_words = log_likelihood - multinomial_log_coefficient(counts)
    return math.exp(-float(log_words.sum() / counts.sum()))


def unigram_log_likelihood(train_counts: torch.Tensor, counts: torch.Tensor, *,
                           smoothing: float = 1.0) -> torch.Tensor:
    """log p(x_d) per document (D,) under one topic: the training frequencies plus ``smoothing``.

    Args:
        train_counts: (D_train, V) the corpus the frequencies come from.
        counts: (D, V) the documents to score.
        smoothing: the pseudo-count added to every word (add-one by default).

    Returns:
        log C(x_d) + sum_v x_dv log p_v, with p_v = (n_v + smoothing) / (n + V smoothing).

    Raises:
        ValueError: for matrices that are not count matrices over one vocabulary, or a
            smoothing that is not positive.
    """
    check_counts(train_counts, "train_counts")
    check_counts(counts, V=train_counts.shape[1])
    if not smoothing > 0:
        raise ValueError(f"smoothing must be positive, got {smoothing!r}")
    freq = train_counts.detach().double().cpu().sum(0) + smoothing
    counts = counts.detach().double().cpu()
    return multinomial_log_coefficient(counts) + counts @ (freq / freq.sum()).log()


def match_topics(estimated: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each true topic with a distinct estimated one, maximising the total cosine similarity.

    The pairing is the Hungarian assignment (``scipy.optimize.linear_sum_assignment``) on the
    cosine similarities of the rows.

    Args:
        estimated: (K_est, V) topic-word distributions, K_est >= K.
        true: (K, V) the topics to recover.

    Returns:
        ``(index, cosine)``: for each true topic k the estimated topic ``index[k]`` matched to
        it and their cosine similarity ``cosine[k]``.

    Raises:
        ValueError: if the matrices are not over one vocabulary or ``estimated`` has fewer rows.
    """
    if estimated.dim() != 2 or true.dim() != 2 or estimated.shape[1] != true.shape[1]:
        raise ValueError(f"estimated and true must be (K, V) matrices over one vocabulary, got "
                         f"{tuple(estimated.shape)} and {tuple(true.shape)}")
    if estimated.shape[0] < true.shape[0]:
        raise ValueError(f"estimated has {estimated.shape[0]} topics, fewer than the {true.shape[0]} true ones")
    estimated, true = estimated.detach().double().cpu(), true.detach().double().cpu()
    cosine = (true / true.norm(dim=-1, keepdim=True)) @ (estimated / estimated.norm(dim=-1, keepdim=True)).T
    rows, cols = linear_sum_assignment(-cosine.numpy())
    return torch.as_tensor(cols), cosine[rows, cols]
