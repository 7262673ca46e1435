"""Per-example gradient features w.r.t. a LoRA adapter, exact, from one batched backward pass per batch.

ELREA (Li et al. 2025, Sec. 3.2) represents a training or test example by the direction of its loss gradient with
respect to the base adapter's parameters. For one adapted linear layer, y = W0 x + s B A x, write h_t = A x_t and
delta_t = dL / dy_t for the gradient of the example's loss at the layer's output at token t. Then

    dL/dB = s * sum_t delta_t h_t^T            (o, r)
    dL/dA = s * sum_t (B^T delta_t) x_t^T      (r, i)

so the per-example gradients follow from the layer's inputs x (captured by a forward hook) and the output
gradients delta (one `torch.autograd.grad` of the summed per-sample losses w.r.t. every adapted layer's output).
Summing, not averaging, the losses keeps delta per sample, and samples never mix in a batch, so one backward gives
every example's gradient exactly. A padded token whose output does not reach the loss has delta = 0 and
contributes nothing. No parameter's `.grad` is touched.

LESS-style preconditioning (Xia et al. 2024, Eq. 2): given the base adapter's AdamW state (m, v) the feature of a
gradient g is one Adam step from that state, m' / sqrt(v' + eps) with m' = b1 m + (1 - b1) g and
v' = b2 v + (1 - b2) g^2 (no bias correction). The gradients are then sketched to k dimensions
(:mod:`.projection`), summed over layers and L2-normalised.

Legend: n samples, t tokens, r rank, i / o in / out features, k projection dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.errors import ConfigError, InjectionError, RoutingError
from loramix.experts.layer import AdaptedLayer
from loramix.experts.linear import LinearExperts
from loramix.inject import get_info
from loramix.losses.language_model import causal_lm_loss
from loramix.methods.elrea.projection import CountSketch, SignInvariantMap
from loramix.routers import TaskRouter

LossPerSample = Callable[[], Tensor]
Batch = TypeVar("Batch")
ParamsKind = Literal["AB", "A", "B"]
AdamState = Mapping[str, Mapping[str, Tensor]]


@dataclass
class _Call:
    """One call of an adapted layer inside the loss: its (detached) input and its (live) output."""

    layer_index: int
    inputs: Tensor
    output: Tensor


@dataclass
class _Target:
    layer: AdaptedLayer
    a_name: str
    b_name: str


class GradientFeaturizer:
    """Per-example gradient features of the adapter of `model` (injected by loramix).

    The model holds the base adapter as one expert (`{"num_experts": 1, "router": "none"}`), or as expert `expert`
    of a bank routed by task (`router="task"`), in which case the loss must route every sample to that expert
    (`loramix.routing(model, task_ids=torch.full((n,), expert))`); this lets the final ELREA model compute its
    test features itself. Only `nn.Linear` and `Conv1D` layers are supported.

    Args:
        model: the injected model (unwrapped, not a `LoramixModel`).
        projection_dim: k, the CountSketch dimension; None keeps the exact concatenated gradients.
        seed: seeds the projection; train and test features must use the same seed and dim.
        optimizer_state: LESS-style Adam preconditioning: `{param_name: {"exp_avg": m, "exp_avg_sq": v}}`, names as
            in `model.named_parameters()`, tensors shaped like the parameter (the state of a `torch.optim.AdamW`
            that trained the base adapter; :func:`adam_state_by_name` builds it). None: raw gradients.
        params: which adapter matrices make the feature: "AB" (both), "A" or "B".
        expert: which expert of the bank is the base adapter.
        adam_betas, adam_eps: the optimizer's betas and the eps of m' / sqrt(v' + eps) (LESS uses 1e-8).
        sign_invariant: map each feature through :class:`SignInvariantMap`, so that a gradient and its negation
            give the same feature (clusters of gradient axes, not directions); needs `projection_dim`.

    The model runs in eval mode (dropout off: the gradient formula assumes it) and each module's training flag is
    restored afterwards. Gradient checkpointing must be off (a recomputed forward would be captured twice).

    Example:
        >>> featurizer = GradientFeaturizer(model, projection_dim=2048)
        >>> feats = featurizer(lambda: F.cross_entropy(model(**batch).logits, batch["labels"], reduction="none"))
        >>> feats.shape  # (n, 2048), rows L2-normalised
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        projection_dim: int | None = 2048,
        seed: int = 0,
        optimizer_state: AdamState | None = None,
        params: ParamsKind = "AB",
        expert: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        sign_invariant: bool = False,
    ) -> None:
        info = get_info(model)
        if sign_invariant and projection_dim is None:
            raise ConfigError("sign_invariant features need a projection_dim")
        if params not in ("AB", "A", "B"):
            raise ConfigError(f"params must be 'AB', 'A' or 'B', got {params!r}")
        num_experts = info.config.num_experts
        if num_experts > 1 and not isinstance(info.model_router, TaskRouter):
            raise ConfigError(
                f"gradient features need the base adapter as a single expert (router 'none') or as one expert of a "
                f"bank routed by task (router 'task'); this model has {num_experts} experts and router "
                f"'{info.config.router}'"
            )
        if not 0 <= expert < num_experts:
            raise ConfigError(f"expert must lie in 0..{num_experts - 1}, got {expert}")
        names = {id(p): n for n, p in model.named_parameters()}
        self.model, self.params, self.expert = model, params, expert
        self.num_experts = num_experts
        self.targets: list[_Target] = []
        for layer in info.layers:
            if not isinstance(layer, LinearExperts):
                raise ConfigError(
                    f"layer '{layer.layer_name}' is a {type(layer).__name__}; gradient features support only "
                    "nn.Linear and Conv1D layers: exclude it from the targets"
                )
            self.targets.append(_Target(layer, names[id(layer.experts.A)], names[id(layer.experts.B)]))
        self.sketch = CountSketch(projection_dim, seed=seed) if projection_dim is not None else None
        self.axial = SignInvariantMap(projection_dim, seed=seed) if sign_invariant else None
        self.adam_betas, self.adam_eps = adam_betas, adam_eps
        self.optimizer_state = (
            self._check_adam_state(optimizer_state) if optimizer_state is not None else None
        )

    # ---- public API ----------------------------------------------------------------------------------------
    @property
    def parameter_names(self) -> list[str]:
        """The names of the parameters whose gradients make the feature, in order."""
        out = []
        for target in self.targets:
            out += [target.a_name] if "A" in self.params else []
            out += [target.b_name] if "B" in self.params else []
        return out

    def per_example_gradients(
        self, loss_per_sample: LossPerSample, *, preconditioned: bool = False
    ) -> dict[str, Tensor]:
        """Exact per-example gradients `{param_name: (n, 1, r, i) or (n, 1, o, r)}`, fp32, unprojected.

        Each entry is the base expert's slice of the parameter (the whole parameter when there is one expert).
        `preconditioned=True` applies the Adam preconditioning of `optimizer_state`.

        Example:
            >>> grads = featurizer.per_example_gradients(lambda: per_sample_loss(model(**batch), batch))
        """
        return dict(self._gradients(loss_per_sample, preconditioned=preconditioned))

    def __call__(self, loss_per_sample: LossPerSample) -> Tensor:
        """Features `(n, k)` of one batch: (preconditioned) gradients, sketched, summed over layers, L2-normalised
        (then sign-invariant if asked).

        `loss_per_sample` runs the model and returns the per-sample losses `(n,)` (not reduced over the batch).
        """
        grads = self._gradients(loss_per_sample, preconditioned=self.optimizer_state is not None)
        if self.sketch is not None:
            features = self.sketch(grads)
            return self.axial(features) if self.axial is not None else features
        flat = [g.reshape(g.shape[0], -1) for _, g in grads]
        return F.normalize(torch.cat(flat, dim=1), dim=-1)  # (n, P)

    def featurize(
        self,
        batches: Iterable[Batch],
        loss_per_sample: Callable[[Batch], Tensor],
        *,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Features of a whole data set `(N, k)`, batch by batch, gathered on `device` in the batches' order.

        Example:
            >>> feats = featurizer.featurize(loader, lambda b: self_label_cross_entropy(model(**b).logits))
        """
        parts = [self(partial(loss_per_sample, batch)).to(device) for batch in batches]
        if not parts:
            raise ConfigError("featurize got no batches")
        return torch.cat(parts)

    # ---- the backward pass ---------------------------------------------------------------------------------
    def _capture(
        self, calls: list[_Call], index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> None:
        layer = self.targets[index].layer
        if layer.merged_gate is not None or layer.disabled:
            raise InjectionError(f"layer '{layer.layer_name}' is merged or disabled: unmerge/enable it first")
        if self.num_experts > 1:
            state = layer.open_routing(kwargs.get("routing"))
            gate = None if state is None else state.model_gate
            if gate is None or gate.indices is None or bool((gate.indices != self.expert).any()):
                raise RoutingError(
                    f"gradient features of expert {self.expert} need every sample routed to it: run the model "
                    f"inside loramix.routing(model, task_ids=torch.full((n,), task)) with a task mapped to expert "
                    f"{self.expert}"
                )
        inputs = args[0] if args else kwargs["x"]
        if not isinstance(output, Tensor) or not output.requires_grad:
            raise RoutingError(f"layer '{layer.layer_name}' produced an output that does not require grad")
        calls.append(_Call(index, inputs.detach(), output))

    def _backward(self, loss_per_sample: LossPerSample) -> tuple[int, list[_Call], tuple[Tensor | None, ...]]:
        """Run the loss with hooks installed; return n, the layer calls and dL/d(output) of each call."""
        calls: list[_Call] = []
        model = self.model
        flags = [(m, m.training) for m in model.modules()]
        banks = [p for t in self.targets for p in (t.layer.experts.A, t.layer.experts.B)]
        requires = [p.requires_grad for p in banks]
        handles = [
            t.layer.register_forward_hook(partial(self._capture, calls, i), with_kwargs=True)
            for i, t in enumerate(self.targets)
        ]
        try:
            model.eval()
            for p in banks:
                p.requires_grad_(True)
            with torch.enable_grad():
                losses = loss_per_sample()
                if not isinstance(losses, Tensor) or losses.dim() != 1:
                    shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                    raise ConfigError(
                        f"the loss must return one loss per sample, shape (n,), got {shape}: use "
                        "reduction='none' (and average over tokens per sample, not over the batch)"
                    )
                if not calls:
                    raise ConfigError("the loss did not run any adapted layer of the featurizer's model")
                if not losses.requires_grad:
                    raise ConfigError("the per-sample losses do not depend on the adapter (no grad)")
                deltas = torch.autograd.grad(losses.sum(), [c.output for c in calls], allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in zip(banks, requires):
                p.requires_grad_(flag)
            for module, flag in flags:
                module.training = flag
        return losses.shape[0], calls, deltas

    def _gradients(
        self, loss_per_sample: LossPerSample, *, preconditioned: bool
    ) -> Iterator[tuple[str, Tensor]]:
        """Per-example gradients, one parameter at a time (layer by layer, so memory stays at one layer's)."""
        n, calls, deltas = self._backward(loss_per_sample)
        by_layer: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for call, delta in zip(calls, deltas):
            if delta is not None:  # an output that does not reach the loss contributes nothing
                by_layer.setdefault(call.layer_index, []).append((call.inputs, delta))
        for index, target in enumerate(self.targets):
            grad_A, grad_B = self._layer_gradients(target.layer, n, by_layer.get(index, []))
            for name, grad in ((target.a_name, grad_A), (target.b_name, grad_B)):
                if grad is None:
                    continue
                if preconditioned:
                    grad = self._precondition(name, grad)
                yield name, grad

    def _layer_gradients(
        self, layer: AdaptedLayer, n: int, calls: list[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor | None, Tensor | None]:
        """dL/dA `(n, 1, r, i)` and dL/dB `(n, 1, o, r)` of one layer, summed over its calls."""
        A, B = layer.experts.weights()
        A_e = A[min(self.expert, A.shape[0] - 1)].detach().float()  # (r, i)
        B_e = B[min(self.expert, B.shape[0] - 1)].detach().float()  # (o, r)
        s = layer.scaling
        grad_A = A_e.new_zeros(n, *A_e.shape) if "A" in self.params else None  # (n, r, i)
        grad_B = B_e.new_zeros(n, *B_e.shape) if "B" in self.params else None  # (n, o, r)
        for inputs, delta in calls:
            if inputs.shape[0] != n or delta.shape[0] != n:
                raise RoutingError(
                    f"layer '{layer.layer_name}' saw a batch of {inputs.shape[0]} but the loss has {n} samples: "
                    "adapted layers must keep the batch as their first dimension"
                )
            x = inputs.reshape(n, -1, inputs.shape[-1]).float()  # (n, t, i)
            d = delta.reshape(n, -1, delta.shape[-1]).float()  # (n, t, o)
            if grad_B is not None:
                grad_B += s * d.transpose(1, 2) @ (x @ A_e.t())  # (n, o, r)
            if grad_A is not None:
                grad_A += s * (d @ B_e).transpose(1, 2) @ x  # (n, r, i)
        return (
            None if grad_A is None else grad_A[:, None],
            None if grad_B is None else grad_B[:, None],
        )

    # ---- Adam preconditioning ------------------------------------------------------------------------------
    def _check_adam_state(self, state: AdamState) -> dict[str, tuple[Tensor, Tensor]]:
        named = dict(self.model.named_parameters())
        out = {}
        for name in self.parameter_names:
            entry = state.get(name)
            if entry is None or "exp_avg" not in entry or "exp_avg_sq" not in entry:
                raise ConfigError(
                    f"optimizer_state has no exp_avg/exp_avg_sq for '{name}': pass the AdamW state of the base "
                    "adapter keyed by parameter name (see adam_state_by_name)"
                )
            param = named[name]
            pair = []
            for key in ("exp_avg", "exp_avg_sq"):
                value = torch.as_tensor(entry[key])
                if value.shape != param.shape:
                    raise ConfigError(
                        f"optimizer_state['{name}']['{key}'] has shape {tuple(value.shape)}, the parameter "
                        f"{tuple(param.shape)}"
                    )
                index = min(self.expert, value.shape[0] - 1)
                pair.append(value[index : index + 1].detach().to(param.device, torch.float32))  # (1, ...)
            out[name] = (pair[0], pair[1])
        return out

    def _precondition(self, name: str, grad: Tensor) -> Tensor:
        """One Adam step from the base adapter's state (LESS Eq. 2): m' / sqrt(v' + eps), per example."""
        if self.optimizer_state is None:
            raise ConfigError("preconditioned gradients need optimizer_state")
        exp_avg, exp_avg_sq = self.optimizer_state[name]
        beta1, beta2 = self.adam_betas
        m = beta1 * exp_avg + (1 - beta1) * grad
        v = beta2 * exp_avg_sq + (1 - beta2) * grad.square()
        return m / torch.sqrt(v + self.adam_eps)


def adam_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Tensor]]:
    """The `exp_avg` / `exp_avg_sq` of every parameter of `model` that `optimizer` (Adam, AdamW) has a state for.

    Example:
        >>> featurizer = GradientFeaturizer(model, optimizer_state=adam_state_by_name(model, optimizer))
    """
    out = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {})
        if "exp_avg" in state and "exp_avg_sq" in state:
            out[name] = {"exp_avg": state["exp_avg"].detach(), "exp_avg_sq": state["exp_avg_sq"].detach()}
    return out


# ---- label-free per-sample losses ------------------------------------------------------------------------------
def self_label_cross_entropy(logits: Tensor) -> Tensor:
    """Per-sample cross-entropy `(n,)` of a classifier against its own predicted label (no label needed).

    Example:
        >>> featurizer(lambda: self_label_cross_entropy(model(**inputs).logits))
    """
    logits = logits.float()  # (n, c)
    return F.cross_entropy(logits, logits.argmax(-1).detach(), reduction="none")


def label_averaged_features(
    featurizer: GradientFeaturizer, logits_fn: Callable[[], Tensor], top_labels: int = 3
) -> Tensor:
    """Classifier features `(n, k)` averaged over the model's `top_labels` most likely labels, each weighted by its
    probability: normalise(sum_j p_j f(y_j)), with f(y) the sign-invariant feature of the loss against label y.

    Why: the self-label gradient of a many-class task points along a different axis for each predicted class, so
    examples of one task scatter. Summed over the likely labels, the feature becomes the sketch of the example's
    Fisher information restricted to them, sum_j p_j g_j g_j^T (the degree-2 map is linear in g g^T), which shares
    its subspace across the task's examples. With `top_labels=1` it is the plain self-label feature. It costs one
    backward pass per label. The featurizer must be sign-invariant: sum_y p_y g_y = 0, so signed features cancel.

    Args:
        logits_fn: runs the model and returns logits `(n, c)`; columns of other tasks may be -inf (zero
            probability; such labels get weight 0). The probabilities come from one call outside the featurizer:
            put the whole model (heads included) in eval mode first.

    Example:
        >>> feats = label_averaged_features(featurizer, lambda: model(**inputs).logits, top_labels=3)
    """
    if featurizer.axial is None:
        raise ConfigError("label-averaged features need a sign-invariant featurizer (signed ones cancel)")
    if top_labels < 1:
        raise ConfigError(f"top_labels must be at least 1, got {top_labels}")
    with torch.no_grad():
        probs = torch.softmax(logits_fn().float(), dim=-1)  # (n, c)
    top_p, top_i = probs.topk(min(top_labels, probs.shape[-1]), dim=-1)  # (n, j)
    top_i = torch.where(top_p > 0, top_i, top_i[:, :1])  # a label of probability 0 gets weight 0 anyway
    total = None
    for j in range(top_i.shape[1]):
        label = top_i[:, j]
        part = top_p[:, j : j + 1] * featurizer(
            lambda label=label: F.cross_entropy(logits_fn().float(), label, reduction="none")
        )
        total = part if total is None else total + part
    return F.normalize(total, dim=-1)  # type: ignore[arg-type]


def prompt_lm_loss(logits: Tensor, input_ids: Tensor, prompt_mask: Tensor) -> Tensor:
    """Per-sample next-token loss `(n,)` on the prompt tokens only (ELREA's instruction-only gradients, Sec. 3.2).

    `prompt_mask` `(n, t)` is 1 on prompt tokens and 0 on responses and padding; responses are never seen, so
    training and test examples get comparable features.

    Example:
        >>> featurizer(lambda: prompt_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, prompt_mask))
    """
    return causal_lm_loss(logits, input_ids.masked_fill(~prompt_mask.bool(), -100))
