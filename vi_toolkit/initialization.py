"""Data-driven starting points for the classic models' guides.

* :func:`kmeans_init`: a Gaussian mixture's weights, means and scales from k-means
  (scikit-learn's ``KMeans``: the best of ``n_init`` runs from k-means++ seedings by
  within-cluster sum of squares), so a fit does not depend on a lucky draw;
* :func:`hmm_init`: an HMM's initial distribution pi uniform, transitions A = 0.5 I + 0.5/K
  (states persist); Gaussian emissions from k-means on all observed steps, categorical ones
  from the overall frequencies of the codes, each state's perturbed by a seeded Dirichlet
  draw so that no two states start equal.
"""

import numpy as np
import torch
from sklearn.cluster import KMeans

from .models.hmm import length_mask


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
