"""Fitting recipes for the classic models: restarts, model selection, sensible defaults.

* :func:`fit_gmm`: a Gaussian mixture (``vi_toolkit.models.gmm``) from ``restarts`` k-means++
  initialisations (:func:`vi_toolkit.initialization.kmeans_init`), keeping the best ELBO; the
  MAP guide by L-BFGS (the objective is deterministic), the mean-field guide by Adam;
* :func:`select_K`: K = 1..Kmax, each scored on held-out data, K chosen by the one-SE rule;
* :func:`fit_hmm`: an HMM (``vi_toolkit.models.hmm``) by MAP from ``restarts``
  initialisations (:func:`vi_toolkit.initialization.hmm_init`), L-BFGS to a relative tolerance;
* :func:`fit_discriminant`: linear discriminant analysis (``vi_toolkit.models.discriminant``)
  by MAP, supervised, unsupervised or semi-supervised;
* :func:`fit_bayesnet`: a discrete Bayesian network's CPTs (``vi_toolkit.models.bayesnet``) by MAP;
* :func:`fit_lda`: latent Dirichlet allocation (``vi_toolkit.models.topics``) with the amortized
  encoder of ``vi_toolkit.guides.topics``, from k-means topics
  (:func:`vi_toolkit.initialization.topics_init`), by Adam on minibatches of documents with a
  KL warm-up (``vi_toolkit.schedules.KLAnnealing``).

Each keeps the best training ELBO of its restarts (:func:`best_of`): with latent classes,
states or topics the likelihood has several local maxima, as for EM.
"""

import math
import warnings

import torch

from .engine import fit
from .errors import DivergenceError
from .guides import bayesnet as bayesnet_guides
from .guides import discriminant as discriminant_guides
from .guides.gmm import GUIDES
from .guides.hmm import MAPGuide as HMMMAPGuide
from .guides.topics import TOPIC_GUIDES, TopicEncoder
from .initialization import bayesnet_init, discriminant_init, hmm_init, kmeans_init, topics_init
from .models.bayesnet import BayesianNetwork
from .models.discriminant import LinearDiscriminant
from .models.gmm import GaussianMixture
from .models.topics import LatentDirichletAllocation
from .schedules import KLAnnealing
from .traces import positive_int

# the MAP objective is deterministic: L-BFGS converges in tens of steps where Adam takes
# hundreds; the mean-field ELBO is a Monte Carlo estimate, so Adam
FIT_DEFAULTS = {"map": {"optimizer": "lbfgs", "lr": 1.0, "num_steps": 50, "tol_rel_obj": 1e-7},
                "meanfield": {"optimizer": "adam", "lr": 0.05, "num_steps": 800}}


def best_of(restarts, seed, make_guide, model, data, **options):
    """``(result, guide)`` of the best training ELBO among fits from ``make_guide(seed + r)``,
    r = 0 .. restarts - 1, each fit seeded ``seed + r``; ``options`` go to :func:`vi_toolkit.fit`."""
    best = None
    for r in range(positive_int(restarts, "restarts")):
        guide = make_guide(seed + r)
        result = fit(model, guide, data, seed=seed + r, **options)
        if best is None or result.elbo > best[0].elbo:
            best = (result, guide)
    return best


def fit_gmm(mixture, x, *, guide="map", restarts=1, seed=0, val_x=None, **options):
    """Fit ``mixture`` to ``x`` from ``restarts`` k-means++ initialisations; keep the best ELBO.

    Returns ``(result, guide)``; ``guide.point_estimate(result)`` gives theta_hat. Other
    keyword ``options`` go to :func:`vi_toolkit.fit` (defaults: ``FIT_DEFAULTS[guide]``).
    """
    mixture.check(x)
    if val_x is not None:
        mixture.check(val_x, "val_x")
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {sorted(GUIDES)}, got {guide!r}")
    options = {"progress": False, **FIT_DEFAULTS[guide], **options}
    return best_of(restarts, seed, lambda s: GUIDES[guide](mixture, kmeans_init(x, mixture.K, seed=s)),
                   mixture.model, x, val_data=val_x, **options)


def select_K(x, val_x, Kmax, *, covariance="diag", **options):
    """Fit K = 1..Kmax; per K the training ELBO and the held-out log-likelihood per point.

    Returns a dict of lists ``K``, ``elbo``, ``heldout_loglik`` (exact, at theta_hat) and
    ``heldout_se`` (its standard error over the held-out points), ``fits`` (the
    ``(mixture, result, guide)`` of each K) and ``chosen_K``: the smallest K whose held-out
    log-likelihood is within one standard error of the best (the one-SE rule: a larger
    K must beat it by more than the noise of the held-out estimate). A K whose fit diverges
    (:class:`~vi_toolkit.DivergenceError`: a component collapsing onto a few points drives its
    scales to 0 or infinity) is left out of the choice with a warning that names it: its
    ``elbo`` and held-out figures are NaN, its ``fits`` entry is ``None``, and ``diverged`` maps
    it to the error's message; ``ValueError`` if every K diverged.
    """
    if not isinstance(Kmax, int) or Kmax < 1:
        raise ValueError(f"Kmax must be an integer >= 1, got {Kmax!r}")
    curve = {"K": [], "elbo": [], "heldout_loglik": [], "heldout_se": [], "fits": [], "diverged": {}}
    for K in range(1, Kmax + 1):
        mixture = GaussianMixture(K, x.shape[-1], covariance)
        curve["K"].append(K)
        try:
            result, guide = fit_gmm(mixture, x, **options)
        except DivergenceError as err:
            warnings.warn(f"select_K: the fit of K = {K} diverged and is left out of the choice: {err}",
                          stacklevel=2)
            curve["diverged"][K] = str(err)
            for key in ("elbo", "heldout_loglik", "heldout_se"):
                curve[key].append(math.nan)
            curve["fits"].append(None)
            continue
        heldout = mixture.log_likelihood(val_x, guide.point_estimate(result))
        curve["elbo"].append(result.elbo)
        curve["heldout_loglik"].append(float(heldout.mean()))
        curve["heldout_se"].append(float(heldout.std() / len(heldout) ** 0.5))
        curve["fits"].append((mixture, result, guide))
    fitted = [i for i in range(Kmax) if curve["fits"][i] is not None]
    if not fitted:
        raise ValueError(f"select_K: the fit of every K = 1..{Kmax} diverged: {curve['diverged'][Kmax]}")
    best = max(fitted, key=lambda i: curve["heldout_loglik"][i])
    threshold = curve["heldout_loglik"][best] - curve["heldout_se"][best]
    curve["chosen_K"] = next(K for K, ll in zip(curve["K"], curve["heldout_loglik"]) if ll >= threshold)  # NaN is never >=
    return curve


def fit_hmm(hmm, sequences, lengths, *, seed=0, restarts=1, optimizer="lbfgs", lr=1.0,
            num_steps=30, tol_rel_obj=1e-7, **options):
    """MAP fit of ``hmm`` from ``restarts`` initialisations (:func:`hmm_init`); the best ELBO.

    L-BFGS suits the deterministic MAP objective; the fit stops when the ELBO changes by
    less than ``tol_rel_obj`` (relative) between steps. Returns ``(result, guide)``;
    ``guide.point_estimate(result)`` gives theta_hat. ``options`` go to :func:`vi_toolkit.fit`.
    """
    options.setdefault("progress", False)
    return best_of(restarts, seed, lambda s: HMMMAPGuide(hmm, hmm_init(hmm, sequences, lengths, seed=s)),
                   hmm.model, (sequences, lengths), optimizer=optimizer, lr=lr, num_steps=num_steps,
                   tol_rel_obj=tol_rel_obj, **options)


# the MAP objective of a model whose discrete latents are summed out is deterministic and smooth:
# full-batch L-BFGS, whose every step (up to 20 line-searched iterations) is worth a convergence
# check (log_every=1: 4 to 6 steps, not 20); fit_discriminant and fit_bayesnet start from it
LBFGS_MAP_DEFAULTS = {"optimizer": "lbfgs", "lr": 1.0, "num_steps": 100, "tol_rel_obj": 1e-8, "progress": False,
                      "options": {"log_every": 1}}


def fit_discriminant(lda: LinearDiscriminant, data: tuple, *, restarts: int = 1, seed: int = 0,
                     val_data: tuple | None = None, **options) -> tuple:
    """Fit ``lda`` by MAP to ``data = (x, y, labelled)``; keep the best ELBO of ``restarts`` fits.

    Args:
        lda: the model.
        data: ``(x, y, labelled)``, as ``vi_toolkit.models.discriminant.label_data`` builds it.
        restarts: fits from the k-means seedings ``seed``, ``seed + 1``, ...; they differ only
            where some class has no labelled point, so otherwise one fit is made.
        seed: the first seed (of k-means and of the fit).
        val_data: held-out data of the same structure.
        **options: passed to :func:`vi_toolkit.fit` (defaults: ``LBFGS_MAP_DEFAULTS``).

    Returns:
        ``(result, guide)``; ``guide.point_estimate(result)`` gives theta_hat.

    Raises:
        ValueError: if ``data`` or ``val_data`` is not such a tuple or does not fit ``lda``, or
            ``restarts`` is not a positive integer.
    """
    for value, name in ((data, "data"), (val_data, "val_data")):
        if value is not None and (not isinstance(value, tuple) or len(value) != 3):
            raise ValueError(f"{name} must be the tuple (x, y, labelled) of label_data")
    lda.check(*data)
    if val_data is not None:
        lda.check(*val_data, name="val_data[0]")
    positive_int(restarts, "restarts")
    _, y, labelled = data
    if bool(torch.bincount(y[labelled], minlength=lda.K).all()):
        restarts = 1  # the initialisation does not depend on the seed
    options = {**LBFGS_MAP_DEFAULTS, **options}
    return best_of(restarts, seed, lambda s: discriminant_guides.MAPGuide(lda, discriminant_init(lda, *data, seed=s)),
                   lda.model, data, val_data=val_data, **options)


def fit_bayesnet(net: BayesianNetwork, data: dict, *, restarts: int = 1, seed: int = 0,
                 val_data: dict | None = None, **options) -> tuple:
    """Fit ``net``'s CPTs by MAP to ``data`` (the observed nodes); keep the best of ``restarts`` fits.

    Args:
        net: the network.
        data: ``{name: (N,) integer tensor}`` for exactly the observed nodes.
        restarts: fits from the initialisations ``bayesnet_init(net, seed=seed + r)``.
        seed: the first seed (of the initialisation and of the fit).
        val_data: held-out data of the same structure.
        **options: passed to :func:`vi_toolkit.fit` (defaults: ``LBFGS_MAP_DEFAULTS``).

    Returns:
        ``(result, guide)``; ``guide.point_estimate(result)`` gives the CPTs.

    Raises:
        ValueError: naming the node, if the data do not fit ``net``; or if ``restarts`` is not
            a positive integer.
    """
    net.check(data)
    if val_data is not None:
        net.check(val_data)
    options = {**LBFGS_MAP_DEFAULTS, **options}
    return best_of(restarts, seed, lambda s: bayesnet_guides.MAPGuide(net, bayesnet_init(net, seed=s)),
                   net.model, data, val_data=val_data, **options)


# Adam on minibatches of documents, the learning rate decaying on a cosine so that the last
# iterate does not jitter at the noise floor of the gradient
LDA_DEFAULTS = {"optimizer": "adam", "lr": 0.01, "batch_size": 100, "lr_schedule": "cosine", "num_particles": 1,
                "progress": False}
LDA_EPOCHS = 100


def fit_lda(lda: LatentDirichletAllocation, counts: torch.Tensor, *, topics: str = "map", restarts: int = 1,
            seed: int = 0, val_counts: torch.Tensor | None = None, hidden: tuple = (100,), warmup: float = 1 / 3,
            **options) -> tuple:
    """Fit ``lda`` to ``counts`` with a ``TopicEncoder`` guide and a KL warm-up; the best of ``restarts``.

    At the start q(theta_d | x_d) is the prior's approximation for every document, and the
    expected likelihood is then highest with every topic equal to the corpus's word
    frequencies; with the full KL term a fit can stay near there (the encoder gains too
    little from telling documents apart). The warm-up (``KLAnnealing``) weights the KL terms
    by beta, rising from 0 to 1 over the first ``warmup`` of the steps, so that the encoder
    commits first and the topics separate; the ELBO is the model's again after it.

    Args:
        lda: the model.
        counts: (D, V) the training documents.
        topics: ``"map"`` or ``"meanfield"``, the guide's factor of the topics (with
            ``"meanfield"`` the fit's ELBO is ``"meanfield"``: the Dirichlet KL analytic).
        restarts: fits from the k-means seedings and network initialisations ``seed``,
            ``seed + 1``, ...; the best training ELBO is kept.
        seed: the first seed (of k-means, of the encoder's initial weights and of the fit).
        val_counts: held-out documents whose ELBO per document is recorded each epoch.
        hidden: the encoder's hidden layer sizes.
        warmup: the fraction of the steps over which beta rises to 1, in [0, 1) (0: none).
        **options: passed to :func:`vi_toolkit.fit` (defaults: ``LDA_DEFAULTS`` and
            ``LDA_EPOCHS`` epochs; the batch size is at most the number of documents; the
            warm-up runs before any ``callbacks`` given).

    Returns:
        ``(result, guide)``; ``guide.topic_words(result)`` are the fitted topics.

    Raises:
        ValueError: for counts that do not fit the model, an unknown ``topics``, or a
            ``warmup`` or ``restarts`` out of range.
    """
    lda.check(counts)
    if val_counts is not None:
        lda.check(val_counts, "val_counts")
    if topics not in TOPIC_GUIDES:
        raise ValueError(f"topics must be one of {TOPIC_GUIDES}, got {topics!r}")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup (a fraction of the steps) must be in [0, 1), got {warmup!r}")
    options = {**LDA_DEFAULTS, "elbo": "meanfield" if topics == "meanfield" else "trace", **options}
    options["batch_size"] = min(options["batch_size"] or len(counts), len(counts))
    if options.get("num_steps") is None:
        options.setdefault("num_epochs", LDA_EPOCHS)
    if warmup > 0:
        steps = options.get("num_steps") or options["num_epochs"] * -(-len(counts) // options["batch_size"])
        annealing = KLAnnealing(max(1, round(warmup * steps)))
        options["callbacks"] = [annealing, *options.get("callbacks", ())]

    def make_guide(s):
        with torch.random.fork_rng(devices=[]):  # the network's initial weights, seeded
            torch.manual_seed(s)
            return TopicEncoder(lda, topics=topics, hidden=hidden, init=topics_init(counts, lda.K, seed=s))

    return best_of(restarts, seed, make_guide, lda.model, counts, val_data=val_counts, **options)
