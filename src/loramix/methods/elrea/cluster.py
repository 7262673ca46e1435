"""Cluster examples by the direction of their gradient features (ELREA, Li et al. 2025, Sec. 3.3).

Features are L2-normalised first, so k-means' Euclidean distance is a monotone function of cosine distance
(|u - v|^2 = 2 - 2 cos(u, v)). When the number of clusters is not given, it is the candidate with the highest
silhouette score under the cosine metric (ties go to fewer clusters). Cluster ids are ordered by size, largest
first, so they are canonical for a seed: expert c + 1 of the ELREA bank is trained on cluster c.

Legend: n samples, k feature dimension, C clusters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import Birch, KMeans
from sklearn.metrics import silhouette_score
from torch import Tensor

from loramix.errors import ConfigError

Method = Literal["kmeans", "birch"]


@dataclass(frozen=True)
class Clustering:
    """The result of :func:`cluster_features`.

    labels: `(n,)` long, the cluster of each example, 0..C-1 ordered by cluster size (largest first).
    centroids: `(C, k)` fp32, the mean normalised feature of each cluster, L2-normalised.
    silhouette: the cosine silhouette score of `labels` (nan when it is undefined, e.g. C = 1).
    scores: the silhouette of every candidate tried when the number of clusters was chosen automatically.
    """

    labels: Tensor
    centroids: Tensor
    n_clusters: int
    silhouette: float
    method: str
    scores: dict[int, float] = field(default_factory=dict)

    @property
    def sizes(self) -> Tensor:
        """The number of examples in each cluster `(C,)`."""
        return torch.bincount(self.labels, minlength=self.n_clusters)

    def assign(self, features: Tensor) -> Tensor:
        """The nearest centroid (highest cosine similarity) of each row of `features` `(m, k)`: `(m,)` long."""
        sims = F.normalize(features.float(), dim=-1) @ self.centroids.to(features.device).t()  # (m, C)
        return sims.argmax(-1)


def _fit(x: np.ndarray, n_clusters: int, method: str, seed: int, n_init: int, threshold: float) -> np.ndarray:
    if method == "kmeans":
        return KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit_predict(x)
    return Birch(n_clusters=n_clusters, threshold=threshold).fit_predict(x)


def _silhouette(x: np.ndarray, labels: np.ndarray, seed: int, sample_size: int | None) -> float:
    if not 2 <= len(np.unique(labels)) < len(labels):
        return float("nan")
    size = sample_size if sample_size is not None and sample_size < len(labels) else None
    return float(silhouette_score(x, labels, metric="cosine", sample_size=size, random_state=seed))


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters by size, largest first; ties by first appearance."""
    ids, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(ids)), key=lambda j: (-counts[j], first[j]))
    mapping = np.empty(ids.max() + 1, dtype=np.int64)
    mapping[ids[order]] = np.arange(len(ids))
    return mapping[labels]


def cluster_centroids(features: Tensor, labels: Tensor, n_clusters: int) -> Tensor:
    """The L2-normalised mean of the normalised features of each cluster: `(C, k)` fp32."""
    unit = F.normalize(features.float(), dim=-1)  # (n, k)
    sums = unit.new_zeros(n_clusters, unit.shape[1]).index_add_(0, labels.to(unit.device), unit)  # (C, k)
    return F.normalize(sums, dim=-1)


def cluster_features(
    features: Tensor,
    n_clusters: int | None = None,
    *,
    method: Method = "kmeans",
    seed: int = 0,
    candidates: Iterable[int] = range(2, 11),
    n_init: int = 10,
    birch_threshold: float = 0.5,
    silhouette_sample_size: int | None = 10_000,
) -> Clustering:
    """Cluster gradient features `(n, k)`; choose the number of clusters by cosine silhouette when it is None.

    Args:
        features: one row per example (normalised here; need not be on the CPU).
        n_clusters: C; None chooses among `candidates` (those below n) by the highest silhouette score.
        method: "kmeans" (scikit-learn, `n_init` restarts, `random_state=seed`) or "birch" (deterministic).
        birch_threshold: BIRCH's subcluster radius on unit vectors (distances lie in 0..2).
        silhouette_sample_size: score on a seeded sample of this many examples (the score is O(n^2)); None: all.

    The same features and seed give the same result.

    Example:
        >>> result = cluster_features(train_features, seed=0)  # C chosen in 2..10
        >>> result.labels, result.centroids.shape  # (n,), (C, k)
    """
    if method not in ("kmeans", "birch"):
        raise ConfigError(f"method must be 'kmeans' or 'birch', got {method!r}")
    if features.dim() != 2:
        raise ConfigError(f"features must have shape (n, k), got {tuple(features.shape)}")
    n = features.shape[0]
    x = F.normalize(features.detach().double(), dim=-1).cpu().numpy()
    scores: dict[int, float] = {}
    if n_clusters is None:
        options = sorted({int(c) for c in candidates if 2 <= int(c) < n})
        if not options:
            raise ConfigError(f"no candidate number of clusters lies in 2..{n - 1} (n = {n} examples)")
        best: tuple[float, int, np.ndarray] | None = None
        for c in options:
            labels = _fit(x, c, method, seed, n_init, birch_threshold)
            score = _silhouette(x, labels, seed, silhouette_sample_size)
            scores[c] = score
            if not np.isnan(score) and (best is None or score > best[0]):
                best = (score, c, labels)
        if best is None:
            raise ConfigError("no candidate number of clusters gave a defined silhouette score")
        silhouette, chosen, labels = best
    else:
        if not 1 <= n_clusters <= n:
            raise ConfigError(f"n_clusters must lie in 1..{n} (the number of examples), got {n_clusters}")
        labels = _fit(x, n_clusters, method, seed, n_init, birch_threshold)
        silhouette = _silhouette(x, labels, seed, silhouette_sample_size)
    labels = _canonical(labels)
    count = int(labels.max()) + 1  # BIRCH may return fewer clusters than asked for
    label_tensor = torch.from_numpy(labels).long()
    centroids = cluster_centroids(features.detach().cpu(), label_tensor, count)
    return Clustering(label_tensor, centroids, count, silhouette, method, scores)
