"""Data for multi-task training: task specs, readers (JSONL, CSV/TSV, Hugging Face datasets), many tasks loaded
together, task-balanced sampling and collation.

Example:
    >>> from torch.utils.data import DataLoader
    >>> from loramix.data import MultiTaskData, TaskBalancedSampler, TextCollator, tasks_from_directory
    >>> data = MultiTaskData(tasks_from_directory("shared/data", ["sst2", "mrpc"]))
    >>> sampler = TaskBalancedSampler(data.task_ids("train"), batch_size=32, mode="temperature", temperature=2)
    >>> loader = DataLoader(data.split("train"), batch_sampler=sampler, collate_fn=TextCollator(tokenizer))
"""

from loramix.data.collate import TextCollator
from loramix.data.readers import Example, RawSplit, Row, infer_label_names, read_rows, to_examples
from loramix.data.sampling import SamplingMode, TaskBalancedSampler, task_probabilities
from loramix.data.spec import HFSource, Source, TaskSpec, load_task_specs, tasks_from_directory
from loramix.data.tasks import MultiTaskData, TaskInfo

__all__ = [
    "Example",
    "HFSource",
    "MultiTaskData",
    "RawSplit",
    "Row",
    "SamplingMode",
    "Source",
    "TaskBalancedSampler",
    "TaskInfo",
    "TaskSpec",
    "TextCollator",
    "infer_label_names",
    "load_task_specs",
    "read_rows",
    "task_probabilities",
    "tasks_from_directory",
    "to_examples",
]
