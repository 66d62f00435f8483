r"""Affinity Propagation (Frey & Dueck, Science 2007) on a precomputed similarity matrix.

Our own numpy implementation of the message-passing algorithm, with scikit-learn's conventions
(so that results match ``sklearn.cluster.AffinityPropagation(affinity="precomputed")``, which the
selective-group-update reference uses; a test checks this when scikit-learn is installed):

- preferences :math:`s(k,k)` = ``preference`` (default: the median of the similarity matrix);
- when all off-diagonal similarities are equal (always for two points) there is nothing to
  propagate: one cluster per point if the preference exceeds that similarity, else one cluster;
- a tiny seeded perturbation :math:`(\epsilon s + 100\,\mathrm{tiny})\,\mathcal N(0,1)` breaks
  ties;
- responsibilities :math:`r(i,k)\leftarrow s(i,k)-\max_{k'\ne k}(a(i,k')+s(i,k'))` and
  availabilities
  :math:`a(i,k)\leftarrow\min\big(0,r(k,k)+\sum_{i'\notin\{i,k\}}\max(0,r(i',k))\big)`,
  :math:`a(k,k)\leftarrow\sum_{i'\ne k}\max(0,r(i',k))`, both damped by ``damping``;
- converged when the exemplar set :math:`\{k: a(k,k)+r(k,k)>0\}` has stayed the same for
  ``convergence_iter`` iterations and is not empty; at most ``max_iter`` iterations;
- each point joins its most similar exemplar, each cluster's exemplar is then refined to the
  member with the largest total similarity to the others, and points are assigned again.

Returns ``None`` when no exemplar emerged (the caller decides what to do: the selective-group
method retries with a longer ``convergence_iter`` and otherwise keeps its previous groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Clustering:
    """``labels[i]``: cluster of point i (0-based, in the order of the exemplars' indices);
    ``exemplars``: index of each cluster's exemplar; ``converged``: within ``max_iter``."""

    labels: np.ndarray
    exemplars: np.ndarray
    converged: bool
    iterations: int


def affinity_propagation(
    similarity: np.ndarray,
    *,
    preference: float | None = None,
    damping: float = 0.5,
    max_iter: int = 200,
    convergence_iter: int = 15,
    seed: int = 0,
) -> Clustering | None:
    """Cluster the ``n`` points of the ``n × n`` ``similarity`` matrix (see the module doc)."""
    s = np.array(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"similarity has non-finite entries:\n{s}")
    if not 0.5 <= damping < 1.0:
        raise ValueError(f"damping must be in [0.5, 1), got {damping}")
    n = s.shape[0]
    pref = float(np.median(s)) if preference is None else float(preference)
    if n == 1:
        return Clustering(np.zeros(1, dtype=int), np.zeros(1, dtype=int), True, 0)
    off_diagonal = s[~np.eye(n, dtype=bool)]
    if np.all(off_diagonal == off_diagonal[0]):
        # nothing to tell the points apart (always the case for n = 2): scikit-learn's rule,
        # one cluster per point if the preference beats the common similarity, else one cluster
        if pref > off_diagonal[0]:
            return Clustering(np.arange(n), np.arange(n), True, 0)
        return Clustering(np.zeros(n, dtype=int), np.zeros(1, dtype=int), True, 0)
    diag = np.arange(n)
    s[diag, diag] = pref
    rng = np.random.RandomState(seed)
    s += (np.finfo(np.float64).eps * s + np.finfo(np.float64).tiny * 100) * rng.standard_normal(
        size=(n, n)
    )

    avail = np.zeros((n, n))
    resp = np.zeros((n, n))
    history = np.zeros((n, convergence_iter), dtype=bool)
    converged = False
    it = 0
    for it in range(max_iter):
        # responsibilities
        total = avail + s
        best = np.argmax(total, axis=1)
        first = total[diag, best]
        total[diag, best] = -np.inf
        second = np.max(total, axis=1)
        new = s - first[:, None]
        new[diag, best] = s[diag, best] - second
        resp = damping * resp + (1.0 - damping) * new
        # availabilities
        positive = np.maximum(resp, 0.0)
        positive[diag, diag] = resp[diag, diag]
        new = np.sum(positive, axis=0)[None, :] - positive
        self_avail = new[diag, diag].copy()
        new = np.minimum(new, 0.0)
        new[diag, diag] = self_avail
        avail = damping * avail + (1.0 - damping) * new
        # convergence: the exemplar set has not changed for convergence_iter iterations
        exemplar = (np.diag(avail) + np.diag(resp)) > 0
        history[:, it % convergence_iter] = exemplar
        if it >= convergence_iter:
            count = history.sum(axis=1)
            stable = np.all((count == convergence_iter) | (count == 0))
            if stable and exemplar.sum() > 0:
                converged = True
                break
    exemplars = np.flatnonzero(exemplar)
    if exemplars.size == 0:
        return None
    labels = np.argmax(s[:, exemplars], axis=1)
    labels[exemplars] = np.arange(exemplars.size)
    for k in range(exemplars.size):  # refine each exemplar within its cluster
        members = np.flatnonzero(labels == k)
        inner = np.sum(s[np.ix_(members, members)], axis=0)
        exemplars[k] = members[np.argmax(inner)]
    labels = np.argmax(s[:, exemplars], axis=1)
    labels[exemplars] = np.arange(exemplars.size)
    centres = np.unique(exemplars[labels])
    labels = np.searchsorted(centres, exemplars[labels])
    return Clustering(labels, centres, converged, it + 1)
