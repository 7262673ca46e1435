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
