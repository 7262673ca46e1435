"""A head without per-class weights: each class is the embedding of a short text, and a sample's logit for a class
is the scaled cosine between the sample's embedding and that text's embedding (as CLIP classifies images against
encoded captions, and MoE-Adapters continues to train that way).

Why: the class embeddings come from the same adapted encoder as the inputs, so the head learns nothing per class.
It classifies a task it never trained on from its label names alone (zero-shot: on a model whose adapters were
never trained, every B is 0 and the outputs equal the base model's), and a new task needs no new parameters: its
label texts are appended and routed by its own task id. The only parameter is one learned temperature. When the
samples are routed explicitly (`route_ids` or `keep_base` in the batch: an auto-selector's choice), each sample's
class texts go through the experts its input goes through, so that both are embedded by the same model.

Class texts: by default each label name through a template, `"{label}"` (the name itself); a template may also
name the task (`"{task}: {label}"`), or a task may give its own texts (`TaskSpec.label_prompts`, one per label).
A bare name is the default because it assumes nothing about the domain; a sentence such as
`"a news article about {label}"` can help a pretrained sentence encoder zero-shot, but must be chosen per task.

Layout: the same as :class:`~loramix.heads.TaskHeads`: task t's classes are the columns
`offsets[t] .. offsets[t] + sizes[t] - 1` of one `(n, L)` matrix, and every other task's columns are -inf.

Legend: n samples, t tokens, d hidden, T tasks, L all tasks' classes together, K the largest task's class count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.errors import ConfigError
from loramix.heads.base import Head, smoothed

# CLIP's initial temperature: logits = exp(s) * cosine with s = log(1 / 0.07) (a scale of about 14.3), learned and
# clamped to at most 100 as CLIP does, so that training cannot make the softmax arbitrarily sharp.
INITIAL_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)
DEFAULT_TEMPLATE = "{label}"


def regression_refused(what: str) -> ConfigError:
    return ConfigError(
        f"{what} is a regression task; the label-prompt head classifies against class texts and has no "
        "output for a number: use head 'classification' for runs with regression tasks"
    )


def prompt_texts(
    task: str,
    label_names: Sequence[str],
    *,
    template: str = DEFAULT_TEMPLATE,
    prompts: Sequence[str] | None = None,
    task_type: str = "classification",
) -> list[str]:
    """One task's class texts: its own `prompts` when given (one per label), else each label name through
    `template` (which may use `{label}` and `{task}`). Regression tasks have no classes and are refused."""
    if task_type == "regression":
        raise regression_refused(f"task {task!r}")
    if prompts is not None:
        if len(prompts) != len(label_names):
            raise ConfigError(
                f"task {task!r}: label_prompts has {len(prompts)} texts but the task has {len(label_names)} "
                f"labels ({', '.join(label_names)}); give one text per label, in label order"
            )
        if any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ConfigError(f"task {task!r}: label_prompts must be non-empty strings (got {list(prompts)})")
        return list(prompts)
    try:
        return [template.format(label=name, task=task) for name in label_names]
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"label_template {template!r} cannot be filled ({exc}); it may use only {{label}} and {{task}}"
        ) from None


class LabelPromptHead(Head):
    """Classify by scaled cosine to encoded class texts; see the module docstring.

    Give either `label_texts` (per task, one text per class) and a `tokenizer`, which tokenizes them once here,
    or `label_inputs` (`input_ids` and `attention_mask`, `(L, t)`, already tokenized) and `num_labels` per task.

    Example:
        >>> head = LabelPromptHead([["negative", "positive"], ["World", "Sports"]], tokenizer=tokenizer)
        >>> model = MultiTaskModel(backbone, head)
        >>> with loramix.routing(backbone, task_ids=batch["task_ids"]):
        ...     logits = model(batch)  # (n, 4), -inf outside each sample's task
    """

    def __init__(
        self,
        label_texts: Sequence[Sequence[str]] | None = None,
        *,
        tokenizer: Any = None,
        label_inputs: Mapping[str, Tensor] | None = None,
        num_labels: Sequence[int] | None = None,
        label_smoothing: float = 0.0,
        logit_scale: float = INITIAL_LOGIT_SCALE,
        max_length: int = 64,
        texts_follow_route: bool = True,
        texts_noise: bool = True,
    ) -> None:
        super().__init__()
        self.texts_follow_route = texts_follow_route  # see `forward`
        self.texts_noise = texts_noise  # see `label_embeddings`
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.tokenizer, self.max_length, self.label_smoothing = tokenizer, max_length, float(label_smoothing)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        input_ids, attention_mask, sizes = self._rows(label_texts, label_inputs, num_labels)
        self._layout(input_ids, attention_mask, sizes)

    def _rows(
        self,
        label_texts: Sequence[Sequence[str]] | None,
        label_inputs: Mapping[str, Tensor] | None,
        num_labels: Sequence[int] | None,
    ) -> tuple[Tensor, Tensor, list[int]]:
        """Token ids and mask `(rows, t)` of these tasks' class texts, and the class count of each task."""
        if (label_texts is None) == (label_inputs is None):
            raise ConfigError(
                "give the class texts either as label_texts (with a tokenizer) or as label_inputs"
            )
        if label_texts is not None:
            sizes = [len(texts) for texts in label_texts]
            if any(size < 1 for size in sizes):
                raise ConfigError(f"every task needs at least one class text (got counts {sizes})")
            flat = [text for texts in label_texts for text in texts]
            if any(not isinstance(text, str) or not text.strip() for text in flat):
                raise ConfigError(f"class texts must be non-empty strings (got {flat})")
            if self.tokenizer is None:
                raise ConfigError("LabelPromptHead needs a tokenizer to tokenize label_texts")
            encoded = self.tokenizer(
                flat, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            return encoded["input_ids"], encoded["attention_mask"], sizes
        assert label_inputs is not None
        if num_labels is None or "input_ids" not in label_inputs:
            raise ConfigError("label_inputs needs input_ids (and attention_mask), and num_labels per task")
        input_ids = torch.as_tensor(label_inputs["input_ids"])
        attention_mask = torch.as_tensor(label_inputs.get("attention_mask", torch.ones_like(input_ids)))
        sizes = [int(k) for k in num_labels]
        if (
            input_ids.dim() != 2
            or attention_mask.shape != input_ids.shape
            or input_ids.shape[0] != sum(sizes)
        ):
            raise ConfigError(
                f"label_inputs must be (rows, tokens) with one row per class ({sum(sizes)} for num_labels "
                f"{sizes}); got input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)}"
            )
        return input_ids, attention_mask, sizes

    learned: Tensor | None = None

    def _layout(self, input_ids: Tensor, attention_mask: Tensor, sizes: list[int]) -> None:
        self.num_labels = sizes
        self.is_regression = [False] * len(sizes)
        device = self.logit_scale.device
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
        total, widest = sum(sizes), max(sizes)
        self.register_buffer("label_input_ids", input_ids.long().to(device), persistent=False)  # (L, t)
        self.register_buffer(
            "label_attention_mask", attention_mask.long().to(device), persistent=False
        )  # (L, t)
        task_of_row = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        self.register_buffer("label_task_ids", task_of_row.to(device), persistent=False)  # (L,)
        self.register_buffer("offsets", offsets.to(device), persistent=False)  # (T,)
        self.register_buffer("sizes", torch.tensor(sizes, device=device), persistent=False)  # (T,)
        columns = torch.arange(total)
        own = (columns[None] >= offsets[:, None]) & (columns[None] < (offsets + torch.tensor(sizes))[:, None])
        self.register_buffer("own", own.to(device), persistent=False)  # (T, L)
        slots = offsets[:, None] + torch.arange(widest)[None]  # (T, K): task t's k-th class column
        valid = torch.arange(widest)[None] < torch.tensor(sizes)[:, None]  # (T, K)
        self.register_buffer("own_columns", slots.clamp_max(total - 1).to(device), persistent=False)
        self.register_buffer("own_valid", valid.to(device), persistent=False)

    def label_embeddings(self, model: Any, task_ids: Tensor | None = None) -> Tensor:
        """The class texts encoded by `model` (each routed by its own task id), L2-normalised: `(L, d)`. With
        `task_ids`, only the classes of those tasks are encoded (the other rows are zero: their columns are -inf in
        every logit that reads them), so a batch of one task encodes one task's texts. With `texts_noise` off,
        noisy routers route the class texts by their clean logits in training too, as they will at inference: the
        texts are the classifier's weights, and inputs trained against noisy ones meet others at inference."""
        if model is None or not hasattr(model, "encode"):
            raise ConfigError(
                "LabelPromptHead encodes its class texts with the model: call it as head(pooled, batch, model) "
                "with a MultiTaskModel (model(batch) does this)"
            )
        if self._reusing():
            tasks = torch.arange(len(self.num_labels), device=self.offsets.device)
            tasks = tasks if task_ids is None else task_ids.unique()  # (U,)
            known = torch.ones_like(tasks, dtype=torch.bool)
            if self.learned is not None:  # as below: tasks not learned yet are encoded by the base
                known = self.learned.to(tasks.device)[tasks]
            block = self._encoded(model, tasks, torch.where(known, tasks, torch.zeros_like(tasks)), ~known)
            valid = self.own_valid[tasks]  # (U, K)
            out = block.new_zeros(self.label_input_ids.shape[0], block.shape[-1])  # (L, d)
            out[self.own_columns[tasks][valid]] = block[valid]
            return out
        rows = None
        if task_ids is not None:
            rows = self.own[task_ids].any(0).nonzero().squeeze(1)  # (L',) the classes this batch can need
        ids, mask, route = self.label_input_ids, self.label_attention_mask, self.label_task_ids
        if rows is not None:
            ids, mask, route = ids[rows], mask[rows], route[rows]
        keep = None
        if self.learned is not None:  # tasks the adapters have not learned: their classes come from the base
            known = self.learned.to(route.device)[route]  # (L',)
            route, keep = torch.where(known, route, torch.zeros_like(route)), ~known
        embedded = model.encode(
            {"input_ids": ids, "attention_mask": mask},
            route_ids=route,
            keep_base=keep,
            noise=self.texts_noise,
        )
        embedded = F.normalize(embedded.float(), dim=-1)  # (L', d)
        if rows is None:
            return embedded
        return embedded.new_zeros(self.label_input_ids.shape[0], embedded.shape[1]).index_copy(
            0, rows, embedded
        )

    def set_learned(self, learned: Sequence[bool] | None) -> None:
        """Which tasks' class texts the adapters encode (continual learning: the tasks learned and the one
        training); the others' are encoded by the untouched base model, routed nowhere. None (the default): every
        task's."""
        self.learned = None if learned is None else torch.tensor(list(learned), dtype=torch.bool)

    def routed_label_embeddings(
        self, model: Any, task_ids: Tensor, route_ids: Tensor, keep_base: Tensor | None
    ) -> Tensor:
        """Each sample's own task's class texts encoded along the sample's own route, L2-normalised: `(n, K, d)`
        (slots past the task's class count are zero). Samples that share a task and a route share one encoding:
        the texts of every distinct (task, route, kept on the base) triple go through the model in one pass."""
        keep = torch.zeros_like(task_ids, dtype=torch.bool) if keep_base is None else keep_base.bool()
        routes = route_ids.long()
        span = int(routes.max()) + 1 if routes.numel() else 1
        key = (task_ids.long() * span + routes) * 2 + keep.long()  # (n,)
        unique, inverse = torch.unique(key, return_inverse=True)  # (U,), (n,)
        u_keep, u_route, u_task = (unique % 2).bool(), (unique // 2) % span, unique // 2 // span  # (U,) each
        return self._encoded(model, u_task, u_route, u_keep)[inverse]  # (n, K, d)

    def _encoded(self, model: Any, tasks: Tensor, routes: Tensor, keep: Tensor) -> Tensor:
        """`(U, K, d)`: the class texts of each (task, route, kept on the base) triple `(U,)` encoded along that
        route, L2-normalised, zero past the task's class count; inside :meth:`inference_cache` each triple is
        encoded once for the whole block."""
        cache = self._cache if self._reusing() else None
        if cache is None:
            return self._encode(model, tasks, routes, keep)
        keys = list(zip(tasks.tolist(), routes.tolist(), keep.tolist()))
        todo = [i for i, key in enumerate(keys) if key not in cache]
        if todo:
            index = torch.tensor(todo, device=tasks.device)
            encoded = self._encode(model, tasks[index], routes[index], keep[index])
            cache.update(zip((keys[i] for i in todo), encoded))
        return torch.stack([cache[key] for key in keys])

    def _encode(self, model: Any, tasks: Tensor, routes: Tensor, keep: Tensor) -> Tensor:
        """:meth:`_encoded` without the cache: every triple's texts through the model in one pass."""
        valid = self.own_valid[tasks]  # (U, K)
        rows = self.own_columns[tasks][valid]  # (R,) class rows of every triple, in triple order
        embedded = model.encode(
            {"input_ids": self.label_input_ids[rows], "attention_mask": self.label_attention_mask[rows]},
            route_ids=routes[:, None].expand_as(valid)[valid],
            keep_base=keep[:, None].expand_as(valid)[valid],
            noise=self.texts_noise,
        )
        embedded = F.normalize(embedded.float(), dim=-1)  # (R, d)
        out = embedded.new_zeros(*valid.shape, embedded.shape[1])  # (U, K, d)
        out[valid] = embedded
        return out

    _cache: dict[tuple[int, int, bool], Tensor] | None = None

    def _reusing(self) -> bool:
        """Inside :meth:`inference_cache`, and neither training nor taking gradients (encodings computed under
        either are never kept or reused)."""
        return self._cache is not None and not self.training and not torch.is_grad_enabled()

    @contextmanager
    def inference_cache(self) -> Iterator[None]:
        """Encode each task's class texts once per route (and once on the base) for the whole block, instead of
        once per batch: for evaluation and prediction, where the weights do not change. A batch of every task
        otherwise re-encodes every task's class texts (banking77's 77 among them), and an input mixed over several
        routes re-encodes its task's texts along each. An inner block shares the outer one's encodings; adding a
        task empties them."""
        if self._cache is not None:
            yield
            return
        self._cache = {}
        try:
            yield
        finally:
            self._cache = None

    def forward(self, pooled: Tensor, batch: dict[str, Tensor], model: Any = None) -> Tensor:
        """Logits `(n, L)`: exp(logit_scale) * cosine, with every column outside the sample's task set to -inf.

        When the batch routes its samples explicitly (`route_ids` or `keep_base`: an auto-selector's choice, a
        cluster's expert), each sample's class texts are encoded along the sample's own route, so that the input
        and its classes are compared in one embedding space, as MoE-Adapters' released code encodes the class
        texts with the experts the selector chose (`texts_follow_route`; off: each task's texts go by the task's
        own id, the base for tasks not learned yet)."""
        task_ids = batch["task_ids"]
        inputs = F.normalize(pooled.float(), dim=-1)  # (n, d)
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        routed = batch.get("route_ids") is not None or batch.get("keep_base") is not None
        if not (routed and self.texts_follow_route):
            classes = self.label_embeddings(model, task_ids)  # (L, d)
            logits = scale * inputs @ classes.T  # (n, L)
            return logits.masked_fill(~self.own[task_ids], float("-inf"))
        route = batch.get("route_ids")
        classes = self.routed_label_embeddings(
            model, task_ids, task_ids if route is None else route, batch.get("keep_base")
        )  # (n, K, d)
        own = scale * torch.einsum("nd,nkd->nk", inputs, classes)  # (n, K)
        valid = self.own_valid[task_ids]  # (n, K)
        samples = torch.arange(len(task_ids), device=task_ids.device)[:, None].expand_as(valid)
        logits = own.new_full((len(task_ids), self.own.shape[1]), float("-inf"))
        logits[samples[valid], self.own_columns[task_ids][valid]] = own[valid]
        return logits

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Mean over samples of cross-entropy (with label smoothing over the sample's own task's classes)."""
        return self.per_sample_loss(outputs, batch["labels"], batch["task_ids"]).mean()

    def per_sample_loss(self, logits: Tensor, labels: Tensor, task_ids: Tensor) -> Tensor:
        """Cross-entropy `(n,)` on the sample's own task's columns only, so that smoothing spreads its mass over
        that task's classes and never over another task's -inf columns."""
        valid = self.own_valid[task_ids]  # (n, K)
        own = logits.float().gather(1, self.own_columns[task_ids])  # (n, K)
        log_probs = own.masked_fill(~valid, float("-inf")).log_softmax(-1)  # (n, K)
        target = labels.long().clamp_min(0)[:, None]
        nll = -log_probs.gather(1, target).squeeze(1)  # (n,)
        return smoothed(nll, log_probs, valid, self.label_smoothing)

    def predict(self, model: Any, batch: dict[str, Tensor]) -> Tensor:
        return self.decide(model(batch), batch["task_ids"])

    @torch.no_grad()
    def base_decision(self, model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """For inputs of no known task, kept on the untouched base model: every task's classes compete, all encoded
        by the base, and each input takes the task of the class nearest it. `(task ids, label indices within
        them, the class's probability among every task's)`, each `(n,)`; on a task's own classes it decides as
        :meth:`forward` does for an input kept on the base, whose class texts follow it there."""

        def base(batch: dict[str, Tensor]) -> Tensor:
            kept = torch.ones(
                batch["input_ids"].shape[0], dtype=torch.bool, device=self.label_input_ids.device
            )
            return F.normalize(
                model.encode(batch, torch.zeros_like(kept, dtype=torch.long), kept, noise=False).float(),
                dim=-1,
            )

        if self._reusing():
            tasks = torch.arange(len(self.num_labels), device=self.offsets.device)
            kept = torch.ones_like(tasks, dtype=torch.bool)
            classes = self._encoded(model, tasks, torch.zeros_like(tasks), kept)[self.own_valid]  # (L, d)
        else:
            classes = base({"input_ids": self.label_input_ids, "attention_mask": self.label_attention_mask})
        similarity = base(inputs) @ classes.T  # (n, L)
        column = similarity.argmax(-1)  # (n,)
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        score = torch.softmax(scale * similarity, -1).amax(-1)  # the nearest class's: softmax is monotone
        task = self.label_task_ids[column]
        return task, (column - self.offsets[task]).float(), score

    def decide(self, logits: Tensor, task_ids: Tensor) -> Tensor:
        """The label index within the sample's task, as float `(n,)` (other tasks' columns are -inf)."""
        return (logits.argmax(-1) - self.offsets[task_ids]).float()

    @torch.no_grad()
    def add_task(
        self,
        num_labels: int,
        *,
        regression: bool = False,
        label_texts: Sequence[str] | None = None,
        label_inputs: Mapping[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> int:
        """Append one task's class texts (`label_texts`, tokenized with the head's tokenizer, or `label_inputs`);
        no parameter is added and the other tasks' rows keep their tokens. Returns the new task's id."""
        task = len(self.num_labels)
        if regression:
            raise regression_refused(f"the task being added (id {task})")
        texts = None if label_texts is None else [list(label_texts)]
        input_ids, attention_mask, sizes = self._rows(texts, label_inputs, None if texts else [num_labels])
        if sizes != [num_labels]:
            raise ConfigError(f"add_task: num_labels is {num_labels} but {sizes[0]} class texts were given")
        if self._cache is not None:  # the class layout changes
            self._cache.clear()
        old_ids, old_mask = self.label_input_ids, self.label_attention_mask
        width = max(old_ids.shape[1], input_ids.shape[1])
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0

        def widen(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
            extra = width - ids.shape[1]
            return F.pad(ids.to(old_ids), (0, extra), value=pad_id), F.pad(mask.to(old_mask), (0, extra))

        old_ids, old_mask = widen(old_ids, old_mask)
        input_ids, attention_mask = widen(input_ids, attention_mask)
        self._layout(
            torch.cat([old_ids, input_ids]),  # (L + k, t)
            torch.cat([old_mask, attention_mask]),
            self.num_labels + sizes,
        )
        return task
