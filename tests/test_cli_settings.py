"""`loramix settings`: every run config key with its type, default and meaning, or those about one word."""

from __future__ import annotations

import pytest

from loramix.cli import main
from loramix.train.config import RunConfig


def test_every_run_setting_is_listed_with_its_type_default_and_meaning(capsys: pytest.CaptureFixture):
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    listed = [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")]
    assert listed == list(RunConfig.model_fields)
    assert "layers_to_transform: list[int] | None, default None\n    Adapt only the targets" in out
    assert "lr: float, default 0.001" in out


def test_a_word_keeps_the_settings_that_name_or_mention_it_the_closest_first(capsys: pytest.CaptureFixture):
    assert main(["settings", "ddas_accept"]) == 0
    out = capsys.readouterr().out
    listed = [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")]
    assert listed == [
        "ddas_accept_layer",
        "ddas_accept_state",
        "layers_to_transform",
        "ddas_neighbours",
    ]  # named, then mentioned
    assert main(["settings", "lr"]) == 0
    listed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert listed[0] == "lr" and {"router_lr", "head_lr", "backbone_lr"} < set(listed)
    assert not any(
        key.startswith("elrea") and not key.endswith("_lr") for key in listed
    )  # no "lr" in "elrea"
    assert main(["settings", "scorer"]) == 0  # no run setting: the keys of a task spec
    out = capsys.readouterr().out
    assert out.startswith("no run setting; keys of a task spec") and "\nscorer: " in out
    assert main(["settings", "no-such-word"]) == 2
    assert "no run setting or task spec key names or mentions 'no-such-word'" in capsys.readouterr().err


def test_a_reader_that_goes_away_stops_the_listing_quietly(monkeypatch: pytest.MonkeyPatch):
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head -1` does once it has its line
    closed = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr("sys.stdout", closed)
    try:
        assert main(["settings"]) == 141
    finally:
        closed.close()
