"""Adapters on the Hugging Face Hub: `loramix.push_to_hub` uploads a save (the JSON record, the safetensors and a
model card), and `loramix.load` takes a Hub repository's id where it takes a folder.

Only the save's own files are uploaded and fetched (`FILES`): no pickle, no code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from loramix.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save
from loramix.io.checkpoint import load as load_folder
from loramix.io.export import hub_model
from loramix.remote import check_repo_id, fetch

CARD_FILE = "README.md"
FILES = [CONFIG_FILE, WEIGHTS_FILE, CARD_FILE]


def adapter_folder(source: str | Path, revision: str | None = None) -> Path:
    """The folder of a save: `source` itself where it is one (or any local path), else the files of the Hub
    repository it names (`owner/name`, at `revision`), fetched into the Hub's cache."""
    return fetch(source, FILES, revision)


def load(
    model: nn.Module,
    directory: str | Path,
    *,
    revision: str | None = None,
    router_network: nn.Module | None = None,
) -> nn.Module:
    """Inject the adapters saved in `directory` into an untouched `model` and load their weights; returns the
    model. `directory` is a folder written by :func:`loramix.save`, or the id of a Hub repository that holds one (at
    `revision`: a branch, tag or commit).

    Example:
        >>> model = loramix.load(AutoModel.from_pretrained(name), "runs/mola")
        >>> model = loramix.load(AutoModel.from_pretrained(name), "me/minilm-mola-grad")
    """
    return load_folder(model, adapter_folder(directory, revision), router_network=router_network)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload loramix adapters",
    token: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Save the model's adapters (as :func:`loramix.save` does) with a model card, and upload them to the Hub
    repository `repo_id` (created if needed, `private` as asked); returns the commit's address. Load them back with
    `loramix.load(base_model, repo_id)`.

    Example:
        >>> loramix.push_to_hub(model, "me/minilm-mola-grad")
    """
    check_repo_id(repo_id, "repo_id")
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as folder:
        save(model, folder, metadata=metadata)
        (Path(folder) / CARD_FILE).write_text(model_card(model, repo_id), encoding="utf-8")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message,
            allow_patterns=FILES,
        )
    return str(getattr(commit, "commit_url", commit))


def model_card(model: nn.Module, repo_id: str) -> str:
    """A README for the Hub: what the adapters are and how to load them (the base model named where its config
    names one on the Hub)."""
    name = base_name(model)
    front = ["---", *card_metadata(name).to_yaml().splitlines(), "---"]
    return "\n".join([*front, "", f"# {repo_id}", "", *usage(model, repo_id), ""])


def trainer_card(model: nn.Module, repo_id: str, card: str) -> str:
    """Hugging Face `Trainer`'s model card `card` as loramix's: its metadata with `library_name: loramix` and
    loramix's tags (and the base model where it names none), and how to load the adapters before its first
    section."""
    from huggingface_hub import ModelCard

    theirs = ModelCard(card)
    ours = card_metadata(base_name(model))
    data = theirs.data
    data.library_name = ours.library_name
    data.tags = list(dict.fromkeys([*ours.tags, *(data.tags or [])]))
    if ours.base_model and not data.base_model:
        data.base_model = ours.base_model
    text = theirs.text.strip()
    section = "\n".join(["## Loading", "", *usage(model, repo_id), "", ""])
    cut = text.find("\n## ") + 1  # before the card's first section, else at its end
    text = text[:cut] + section + text[cut:] if cut else f"{text}\n\n{section}"
    return "\n".join(["---", data.to_yaml(), "---", "", text.rstrip(), ""])


def base_name(model: nn.Module) -> str:
    """The Hub name of the model the adapters were injected into ('' where its config names none)."""
    return hub_model(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


def card_metadata(name: str) -> Any:
    """A loramix card's metadata (`huggingface_hub.ModelCardData`): the library, its tags, the base model."""
    from huggingface_hub import ModelCardData

    return ModelCardData(
        library_name="loramix", tags=["loramix", "lora", "mixture-of-experts"], base_model=name or None
    )


def usage(model: nn.Module, repo_id: str) -> list[str]:
    """What the adapters are, and the lines of Python that load them."""
    from loramix.inject import get_info

    info = get_info(model)
    config = info.config
    name = base_name(model)
    base = f"AutoModel.from_pretrained({name!r})" if name else "base_model"
    return [
        f"loramix adapters{f' for `{name}`' if name else ''}: {config.num_experts} expert(s) of kind "
        f"'{config.experts}', rank {config.rank}, router '{config.router}', on {len(info.layers)} layers.",
        "",
        "```python",
        "import loramix",
        "from transformers import AutoModel",
        "",
        *([] if name else ["base_model = ...  # the model the adapters were trained on, untouched"]),
        f"model = loramix.load({base}, {repo_id!r})",
        "```",
    ]
