"""Guides for ``vi_toolkit.models.topics.LatentDirichletAllocation``: Srivastava & Sutton's (2017)
amortized logistic-normal encoder for the topic proportions, and a point mass or a Dirichlet
for the topics::

    q(beta, theta | X) = prod_k q(beta_k) prod_d q(theta_d | x_d).

**The softmax basis** (MacKay 1998). Topic proportions are written theta = softmax(h),
h in R^K. :func:`logistic_normal` is the distribution of theta when h ~ N(mu, diag s^2):
theta depends on h only through u = h_{1:K-1} - h_K ~ N(mu_{1:K-1} - mu_K,
diag s_{1:K-1}^2 + s_K^2 1 1^T), and u -> theta = softmax(u, 0) (:class:`SoftmaxCentred`) is
a bijection onto the simplex with ``|det d theta_{1:K-1} / du|`` = prod_{k=1}^K theta_k, so
the density of theta is exact, on the same measure as the Dirichlet's. The Dirichlet
Dir(alpha) written in this basis has its mode at h_k = log alpha_k - 1/K sum_l log alpha_l,
and its Laplace approximation there (:func:`laplace_approximation`; Srivastava & Sutton
2017, eq. 3, the logistic-normal approximation to the Dirichlet) has the covariance
P diag(1/alpha) P (P = I - 1 1^T / K), whose diagonal is::

    s_k^2 = (1/alpha_k) (1 - 2/K) + 1/K^2 sum_l 1/alpha_l.

* **Topic proportions**, amortized: q(theta_d | x_d) = ``logistic_normal(mu(x_d), s(x_d))`` with::

      (mu(x), log(s(x) - 10^-3)) = (mu_0, log s_0) + NN_phi(log(1 + x)),

  (mu_0, s_0) the Laplace approximation of the prior Dir(alpha 1_K) and the network's last
  layer started at zero, so that q starts at the prior's logistic-normal approximation. The
  density of q is exact, so the ELBO is LDA's own, its Dirichlet prior kept (the KL term of
  theta_d a one-draw Monte Carlo estimate) where ProdLDA replaces the prior by its Laplace
  approximation to make that KL analytic.
* **Topics**, ``topics="map"``: q(beta_k) = delta(beta_k - softmax(l_k)), the MAP estimate in
  the softmax basis: the point mass carries the log density -sum_v log beta_kv, the log
  Jacobian of the softmax, so the ELBO is sum_d ELBO_d(beta) + sum_kv eta log beta_kv, whose
  maximum exists for every eta > 0 (the mode in simplex coordinates, with (eta - 1), needs
  eta >= 1). ``topics="meanfield"``: q(beta_k) = Dir(lambda_k), LDA's classic variational
  family (Blei et al. 2003), reparameterized by implicit gradients of the Gamma draws; its
  KL to the prior is analytic under ``fit(..., elbo="meanfield")``. lambda_k starts at
  eta + n_k b_k, the Dirichlet posterior of a topic b_k (:func:`vi_toolkit.initialization.topics_init`)
  that holds n_k = (words of the corpus) / K words.

:func:`heldout_perplexity` is the held-out perplexity of a fit at its topics, estimated by
``LatentDirichletAllocation.log_likelihood`` with the encoder's q(theta_d | x_d) as the
proposal (mixed with the prior; an upper bound, see ``vi_toolkit.models.topics``).
:func:`vi_toolkit.recipes.fit_lda` fits a model with either guide, with a KL warm-up.
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints
from torch.distributions.transforms import Transform
from torch.distributions.utils import clamp_probs

from vi_toolkit.initialization import topics_init
from vi_toolkit.models.topics import LatentDirichletAllocation, perplexity
from vi_toolkit.networks import Encoder
from vi_toolkit.plates import data_plate
from vi_toolkit.specs import Rebuildable

TOPIC_GUIDES = ("map", "meanfield")
# a floor on s(x): a fast Adam step can otherwise drive a scale to 1e-14 and the density to
# NaN; the posterior sd of a logit is far above it for documents of fewer than 10^5 words
MIN_SCALE = 1e-3


class SoftmaxCentred(Transform):
    """u in R^{K-1} -> theta = softmax(u_1, ..., u_{K-1}, 0) on the simplex (a bijection).

    ``log |det d theta_{1:K-1} / du|`` = sum_{k=1}^K log theta_k. theta is clamped away from 0
    and 1 (as torch's own simplex transforms do), so the transform caches its last input
    (``cache_size=1``): the density of a draw is then taken at the u it came from, not at
    the inverse of its clamped theta.
    """

    domain = constraints.real_vector
    codomain = constraints.simplex
    bijective = True

    def __init__(self, cache_size: int = 1):
        super().__init__(cache_size=cache_size)

    def __eq__(self, other):
        return isinstance(other, SoftmaxCentred)

    def with_cache(self, cache_size: int = 1) -> "SoftmaxCentred":
        return self if self._cache_size == cache_size else SoftmaxCentred(cache_size)

    def _call(self, u):
        theta = clamp_probs(torch.cat([u, u.new_zeros(u.shape[:-1] + (1,))], -1).softmax(-1))
        return theta / theta.sum(-1, keepdim=True)

    def _inverse(self, theta):
        log_theta = theta.log()
        return log_theta[..., :-1] - log_theta[..., -1:]

    def log_abs_det_jacobian(self, u, theta):
        return torch.cat([u, u.new_zeros(u.shape[:-1] + (1,))], -1).log_softmax(-1).sum(-1)

    def forward_shape(self, shape):
        return shape[:-1] + (shape[-1] + 1,)

    def inverse_shape(self, shape):
        return shape[:-1] + (shape[-1] - 1,)


def logistic_normal(loc: torch.Tensor, scale: torch.Tensor) -> dist.TransformedDistribution:
    """The distribution of theta = softmax(h) for h ~ N(loc, diag scale^2) in R^K, its density exact.

    Args:
        loc: (..., K) means in the softmax basis, K >= 2.
        scale: (..., K) standard deviations.

    Returns:
        A reparameterized distribution on the K-simplex (event shape (K,)).
    """
    var = scale ** 2
    factor = scale[..., -1:].unsqueeze(-1).expand(var.shape[:-1] + (var.shape[-1] - 1, 1))
    base = dist.LowRankMultivariateNormal(loc[..., :-1] - loc[..., -1:], factor, var[..., :-1])
    return dist.TransformedDistribution(base, SoftmaxCentred())


def laplace_approximation(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagonal Laplace approximation of Dir(alpha) in the softmax basis (module docstring).

    Args:
        alpha: (K,) positive concentrations, K >= 2.

    Returns:
        ``(loc, scale)``: the mode h_k = log alpha_k - mean_l log alpha_l and the standard
        deviations s_k, each (K,).
    """
    K = alpha.shape[-1]
    loc = alpha.log() - alpha.log().mean(-1, keepdim=True)
    var = (1 - 2 / K) / alpha + (1 / alpha).sum(-1, keepdim=True) / K ** 2
    return loc, var.sqrt()


class TopicEncoder(Rebuildable, nn.Module):
    """The amortized guide of a :class:`~vi_toolkit.models.topics.LatentDirichletAllocation`
    (module docstring); called like the model, ``guide(counts, num_data=None)``."""

    def __init__(self, lda: LatentDirichletAllocation, *, topics: str = "map", hidden: tuple = (100,),
                 activation: str = "softplus", init: torch.Tensor | None = None):
        """Build the encoder network; the topics' parameters are created on the first call.

        Args:
            lda: the model.
            topics: ``"map"`` or ``"meanfield"``, the factor of the topics.
            hidden: the encoder network's hidden layer sizes (``vi_toolkit.networks.Encoder``).
            activation: its activation.
            init: (K, V) initial topics (:func:`vi_toolkit.initialization.topics_init`'s);
                None: ``topics_init`` of the documents of the first call.

        Raises:
            ValueError: for an unknown ``topics`` or an ``init`` of the wrong shape.
        """
        super().__init__()
        if topics not in TOPIC_GUIDES:
            raise ValueError(f"topics must be one of {TOPIC_GUIDES}, got {topics!r}")
        if init is not None and tuple(init.shape) != (lda.K, lda.V):
            raise ValueError(f"init must have shape ({lda.K}, {lda.V}), got {tuple(init.shape)}")
        self.lda, self.topics, self.init = lda, topics, init
        self.encoder = Encoder(lda.V, lda.K, hidden=hidden, activation=activation, heads=2)
        last = self.encoder.body[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        loc, scale = laplace_approximation(torch.full((lda.K,), lda.alpha))
        self.register_buffer("prior_loc", loc)
        self.register_buffer("prior_log_scale", scale.log())

    def initial_topics(self, counts: torch.Tensor) -> torch.Tensor:
        """``init`` (clamped away from 0), or :func:`topics_init` of ``counts`` (computed once and kept)."""
        if self.init is None:
            self.init = topics_init(counts, self.lda.K)
        return clamp_probs(self.init.to(counts))

    def encode(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu(x), s(x)), each (D, K): q(theta_d | x_d) in the softmax basis."""
        offset_loc, offset_log_scale = self.encoder(counts.log1p())
        return self.prior_loc + offset_loc, (self.prior_log_scale + offset_log_scale).exp() + MIN_SCALE

    def forward(self, counts: torch.Tensor, num_data: int | None = None) -> None:
        """The Pyro program q(beta) prod_d q(theta_d | x_d)."""
        pyro.module("encoder", self.encoder)
        with pyro.plate("topics", self.lda.K, dim=-1):
            if self.topics == "map":
                logits = pyro.param("topic_words_logits", lambda: self.initial_topics(counts).log())
                log_beta = logits.log_softmax(-1)
                pyro.sample("topic_words", dist.Delta(log_beta.exp(), log_density=-log_beta.sum(-1), event_dim=1))
            else:
                def start():  # the Dirichlet posterior of the initial topics, each 1/K of the words
                    words = counts.sum() * (len(counts) if num_data is None else num_data) / len(counts)
                    return self.lda.eta + words / self.lda.K * self.initial_topics(counts)

                lam = pyro.param("topic_words_concentration", start, constraint=constraints.positive)
                pyro.sample("topic_words", dist.Dirichlet(lam))
        with data_plate(counts, num_data, dim=-1):
            pyro.sample("topic_proportions", logistic_normal(*self.encode(counts)))

    def topic_words(self, result) -> torch.Tensor:
        """The fitted topics (K, V) of a fit of this guide (a ``vi_toolkit.FitResult``), on the CPU:
        softmax(l) of the point mass, E_q[beta] = lambda / sum lambda of the Dirichlet."""
        p = result.params
        if self.topics == "map":
            return p["topic_words_logits"].softmax(-1).cpu()
        lam = p["topic_words_concentration"].cpu()
        return lam / lam.sum(-1, keepdim=True)

    def proposal(self, result, counts: torch.Tensor) -> dist.TransformedDistribution:
        """q(theta_d | x_d) of each document under a fit of this guide, in float64 on the CPU.

        Args:
            result: the ``vi_toolkit.FitResult`` whose encoder weights to use.
            counts: (D, V) the documents.

        Returns:
            The logistic normal of batch shape (D,) and event shape (K,).

        Raises:
            ValueError: if ``counts`` is not a count matrix for the model.
        """
        self.lda.check(counts)
        with result.scope(), torch.no_grad():
            loc, scale = self.encode(counts.to(result.device))
        return logistic_normal(loc.double().cpu(), scale.double().cpu())

    def topic_proportions(self, result, counts: torch.Tensor, *, num_samples: int = 100) -> torch.Tensor:
        """E_q[theta_d | x_d] per document (D, K) under a fit of this guide, by ``num_samples`` draws.

        Args:
            result: the ``vi_toolkit.FitResult`` whose encoder weights to use.
            counts: (D, V) the documents.
            num_samples: draws of theta_d per document.

        Returns:
            The (D, K) means, on the CPU.

        Raises:
            ValueError: if ``counts`` is not a count matrix for the model.
        """
        with torch.no_grad():
            return self.proposal(result, counts).sample((num_samples,)).mean(0).float()

    def point_estimate(self, result) -> dict:
        """``{"topic_words": beta_hat}`` (:meth:`topic_words`), as the other classic guides' ``point_estimate``."""
        return {"topic_words": self.topic_words(result)}


def heldout_perplexity(result, counts: torch.Tensor, *, num_samples: int = 1000, defensive: float = 0.1,
                       seed: int = 0) -> float:
    """The per-word perplexity of ``counts`` at the fitted topics, an upper bound (``vi_toolkit.models.topics``).

    log p(x_d | beta_hat) is estimated by ``LatentDirichletAllocation.log_likelihood`` with
    the proposal (1 - defensive) q(theta_d | x_d) + defensive Dir(alpha), q the fitted
    encoder's and beta_hat = ``guide.topic_words(result)`` (the point mass, or E_q[beta] of
    the mean-field guide). The result is an upper bound of the perplexity in expectation of
    its logarithm, tight as ``num_samples`` grows.

    Args:
        result: a fit of ``LatentDirichletAllocation.model`` with a :class:`TopicEncoder` guide.
        counts: (D, V) the held-out documents.
        num_samples: S, the importance draws per document.
        defensive: the prior's share of the proposal, in (0, 1].
        seed: seeds the draws.

    Returns:
        The perplexity.

    Raises:
        ValueError: if the fit's guide is not a :class:`TopicEncoder`, or ``counts`` does not
            fit its model.
    """
    guide = result.guide
    if not isinstance(guide, TopicEncoder):
        raise ValueError(f"heldout_perplexity needs a fit with a TopicEncoder guide, got {type(guide).__name__}")
    log_lik = guide.lda.log_likelihood(counts, guide.topic_words(result), guide.proposal(result, counts),
                                       num_samples=num_samples, defensive=defensive, seed=seed)
    return perplexity(counts, log_lik)
