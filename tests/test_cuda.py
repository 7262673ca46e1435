"""The CUDA paths against their CPU references: the fast expert ops and the batched ELREA features. Skipped
without a GPU; the rest of the suite also runs on one (the trainer then trains on it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loramix.experts import ops
from loramix.methods.elrea import GradientFeaturizer
from tests.experts.test_ops import GATE_KINDS, SCALING, SHARES, fast, make_gate, make_weights
from tests.methods.elrea_toys import padded_batch
from tests.methods.test_elrea_features import LABELS, LENGTHS, base_bert, bert_batch_loss, loop_gradients

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
TOL = {"atol": 1e-4, "rtol": 1e-4}  # TF32 is off by default for matmuls; reductions differ in order


def outputs_and_grads(op, leaves: list[torch.Tensor], gate: torch.Tensor, w: torch.Tensor, device):
    inputs = [leaf.to(device).requires_grad_(True) for leaf in leaves]
    g = inputs[3] if len(inputs) == 4 else gate.to(device)
    out = op(inputs[0], inputs[1], inputs[2], g)
    (out * w.to(device)).sum().backward()
    return out.detach().cpu(), [leaf.grad.cpu() for leaf in inputs]


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("kind", GATE_KINDS)
def test_fast_ops_on_cuda_equal_the_cpu_loop_reference(share: str, kind: str) -> None:
    n, t, i, o, e, r = 5, 7, 24, 20, 4, 3
    A, B = make_weights(e, r, i, o, share)
    x = torch.randn(n, t, i, generator=torch.Generator().manual_seed(7))
    gate = make_gate(kind, n, t, e)
    w = torch.randn(n, t, o, generator=torch.Generator().manual_seed(11))
    leaves = [x, A, B] + ([gate] if gate.is_floating_point() else [])

    got, got_grads = outputs_and_grads(fast, leaves, gate, w, CUDA)
    want, want_grads = outputs_and_grads(
        lambda *args: ops.loop_reference(*args, SCALING), leaves, gate, w, "cpu"
    )
    torch.testing.assert_close(got, want, **TOL)
    for g, ref in zip(got_grads, want_grads):
        torch.testing.assert_close(g, ref, **TOL)


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
