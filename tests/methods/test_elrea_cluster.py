"""Clustering gradient features: recovers well-separated directions, chooses C by silhouette, deterministic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from loramix.errors import ConfigError
from loramix.methods.elrea import cluster_features


def directions(clusters: int = 4, per_cluster: int = 30, dim: int = 64, spread: float = 0.1, seed: int = 0):
    """Unit vectors scattered around `clusters` random directions; returns features `(n, dim)`, true labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=generator), dim=-1)
    labels = torch.arange(clusters).repeat_interleave(per_cluster)
    labels = labels[torch.randperm(len(labels), generator=generator)]
    noise = torch.randn(len(labels), dim, generator=generator) * spread
    scale = torch.rand(len(labels), 1, generator=generator) * 5 + 0.5  # norms must not matter
    return (centres[labels] + noise) * scale, labels


@pytest.mark.parametrize("method", ["kmeans", "birch"])
def test_recovers_separated_clusters_and_their_number(method: str):
    feats, truth = directions()
    result = cluster_features(feats, method=method, seed=0, candidates=range(2, 8))
    assert result.n_clusters == 4
    assert adjusted_rand_score(truth.numpy(), result.labels.numpy()) == 1.0
    assert result.silhouette == max(result.scores.values()) and result.silhouette > 0.5
    assert sorted(result.scores) == list(range(2, 8))
    fixed = cluster_features(feats, 4, method=method, seed=0)
    assert adjusted_rand_score(truth.numpy(), fixed.labels.numpy()) == 1.0


def test_centroids_are_normalised_means_and_labels_ordered_by_size():
    feats, _ = directions(clusters=3, per_cluster=20)
    feats = torch.cat([feats, feats[:7]])  # make the cluster sizes differ
    result = cluster_features(feats, 3, seed=0)
    torch.testing.assert_close(result.centroids.norm(dim=-1), torch.ones(3))
    sizes = result.sizes
    assert sizes.tolist() == sorted(sizes.tolist(), reverse=True) and int(sizes.sum()) == len(feats)
    unit = F.normalize(feats, dim=-1)
    for c in range(3):
        want = F.normalize(unit[result.labels == c].mean(0), dim=0)
        torch.testing.assert_close(result.centroids[c], want)
    torch.testing.assert_close(result.assign(feats), result.labels)


def test_deterministic_for_a_seed():
    feats = torch.randn(80, 16, generator=torch.Generator().manual_seed(1))  # no clear structure
    first = cluster_features(feats, seed=7, candidates=range(2, 6))
    again = cluster_features(feats, seed=7, candidates=range(2, 6))
    assert torch.equal(first.labels, again.labels)
    assert torch.equal(first.centroids, again.centroids)
    assert first.scores == again.scores


def test_rejects_bad_arguments():
    feats, _ = directions(clusters=2, per_cluster=3)
    with pytest.raises(ConfigError, match="method"):
        cluster_features(feats, 2, method="dbscan")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="candidate"):
        cluster_features(feats, candidates=[10, 20])
    with pytest.raises(ConfigError, match="n_clusters"):
        cluster_features(feats, 99)
