"""A seeded random projection of per-example gradients to k dimensions that never builds a dense P x k matrix.

CountSketch (Charikar, Chen and Farach-Colton 2002): every coordinate j of a parameter tensor is hashed to a
bucket h(j) in 0..k-1 and a sign s(j) in {-1, +1}, and

    proj(g)_b = sum_{j : h(j) = b} s(j) g_j.

The sketch is linear and preserves inner products in expectation, E <proj(u), proj(v)> = <u, v>, with variance
(|u|^2 |v|^2 + <u, v>^2 - 2 sum_j u_j^2 v_j^2) / k: at k = 4096 a cosine similarity moves by about
1 / sqrt(k) = 0.016 (one standard deviation). This is the Johnson-Lindenstrauss step of LESS (Xia et al. 2024) and
ELREA (Li et al. 2025, Sec. 3.2), at O(P) time and memory instead of O(P k).

Each parameter tensor has its own hash into the same k buckets, drawn from a CPU generator seeded by
(seed, parameter name): the same name hashes the same way on every machine, in every run, whatever the batch.
Summing the tensors' sketches is then the CountSketch of their concatenation. The hash is drawn as an int32 bucket
and an int8 sign and cached per parameter and device as int64 and fp32 (12 bytes a coordinate), the dtypes that
`scatter_add_` takes.

Legend: n samples, P coordinates of one parameter tensor, k projection dimension.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from loramix.errors import ConfigError


def _name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from the global seed and a parameter name, stable across processes."""
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


class CountSketch:
    """Project per-example gradients `{name: (n, *shape)}` to `(n, k)` with one seeded sparse sign hash per name.

    Example:
        >>> sketch = CountSketch(2048, seed=0)
        >>> features = sketch({"layer.A": torch.randn(4, 8, 768), "layer.B": torch.randn(4, 768, 8)})  # (4, 2048)
    """

    def __init__(self, dim: int, *, seed: int = 0) -> None:
        if dim < 1:
            raise ConfigError(f"projection dim must be a positive integer, got {dim}")
        self.dim, self.seed = dim, seed
        self._cpu: dict[str, tuple[Tensor, Tensor]] = {}
        self._on_device: dict[tuple[str, torch.device], tuple[Tensor, Tensor]] = {}

    def hash_of(self, name: str, numel: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """The `(bucket, sign)` of every coordinate of the parameter `name`: int64 `(P,)` and fp32 +-1 `(P,)`."""
        device = torch.device(device)
        cached = self._cpu.get(name)
        if cached is not None and cached[0].numel() != numel:
            raise ConfigError(
                f"parameter '{name}' was sketched with {cached[0].numel()} coordinates and now has {numel}: "
                "use one CountSketch per model"
            )
        if cached is None:
            generator = torch.Generator().manual_seed(_name_seed(self.seed, name))
            bucket = torch.randint(0, self.dim, (numel,), generator=generator, dtype=torch.int32)
            sign = torch.randint(0, 2, (numel,), generator=generator, dtype=torch.int8) * 2 - 1
            cached = self._cpu[name] = (bucket.long(), sign.float())  # the dtypes scatter_add_ wants
        if device.type == "cpu":
            return cached
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = (cached[0].to(device), cached[1].to(device))
        return self._on_device[key]

    def project(self, name: str, grads: Tensor) -> Tensor:
        """One parameter's per-example gradients `(n, *shape)` -> `(n, k)` fp32 (not normalised)."""
        flat = grads.reshape(grads.shape[0], -1).float()  # (n, P)
        bucket, sign = self.hash_of(name, flat.shape[1], flat.device)
        out = flat.new_zeros(flat.shape[0], self.dim)  # (n, k)
        # scatter_add_ along rows with a broadcast int64 index: about 10x faster on CPU than index_add_ on dim 1
        return out.scatter_add_(1, bucket.expand(flat.shape[0], -1), flat * sign)

    def __call__(
        self, grads: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], *, normalize: bool = True
    ) -> Tensor:
        """Sum of the sketches of every named gradient `(n, *shape)`, L2-normalised per row by default: `(n, k)`."""
        items = grads.items() if isinstance(grads, Mapping) else grads
        total: Tensor | None = None
        for name, grad in items:
            part = self.project(name, grad)
            total = part if total is None else total + part
        if total is None:
            raise ConfigError("no gradients to project")
        return F.normalize(total, dim=-1) if normalize else total


def project_gradients(
    grads: Mapping[str, Tensor], dim: int = 2048, *, seed: int = 0, normalize: bool = True
) -> Tensor:
    """One-off CountSketch of `{name: (n, *shape)}` to `(n, dim)`; use a :class:`CountSketch` to reuse the hashes.

    Example:
        >>> project_gradients({"w": torch.randn(3, 100_000)}, 4096).shape
        torch.Size([3, 4096])
    """
    return CountSketch(dim, seed=seed)(grads, normalize=normalize)


class SignInvariantMap:
    """Map unit features `(n, k)` to unit features `(n, k)` whose inner products estimate the squared cosines of
    the inputs: a feature and its negation land on the same point.

    Why: a classifier's feature is the gradient of the loss against its own predicted label, and for a two-class
    task that gradient flips sign with the predicted class (the logit gradient lies on the line (1, -1)). Clustering
    signed directions therefore splits such a task by predicted class, and an expert trained on one predicted class
    cannot learn to tell the classes apart. Clustering and routing by the gradient's axis keep a task together.

    The map is the degree-2 random feature of the kernel <x, y>^2: with Gaussian matrices G1, G2 `(k, k)` drawn from
    a CPU generator seeded by `seed`,

        phi(x) = normalise((x G1) * (x G2)),    E[(x G1 * x G2) . (y G1 * y G2)] = k <x, y>^2,

    so <phi(x), phi(y)> ~ cos(x, y)^2, with a standard deviation of about 1 / sqrt(k) for unrelated pairs (0.016 at
    k = 4096) and at most sqrt(8 / k) for parallel ones.

    Example:
        >>> axial = SignInvariantMap(2048, seed=0)
        >>> torch.allclose(axial(feats), axial(-feats))
        True
    """

    def __init__(self, dim: int, *, seed: int = 0) -> None:
        if dim < 1:
            raise ConfigError(f"feature dim must be a positive integer, got {dim}")
        self.dim, self.seed = dim, seed
        self._on_device: dict[torch.device, Tensor] = {}

    def matrices(self, device: torch.device | str = "cpu") -> Tensor:
        """The two Gaussian matrices side by side, `(k, 2k)` fp32 on `device`."""
        device = torch.device(device)
        if device not in self._on_device:
            generator = torch.Generator().manual_seed(_name_seed(self.seed, "sign-invariant map"))
            self._on_device[device] = torch.randn(self.dim, 2 * self.dim, generator=generator).to(device)
        return self._on_device[device]

    def __call__(self, features: Tensor) -> Tensor:
        if features.shape[-1] != self.dim:
            raise ConfigError(f"features have {features.shape[-1]} dimensions, the map expects {self.dim}")
        both = F.normalize(features.float(), dim=-1) @ self.matrices(features.device)  # (n, 2k)
        return F.normalize(both[:, : self.dim] * both[:, self.dim :], dim=-1)
