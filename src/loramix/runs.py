"""A finished run in Python: `loramix.open_run("runs/x")` (or the name of a Hub repository that `loramix push`
wrote) loads the run's model, heads and method once, and `run.predict(rows)` answers rows as `loramix predict`
answers a file's: in batches that mix tasks, each routed as the run's method routes at inference (a continual run's
auto-selector chooses the task of a row that names none).

Example:
    >>> run = loramix.open_run("runs/x")
    >>> run.predict([{"task": "trec", "text": "How far is it from Denver to Aspen ?"}])
    [{'line': 'row 1', 'task': 'trec', 'prediction': 'NUM', 'label_index': 5}]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loramix.errors import ConfigError


def open_run(source: str | Path, *, config: str | Path | None = None) -> TrainedRun:
    """The finished run in the folder `source`, or in the Hub repository it names (`owner/name[@revision]`,
    fetched into the Hub's cache), loaded for inference (on the GPU where there is one). `config`: the run's config
    where its `config.yaml` will not do (a base model that was a local folder elsewhere)."""
    from loramix.remote import fetch_run

    folder = fetch_run(source)
    if not folder.is_dir():
        raise ConfigError(f"{source}: no such run folder (one that `loramix train` wrote)")
    return TrainedRun(folder, config)


class TrainedRun:
    """A finished run's config, model (backbone, adapters and heads), tasks and predictor, loaded once."""

    def __init__(self, folder: str | Path, config: str | Path | None = None) -> None:
        from loramix.methods import get_method
        from loramix.train.predict import with_input_fields
        from loramix.train.run import collator_of, load_trained, on_inference_device

        self.folder = Path(folder)
        self.config, self.model, self.tokenizer, tasks = load_trained(self.folder, config)
        on_inference_device(self.config, self.model)
        self.tasks = with_input_fields(self.config, tasks)
        self.method = get_method(self.config.method)
        collator = collator_of(self.config, [meta["task_type"] for meta in self.tasks], self.tokenizer)
        self.predictor = self.method.predictor(self.folder, self.config, self.model, collator, self.tasks)
        self._new_tokens = self.predictor.max_new_tokens  # the run's own, unless a call asks for another

    @property
    def task_names(self) -> list[str]:
        return [meta["name"] for meta in self.tasks]

    def predict(
        self,
        rows: Iterable[Mapping[str, Any]],
        *,
        task: str | None = None,
        scores: bool = False,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        sampling: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> list[dict[str, Any]]:
        """Each row's answer, in order, as `loramix predict` writes it (`line` is `row <i>`, counted from 1): a
        row holds its task's input fields (`text`, `text_a` and `text_b`, a generation task's `prompt` or
        `messages`) and names its task in `task`, unless `task` names one for every row (a run with an
        auto-selector chooses it for a row that names none). `scores`: each class's probability; `max_new_tokens`
        and `sampling` (`generate` options, e.g. `{"do_sample": True, "top_p": 0.9}`, drawn from `seed` and each
        batch's first row): generation tasks only. Bad rows are refused naming their row."""
        from loramix.data.readers import Row
        from loramix.train.predict import check_options, check_task, requests_of

        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1 (got {batch_size})")
        check_task(task, self.tasks)
        check_options(self.tasks, scores=scores, generation=max_new_tokens is not None or bool(sampling))
        listed = [Row(f"row {i}", dict(row)) for i, row in enumerate(rows, 1)]
        requests = requests_of(listed, self.tasks, task, any_task=self.method.uses_selector)
        return self.answer(
            requests,
            scores=scores,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            sampling=dict(sampling or {}),
            seed=seed,
        )

    def answer(
        self,
        requests: Sequence[Any],
        *,
        scores: bool = False,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        sampling: dict[str, Any] | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> list[dict[str, Any]]:
        """The answers to checked requests (:func:`loramix.train.predict.requests_of`), `batch_size` rows a batch
        (the run's `eval_batch_size` by default); under several processes each answers its share of the batches
        and all get every answer."""
        from loramix.train.predict import predict

        predictor = self.predictor
        predictor.scores = scores
        predictor.max_new_tokens = max_new_tokens or self._new_tokens
        predictor.sampling, predictor.seed = sampling or {}, seed
        return predict(
            requests, predictor, batch_size=batch_size or self.config.eval_batch_size, progress=progress
        )
