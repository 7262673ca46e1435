"""Adapters on the Hugging Face Hub, with the Hub's client replaced by a folder per repository: a pushed save loads
back into a fresh model with the same outputs, only the save's files travel, the card says how to load it, a local
folder wins over a repository of the same name, and a repository that cannot be read is named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loramix
from loramix.errors import CheckpointError
from loramix.io.hub import FILES, trainer_card
from tests.hub import FakeHub
from tests.io.toys import randomize_adapters, tiny_bert

CONFIG = {"router": "task", "num_experts": 2, "num_tasks": 2, "rank": 4}


def adapted() -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_bert()
    loramix.inject(model, CONFIG)
    randomize_adapters(model)
    return model.eval()


def outputs(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(1, 99, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), loramix.routing(model, task_ids=[0, 1]):
        return model(input_ids=ids).last_hidden_state


def test_a_pushed_save_loads_back_from_the_hub_with_the_same_outputs(hub: FakeHub, tmp_path: Path):
    model = adapted()
    address = loramix.push_to_hub(model, "me/tiny-mola", private=True)
    assert address == "https://huggingface.co/me/tiny-mola/commit/0"
    assert hub.created[0] == ("me/tiny-mola", True, True)
    assert sorted(p.name for p in (hub.root / "me/tiny-mola").iterdir()) == sorted(FILES)
    card = (hub.root / "me/tiny-mola" / "README.md").read_text()
    assert "library_name: loramix" in card and "base_model:" not in card  # built from a config: no Hub name
    assert "model = loramix.load(base_model, 'me/tiny-mola')" in card
    model.config._name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    loramix.push_to_hub(model, "me/tiny-mola")
    card = (hub.root / "me/tiny-mola" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert (
        "loramix.load(AutoModel.from_pretrained('sentence-transformers/all-MiniLM-L6-v2'), 'me/tiny-mola')"
        in card
    )

    torch.manual_seed(0)
    fresh = tiny_bert()  # the same base weights, no adapters
    loaded = loramix.load(fresh, "me/tiny-mola", revision="v1")
    assert hub.fetched == [("me/tiny-mola", "v1", FILES)]
    assert torch.equal(outputs(loaded.eval()), outputs(model))


def test_a_local_folder_wins_over_a_repository_of_the_same_name(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    model = adapted()
    monkeypatch.chdir(tmp_path)
    loramix.save(model, "runs/mola")  # "runs/mola" also reads as a repository id
    torch.manual_seed(0)
    loaded = loramix.load(tiny_bert(), "runs/mola")
    assert hub.fetched == [] and torch.equal(outputs(loaded.eval()), outputs(model))


def test_a_missing_folder_or_repository_is_named(hub: FakeHub, tmp_path: Path):
    with pytest.raises(CheckpointError, match="no such adapter directory"):
        loramix.load(tiny_bert(), tmp_path / "nowhere" / "at" / "all")  # no repository id
    with pytest.raises(
        CheckpointError, match=r"me/absent: no such adapter folder here, and the Hugging Face Hub"
    ):
        loramix.load(tiny_bert(), "me/absent")
    assert hub.fetched == [("me/absent", None, FILES)]
    with pytest.raises(CheckpointError, match="a Hub repository is named 'owner/name'"):
        loramix.push_to_hub(adapted(), "no-owner")
    assert hub.created == []


def test_a_trainer_s_card_becomes_a_loramix_card_with_how_to_load_before_its_first_section():
    model = adapted()
    theirs = (
        "---\nlibrary_name: transformers\ntags:\n- generated_from_trainer\nlicense: mit\n---\n\n# run\n\n"
        "Fine-tuned.\n\n## Training procedure\n\n- learning_rate: 0.01\n"
    )
    card = trainer_card(model, "me/run", theirs)
    front, text = card.split("---\n")[1:3]
    assert "library_name: loramix" in front and "transformers" not in front and "license: mit" in front
    assert front.index("- loramix") < front.index("- generated_from_trainer")
    assert "base_model" not in front  # built from a config: no Hub name
    assert text.index("Fine-tuned.") < text.index("## Loading") < text.index("## Training procedure")
    assert "model = loramix.load(base_model, 'me/run')" in text and text.endswith("- learning_rate: 0.01\n")

    model.config._name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    card = trainer_card(model, "me/run", "Text alone.")
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert card.index("Text alone.") < card.index("## Loading")
    named = "---\nbase_model: other/model\n---\nText."
    assert "base_model: other/model" in trainer_card(model, "me/run", named)
