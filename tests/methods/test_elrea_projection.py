"""CountSketch projection: keeps cosine similarities, is seeded and linear, and equals its dense-matrix form. The
sign-invariant map: a feature and its negation agree, and inner products estimate squared cosines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loramix.errors import ConfigError
from loramix.methods.elrea import CountSketch, SignInvariantMap, project_gradients


def correlated_pairs(pairs: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs `(m, P)` whose cosines spread over about -0.9..0.9, with uneven coordinate scales."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(pairs, size, generator=generator)
    noise = torch.randn(pairs, size, generator=generator)
    mix = torch.linspace(-0.9, 0.9, pairs)[:, None]
    v = mix * u + (1 - mix**2).sqrt() * noise
    scale = torch.rand(size, generator=generator) * 2 + 0.1
    return u * scale, v * scale


def test_cosine_similarities_are_kept_at_4096():
    u, v = correlated_pairs(12, 100_000)
    sketch = CountSketch(4096, seed=0)
    # two parameter tensors of one model: each has its own hash into the same buckets
    pu = sketch({"a": u[:, :60_000], "b": u[:, 60_000:]})
    pv = sketch({"a": v[:, :60_000], "b": v[:, 60_000:]})
    exact = F.cosine_similarity(u, v, dim=-1)
    sketched = (pu * pv).sum(-1)
    assert (sketched - exact).abs().max() < 0.05
    torch.testing.assert_close(pu.norm(dim=-1), torch.ones(12))


def test_seeded_and_stable():
    x = torch.randn(3, 1000)
    same = project_gradients({"w": x}, 128, seed=1)
    torch.testing.assert_close(same, project_gradients({"w": x}, 128, seed=1), rtol=0, atol=0)
    assert not torch.allclose(same, project_gradients({"w": x}, 128, seed=2))
    sketch = CountSketch(128, seed=1)
    bucket_a, _ = sketch.hash_of("a", 1000)
    bucket_b, _ = sketch.hash_of("b", 1000)
    assert not torch.equal(bucket_a, bucket_b)  # each parameter is hashed independently


def test_equals_the_implied_dense_projection_and_is_linear():
    sketch = CountSketch(16, seed=0)
    g = torch.randn(5, 3, 7)
    bucket, sign = sketch.hash_of("w", 21)
    dense = torch.zeros(21, 16)
    dense[torch.arange(21), bucket.long()] = sign.float()  # the (P, k) matrix the sketch never builds
    torch.testing.assert_close(sketch.project("w", g), g.flatten(1) @ dense)
    h = torch.randn(5, 3, 7)
    torch.testing.assert_close(
        sketch({"w": 2 * g - h}, normalize=False),
        2 * sketch({"w": g}, normalize=False) - sketch({"w": h}, normalize=False),
    )


def test_inner_products_are_unbiased_over_seeds():
    u, v = correlated_pairs(1, 2000, seed=3)
    dots = torch.stack(
        [
            (CountSketch(64, seed=s).project("w", u) * CountSketch(64, seed=s).project("w", v)).sum()
            for s in range(400)
        ]
    )
    exact = (u * v).sum()
    assert (dots.mean() - exact).abs() < 4 * dots.std() / 20  # within 4 standard errors


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="positive"):
        CountSketch(0)
    sketch = CountSketch(8)
    sketch.project("w", torch.randn(2, 10))
    with pytest.raises(ConfigError, match="coordinates"):
        sketch.project("w", torch.randn(2, 11))


def test_sign_invariant_map_keeps_squared_cosines_and_drops_the_sign():
    u, v = (F.normalize(x, dim=-1) for x in correlated_pairs(40, 4096, seed=1))
    axial = SignInvariantMap(4096, seed=0)
    mapped_u, mapped_v = axial(u), axial(v)
    exact = F.cosine_similarity(u, v, dim=-1) ** 2
    assert (((mapped_u * mapped_v).sum(-1)) - exact).abs().max() < 0.05
    torch.testing.assert_close(mapped_u.norm(dim=-1), torch.ones(40))
    torch.testing.assert_close(axial(-u), mapped_u, rtol=0, atol=0)
    torch.testing.assert_close(SignInvariantMap(4096, seed=0)(u), mapped_u, rtol=0, atol=0)  # seeded
    assert not torch.allclose(SignInvariantMap(4096, seed=1)(u), mapped_u)
    with pytest.raises(ConfigError, match="4096 dimensions"):
        SignInvariantMap(128)(u)
