"""Data-driven starting points for the classic models' guides.

* :func:`kmeans_init`: a Gaussian mixture's weights, means and scales from k-means
  (scikit-learn's ``KMeans``: the best of ``n_init`` runs from k-means++ seedings by
  within-cluster sum of squares), so a fit does not depend on a lucky draw;
* :func:`hmm_init`: an HMM's initial distribution pi uniform, transitions A = 0.5 I + 0.5/K
  (states persist); Gaussian emissions from k-means on all observed steps, categorical ones
  from the overall frequencies of the codes, each state's perturbed by a seeded Dirichlet
  draw so that no two states start equal;
* :func:`discriminant_init`: a linear discriminant's class locations from the labelled class
  means, classes without labels taking k-means centres farthest first from those already
  chosen; every point then gets a class (its label, or the nearest location), and the
  proportions and the pooled within-class covariance come from those classes;
* :func:`bayesnet_init`: every CPT row the mean of the uniform distribution and a seeded Dir(1)
  draw, so that no two states of a latent node start equal (equal states would be a saddle
  point the gradient never leaves).
"""

import numpy as np
import torch
from sklearn.cluster import KMeans

from .models.bayesnet import BayesianNetwork
from .models.discriminant import LinearDiscriminant
from .models.hmm import length_mask
from .models.topics import check_counts


def kmeans_init(x, K, *, seed=0, n_init=5, iterations=20, max_points=20_000):
    """Initial ``params`` for ``vi_toolkit.models.gmm`` from k-means: weights, locs, scales (and L = I).

    The centres are the best of ``n_init`` runs of k-means++ seeding and up to ``iterations``
    Lloyd steps (scikit-learn's ``KMeans``), run on a random subset of ``max_points`` points
    when there are more (the centres of a large data set are estimated as well from a subset,
    at a fraction of the cost); every point is then assigned once, and the weights and scales
    (each cluster's standard deviations, floored at 1e-3 of the data's) come from all of them.
    """
    generator = torch.Generator().manual_seed(seed)
    x = x.detach().cpu().to(torch.get_default_dtype())
    subset = x if len(x) <= max_points else x[torch.randperm(len(x), generator=generator)[:max_points]]
    kmeans = KMeans(n_clusters=K, n_init=n_init, max_iter=iterations, random_state=seed)
    kmeans.fit(subset.double().numpy())
    centres = torch.as_tensor(np.asarray(kmeans.cluster_centers_), dtype=x.dtype)
    labels = torch.cdist(x, centres).argmin(-1)
    counts = torch.bincount(labels, minlength=K).to(x.dtype).unsqueeze(-1)
    variances = torch.zeros_like(centres).index_add_(0, labels, (x - centres[labels]) ** 2)
    floor = 1e-3 * x.std(0).clamp_min(1e-12)
    scales = torch.where(counts > 1, (variances / counts.clamp_min(1)).sqrt(), x.std(0)).clamp_min(floor)
    D = x.shape[-1]
    return {"weights": (counts.squeeze(-1) + 1) / (counts + 1).sum(), "locs": centres, "scales": scales,
            "corr_cholesky": torch.eye(D).expand(K, D, D).clone()}


def hmm_init(hmm, sequences, lengths, *, seed=0):
    """Initial ``params`` for ``hmm`` from the data (see the module docstring)."""
    hmm.check(sequences, lengths)
    K = hmm.K
    observed = sequences[length_mask(lengths, sequences.shape[1])]
    init = {"initial": torch.full((K,), 1.0 / K),
            "transition": 0.5 * torch.eye(K) + 0.5 / K}
    if hmm.emission == "gaussian":
        centres = kmeans_init(observed, K, seed=seed)
        init.update(locs=centres["locs"], scales=centres["scales"])
    else:
        gen = torch.Generator().manual_seed(seed)
        freq = torch.bincount(observed.cpu(), minlength=hmm.C).to(torch.get_default_dtype()) + 1
        freq = freq / freq.sum()
        noise = -torch.rand(K, hmm.C, generator=gen).log()  # Exp(1): normalised, a Dir(1) draw
        init["emission_probs"] = freq * (noise / noise.sum(-1, keepdim=True) + 1.0 / hmm.C)
        init["emission_probs"] /= init["emission_probs"].sum(-1, keepdim=True)
    return init


def discriminant_init(lda: LinearDiscriminant, x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor,
                      *, seed: int = 0) -> dict:
    """Initial ``params`` for ``lda`` from the data (see the module docstring).

    Args:
        lda: the model.
        x, y, labelled: the data, as ``vi_toolkit.models.discriminant.label_data`` builds it.
        seed: the k-means seed (used when some class has no labelled point).

    Returns:
        ``weights``, ``locs``, ``scales`` and ``corr_cholesky`` (the identity for D = 1 too).
    """
    lda.check(x, y, labelled)
    x = x.detach().cpu().to(torch.get_default_dtype())
    y, labelled = y.cpu(), labelled.cpu()
    K, D = lda.K, lda.D
    counts = torch.bincount(y[labelled], minlength=K)
    locs = torch.zeros(K, D).index_add_(0, y[labelled], x[labelled]) / counts.clamp_min(1).unsqueeze(-1)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        centres = kmeans_init(x, K, seed=seed)["locs"]
        chosen = locs[counts > 0]
        for k in missing:  # the centre farthest from the locations chosen so far
            far = torch.cdist(centres, chosen).min(-1).values.argmax() if len(chosen) else 0
            locs[k] = centres[far]
            chosen = torch.cat([chosen, centres[far].unsqueeze(0)])
            centres = torch.cat([centres[:far], centres[far + 1:]])
    classes = torch.where(labelled, y, torch.cdist(x, locs).argmin(-1))
    n = torch.bincount(classes, minlength=K).to(x.dtype)
    residual = x - locs[classes]
    cov = residual.T @ residual / len(x) + 1e-6 * x.var(0).clamp_min(1e-12).diag()
    scales = cov.diagonal().sqrt()
    corr = cov / (scales.unsqueeze(-1) * scales)
    return {"weights": (n + 1) / (n + 1).sum(), "locs": locs, "scales": scales,
            "corr_cholesky": torch.linalg.cholesky(corr)}


def bayesnet_init(net: BayesianNetwork, *, seed: int = 0) -> dict:
    """Initial CPTs ``{name: CPT}`` for ``net`` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    init = {}
    for node in net.nodes:
        shape = net.cpt_shape(node.name)
        draw = -torch.rand(shape, generator=generator).log()  # Exp(1); normalised, a Dir(1) draw
        init[node.name] = 0.5 * (draw / draw.sum(-1, keepdim=True) + 1.0 / node.cardinality)
    return init


def topics_init(counts: torch.Tensor, K: int, *, seed: int = 0, smoothing: float = 0.5) -> torch.Tensor:
    """Initial topics (K, V) for ``vi_toolkit.models.topics``: k-means centres of word frequencies.

    The centres c_k are :func:`kmeans_init`'s on the rows x_d / N_d; each is normalised and
    mixed with the corpus's add-one frequencies f, beta_k = (1 - smoothing) c_k / sum(c_k) +
    smoothing f.

    Args:
        counts: (D, V) the training documents.
        K: the number of topics.
        seed: seeds k-means.
        smoothing: the weight of the corpus's frequencies, in (0, 1].

    Returns:
        (K, V) rows on the simplex.

    Raises:
        ValueError: for counts that are not a count matrix, or a smoothing outside (0, 1].
    """
    check_counts(counts)
    if not 0 < smoothing <= 1:
        raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}")
    counts = counts.detach().cpu().to(torch.get_default_dtype())
    centres = kmeans_init(counts / counts.sum(-1, keepdim=True), K, seed=seed)["locs"].clamp_min(0)
    freq = (counts.sum(0) + 1) / (counts.sum() + counts.shape[1])
    return (1 - smoothing) * centres / centres.sum(-1, keepdim=True).clamp_min(1e-12) + smoothing * freq
