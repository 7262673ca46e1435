"""The CUDA paths against their CPU references: the fast expert ops and the batched ELREA features. Skipped
without a GPU; the rest of the suite also runs on one (the trainer then trains on it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loramix.methods.elrea import GradientFeaturizer
from tests.experts.test_ops import GATE_KINDS, SHARES, assert_matches_reference
from tests.methods.elrea_toys import padded_batch
from tests.methods.test_elrea_features import LABELS, LENGTHS, base_bert, bert_batch_loss, loop_gradients

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
TOL = {"atol": 1e-4, "rtol": 1e-4}  # TF32 is off by default for matmuls; reductions differ in order


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("kind", GATE_KINDS)
def test_fast_ops_on_cuda_equal_the_cpu_loop_reference(share: str, kind: str) -> None:
    assert_matches_reference(5, 7, 24, 20, 4, 3, share, kind, device="cuda", **TOL)


def test_batched_features_on_cuda_equal_the_loop_and_the_cpu() -> None:
    model = base_bert()
    ids, mask = padded_batch(LENGTHS)
    cpu = GradientFeaturizer(model, projection_dim=512, seed=0)(lambda: bert_batch_loss(model, ids, mask))

    model.to(CUDA)
    ids, mask = ids.to(CUDA), mask.to(CUDA)
    labels = LABELS.to(CUDA)
    featurizer = GradientFeaturizer(model, projection_dim=None)
    got = featurizer.per_example_gradients(
        lambda: F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")
    )

    def single(k: int):
        length = LENGTHS[k]
        return lambda: F.cross_entropy(model(input_ids=ids[k : k + 1, :length]).logits, labels[k : k + 1])

    want = loop_gradients(model, [single(k) for k in range(len(LENGTHS))])
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)
        assert got[name].is_cuda

    features = GradientFeaturizer(model, projection_dim=512, seed=0)(
        lambda: F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")
    )
    assert features.is_cuda
    torch.testing.assert_close(features.cpu(), cpu, **TOL)


@pytest.mark.parametrize(("neighbours", "choice"), [(0, "own"), (3, "own"), (3, "shared")])
def test_the_auto_selector_fitted_on_cuda_decides_as_on_the_cpu(neighbours: int, choice: str) -> None:
    """Gaussian and nearest-neighbour acceptance, each task's own or one shared covariance choosing: the same tasks
    fitted and the same inputs routed on either device; a sample near a boundary may round either way."""
    from loramix.routers.selector import AutoSelector

    generator = torch.Generator().manual_seed(0)
    tasks = [c + torch.randn(120, 12, generator=generator) for c in (0.0, 2.0, -2.0)]
    probe = torch.randn(200, 12, generator=generator) * 2.5
    decided = []
    for device in ("cpu", "cuda"):
        selector = AutoSelector(
            12, accept_width=6, threshold="pooled", neighbours=neighbours, choice=choice
        ).to(device)
        for features in tasks:
            selector.add_task(features.to(device))
        torch.testing.assert_close(
            selector.accept_errors(probe.to(device)).cpu(),
            selector.errors_loop(probe.to(device), accept=True).cpu(),
            **TOL,
        )
        if choice == "shared":
            torch.testing.assert_close(
                selector.shared_scores(probe.to(device)).cpu(),
                selector.shared_scores_loop(probe.to(device)).cpu(),
                rtol=1e-4,
                atol=1e-3,
            )
        decided.append([d.cpu() for d in selector(probe.to(device))])
    (cpu_tasks, cpu_keep), (cuda_tasks, cuda_keep) = decided
    assert (cpu_keep == cuda_keep).float().mean() >= 0.97 and (cpu_tasks == cuda_tasks).float().mean() >= 0.97
