"""ELREA as one `loramix train` run (`method: elrea`) on the tiny tasks: base adapter, gradient features,
clusters, cluster experts and the ensemble, saved so that `loramix.load` rebuilds the same bank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

import loramix
from loramix.errors import CheckpointError, ConfigError
from loramix.io import read_checkpoint
from loramix.methods import get_method, run_training
from loramix.methods.elrea import pipeline
from loramix.train import callbacks
from loramix.train.config import RunConfig
from tests.scripts import benchmark_script
from tests.train import toys
from tests.train.test_checkpoint import without_timings
from tests.train.toys import Interrupted

CLUSTERS, FEATURE_EXAMPLES, FEATURE_DIM, STEPS = len(toys.TASK_NAMES), 60, 256, 20


def elrea_settings(model_dir: Path, tasks_dir: Path) -> dict[str, Any]:
    return toys.settings(
        model_dir,
        tasks_dir,
        method="elrea",
        steps=STEPS,
        lr=1e-2,
        head_lr=1e-1,
        elrea_clusters=CLUSTERS,
        elrea_feature_examples=FEATURE_EXAMPLES,
        elrea_feature_dim=FEATURE_DIM,
    )


def traced_run(run: RunConfig, output_dir: Path) -> dict[str, Any]:
    """`run_training`, keeping the clustering and the trained model that the pipeline computes on the way."""
    seen: dict[str, Any] = {}
    cluster, save_run = pipeline.cluster_features, pipeline.save_run

    def record_clusters(*args, **kwargs):
        seen["clusters"] = cluster(*args, **kwargs)
        return seen["clusters"]

    def record_model(output_dir, run, data, model, *args, **kwargs):
        seen["model"] = model
        return save_run(output_dir, run, data, model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "cluster_features", record_clusters)
        patch.setattr(pipeline, "save_run", record_model)
        metrics = run_training(run, output_dir)
    return {"metrics": metrics, "dir": output_dir, **seen}


@pytest.fixture(scope="module", autouse=True)
def deterministic_on_a_gpu():
    """Same seed, same bits: on CUDA `scatter_add_` (the gradient sketch) sums in a nondeterministic order unless
    deterministic algorithms are asked for; on CPU this changes nothing."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture(scope="module")
def runs(model_dir: Path, tasks_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Two ELREA runs with the same seed: their metrics, folders, cluster labels and trained models."""
    root = tmp_path_factory.mktemp("elrea")
    run = RunConfig.from_dict(elrea_settings(model_dir, tasks_dir))
    return [traced_run(run, root / f"run{index}") for index in range(2)]


def test_elrea_runs_end_to_end(runs: list[dict[str, Any]]):
    metrics, run_dir = runs[0]["metrics"], runs[0]["dir"]
    assert metrics["method"] == "elrea" and metrics["split"] == "test"
    assert list(metrics["tasks"]) == toys.TASK_NAMES
    for scores in metrics["tasks"].values():
        assert set(scores) == {"accuracy", "macro_f1", "n"} and scores["n"] == 24
    assert -1.0 <= metrics["ari"] <= 1.0 and 0.0 <= metrics["nmi"] <= 1.0

    clusters = metrics["clusters"]
    assert clusters["n_clusters"] == CLUSTERS and clusters["task_names"] == toys.TASK_NAMES
    assert len(clusters["sizes"]) == CLUSTERS and sum(clusters["sizes"]) == FEATURE_EXAMPLES
    assert clusters["sizes"] == sorted(clusters["sizes"], reverse=True)  # cluster ids by size
    contingency = np.array(clusters["contingency"])
    assert contingency.shape == (CLUSTERS, len(toys.TASK_NAMES))
    assert contingency.sum(1).tolist() == clusters["sizes"]
    labels = runs[0]["clusters"].labels
    assert np.bincount(labels.numpy()).tolist() == clusters["sizes"]

    weights = metrics["routing"]["model"]
    assert weights["num_experts"] == CLUSTERS + 1  # the base adapter and one expert per cluster
    assert weights["num_samples"] == 24 * len(toys.TASK_NAMES)
    assert np.allclose(np.array(weights["gate_mean"]).sum(1), 1.0)
    assert 0.0 <= metrics["routing"]["majority_cluster_rate"] <= 1.0

    steps = [h["step"] for h in metrics["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert json.loads((run_dir / "metrics.json").read_text())["clusters"] == clusters
    assert (run_dir / "report.md").is_file()


def test_the_saved_adapter_rebuilds_the_trained_bank(runs: list[dict[str, Any]], model_dir: Path):
    run_dir, trained = runs[0]["dir"], runs[0]["model"].backbone.eval().cpu()  # trained on a GPU if any
    record, tensors = read_checkpoint(run_dir / "adapter")
    centroids, centroid0 = tensors["extra.elrea.centroids"], tensors["extra.elrea.base_centroid"]
    assert torch.equal(centroids, runs[0]["clusters"].centroids)
    assert centroids.shape == (CLUSTERS, FEATURE_DIM) and centroid0.shape == (FEATURE_DIM,)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(CLUSTERS))
    assert record["config"]["num_experts"] == CLUSTERS + 1 and record["config"]["router"] == "task"
    assert set(map(tuple, record["frozen_experts"].values())) == {(0,)}  # the base stays the base

    fresh = loramix.load(AutoModel.from_pretrained(model_dir), run_dir / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = dict(
        tokenizer(
            ["the good film", "a cat in the yard near a tree", "blue"], padding=True, return_tensors="pt"
        )
    )
    outputs = []
    with torch.no_grad():
        for expert in range(CLUSTERS + 1):
            route = torch.full((3,), expert)
            with loramix.routing(trained, task_ids=route):
                expected = trained(**inputs).last_hidden_state
            with loramix.routing(fresh, task_ids=route):
                got = fresh(**inputs).last_hidden_state
            assert torch.equal(got, expected), f"expert {expert}"
            outputs.append(got)
    for expert in range(1, CLUSTERS + 1):  # every cluster expert trained away from the base
        assert (outputs[expert] - outputs[0]).abs().max() > 1e-4, f"expert {expert} is still the base"


def test_the_experts_phase_has_its_own_learning_rate_and_every_phase_says_what_it_is(
    model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    run = RunConfig.from_dict(
        {**elrea_settings(model_dir, tasks_dir), "elrea_expert_lr": 3e-2, "log_every": 1, "progress": True}
    )
    history = run_training(run, tmp_path)["history"]
    err = capsys.readouterr().err
    for phase in ("elrea: 1/3 base adapter", "elrea: 2/3 gradient features of", "elrea: 3/3 "):
        assert phase in err
    base_steps = round(run.elrea_base_fraction * run.steps)
    base_lr = max(h["lr"] for h in history if h["step"] <= base_steps)
    expert_lr = max(h["lr"] for h in history if h["step"] > base_steps)
    assert base_lr == pytest.approx(1e-2, rel=0.05) and expert_lr == pytest.approx(3e-2, rel=0.05)


def test_the_clustering_is_deterministic_for_a_seed(runs: list[dict[str, Any]]):
    first, second = runs
    assert torch.equal(first["clusters"].labels, second["clusters"].labels)
    assert torch.equal(first["clusters"].centroids, second["clusters"].centroids)
    for key in ("ari", "nmi", "clusters", "tasks", "mean_accuracy"):
        assert first["metrics"][key] == second["metrics"][key], key


def test_loramix_eval_scores_what_the_run_scored(runs: list[dict[str, Any]]):
    from loramix.cli import main

    run_dir, metrics = runs[0]["dir"], runs[0]["metrics"]
    assert main(["eval", str(run_dir)]) == 0
    evaluated = json.loads((run_dir / "eval-test.json").read_text())
    assert evaluated["method"] == "elrea" and evaluated["split"] == "test"
    assert evaluated["tasks"] == metrics["tasks"]  # the gradient-routed ensemble, rebuilt from the files
    assert evaluated["routing"]["model"]["num_experts"] == CLUSTERS + 1


@pytest.mark.parametrize("phase", ["base", "experts"])
def test_an_interrupted_elrea_run_resumes_exactly(
    phase: str, runs: list[dict[str, Any]], model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    every = 4
    run = RunConfig.from_dict({**elrea_settings(model_dir, tasks_dir), "checkpoint_every": every})
    checkpoint_step = callbacks.Checkpointer.on_step_end

    def crash_after_a_checkpoint(self, trainer, logs):
        checkpoint_step(self, trainer, logs)
        if trainer.output_dir.name == phase and trainer.step == every + 1:
            raise Interrupted

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(callbacks.Checkpointer, "on_step_end", crash_after_a_checkpoint)
        with pytest.raises(Interrupted):
            run_training(run, tmp_path)
    assert (tmp_path / pipeline.STAGE_FILE).is_file() == (phase == "experts")
    assert not (tmp_path / "adapter").exists()

    resumed = run_training(run, tmp_path, resume=True)
    straight = runs[0]["metrics"]
    assert without_timings(resumed) == without_timings(straight)
    a = load_file(runs[0]["dir"] / "adapter" / "adapters.safetensors")
    b = load_file(tmp_path / "adapter" / "adapters.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_stage_from_other_settings_is_refused(runs: list[dict[str, Any]], model_dir: Path, tasks_dir: Path):
    other = RunConfig.from_dict(
        {**elrea_settings(model_dir, tasks_dir), "elrea_feature_dim": 128, "threads": 2}
    )
    with pytest.raises(CheckpointError, match=r"other settings \(elrea_feature_dim\)"):
        pipeline.Stage.load(runs[0]["dir"], other)


def test_a_stage_serves_a_run_that_changes_only_the_experts(
    runs: list[dict[str, Any]], model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """Another expert learning rate from a finished run's clusters: its stage file copied into a new output
    directory, `--resume` goes straight to the experts, which train at the new rate."""
    (tmp_path / pipeline.STAGE_FILE).write_bytes((runs[0]["dir"] / pipeline.STAGE_FILE).read_bytes())
    run = RunConfig.from_dict(
        {
            **elrea_settings(model_dir, tasks_dir),
            "elrea_expert_lr": 3e-2,
            "elrea_mode": "top1",
            "log_every": 1,
        }
    )

    def no_base_stage(*args, **kwargs):
        raise AssertionError("the base adapter and the clusters were computed again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "_base_stage", no_base_stage)
        metrics = run_training(run, tmp_path, resume=True)
    straight = runs[0]["metrics"]
    assert metrics["clusters"] == straight["clusters"] and metrics["ari"] == straight["ari"]
    base_steps = round(run.elrea_base_fraction * run.steps)
    assert max(h["lr"] for h in metrics["history"] if h["step"] > base_steps) == pytest.approx(3e-2, rel=0.05)
    before = load_file(runs[0]["dir"] / "adapter" / "adapters.safetensors")
    after = load_file(tmp_path / "adapter" / "adapters.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the experts trained again, at 3e-2


def test_a_damaged_stage_file_is_named(model_dir: Path, tasks_dir: Path, tmp_path: Path):
    (tmp_path / pipeline.STAGE_FILE).write_bytes(b"not a safetensors file")
    run = RunConfig.from_dict(elrea_settings(model_dir, tasks_dir))
    with pytest.raises(CheckpointError, match=pipeline.STAGE_FILE):
        run_training(run, tmp_path, resume=True)


def test_a_stage_file_whose_contents_changed_is_refused_before_use(
    runs: list[dict[str, Any]], model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """A value changed in place (a flipped bit, a NaN) still reads as safetensors: the checksum saved inside finds
    it before the experts train on it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(runs[0]["dir"] / pipeline.STAGE_FILE), framework="pt") as handle:
        stored, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    tensors["centroids"][0, 0] += 1e-3
    save_file(tensors, str(tmp_path / pipeline.STAGE_FILE), metadata=stored)
    run = RunConfig.from_dict(elrea_settings(model_dir, tasks_dir))
    with pytest.raises(CheckpointError, match="do not match the checksum saved with them"):
        pipeline.Stage.load(tmp_path, run)


def test_adam_preconditioned_features(
    runs: list[dict[str, Any]], model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    """`elrea_precondition` takes the features as one Adam step from the base run's state (the BERT pooler's
    adapter, which the heads never read, has no state and counts as fresh)."""
    run = RunConfig.from_dict({**elrea_settings(model_dir, tasks_dir), "elrea_precondition": True})
    metrics = run_training(run, tmp_path)
    assert metrics["clusters"]["n_clusters"] == CLUSTERS
    plain = pipeline.Stage.load(runs[0]["dir"], RunConfig.from_dict(elrea_settings(model_dir, tasks_dir)))
    preconditioned = pipeline.Stage.load(tmp_path, run)
    assert plain is not None and preconditioned is not None
    assert np.array_equal(plain.chosen, preconditioned.chosen)  # the same examples, featurised differently
    torch.testing.assert_close(preconditioned.features.norm(dim=1), torch.ones(FEATURE_EXAMPLES))
    assert (preconditioned.features - plain.features).abs().max() > 0.1


def test_loramix_export_writes_one_cluster_expert_for_peft(
    runs: list[dict[str, Any]], model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from peft import PeftModel

    from loramix.cli import main

    run_dir, trained = runs[0]["dir"], runs[0]["model"].backbone.eval().cpu()  # trained on a GPU if any
    assert main(["export", str(run_dir), "--task", "animals", "--out", str(tmp_path / "x")]) == 2
    assert "--expert" in capsys.readouterr().err  # experts belong to clusters, not tasks
    assert main(["inspect", str(run_dir)]) == 0  # which the error says lists them
    assert "majority task of each expert's top-choice inputs: 1: " in capsys.readouterr().out
    capsys.readouterr()
    assert main(["export", str(run_dir), "--expert", str(CLUSTERS + 1), "--out", str(tmp_path / "x")]) == 2
    assert "is not an expert of this run: 0..3" in capsys.readouterr().err
    # an earlier export in the folder (another run's task, with its head) is replaced whole, not mixed in
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "head.safetensors").write_bytes(b"an earlier task export's head")
    (tmp_path / "peft" / "loramix_export.json").write_text('{"task": "animals"}')
    assert main(["export", str(run_dir), "--expert", "2", "--out", str(tmp_path / "peft")]) == 0
    assert not (tmp_path / "peft" / "head.safetensors").exists()
    assert json.loads((tmp_path / "peft" / "loramix_export.json").read_text())["expert"] == 2
    peft_model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(model_dir), str(tmp_path / "peft")
    ).eval()
    inputs = dict(
        AutoTokenizer.from_pretrained(model_dir)(
            ["a cat near the river", "blue"], padding=True, return_tensors="pt"
        )
    )
    with torch.no_grad(), loramix.routing(trained, task_ids=torch.full((2,), 2)):
        want = trained(**inputs).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).last_hidden_state, want, atol=1e-5, rtol=0)


def test_the_routing_diagnosis_scores_the_run_as_the_run_scored(runs: list[dict[str, Any]]):
    """`benchmarks/elrea_routing.py`: ELREA's own routing gives the run's own scores; the oracle sends each task to
    one cluster expert; the base mode is the base adapter alone."""
    module = benchmark_script("elrea_routing")
    run_dir, metrics = runs[0]["dir"], runs[0]["metrics"]
    mode = RunConfig.from_yaml(run_dir / "config.yaml").elrea_mode
    threads = str(torch.get_num_threads())  # main() sets the thread count: keep the suite's
    assert module.main([str(run_dir), "--modes", "base", "oracle", mode, "--threads", threads]) == 0
    result = json.loads((run_dir / "routing.json").read_text())
    assert result[mode]["tasks"] == {name: s["accuracy"] for name, s in metrics["tasks"].items()}
    assert set(result["majority_expert"].values()) <= set(range(1, CLUSTERS + 1))
    assert {"base", "oracle"} <= set(result)


def test_more_clusters_than_featurised_examples_are_refused_before_the_base_adapter_trains(
    model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    from loramix.methods import get_method

    settings = {**elrea_settings(model_dir, tasks_dir), "elrea_clusters": 50, "elrea_feature_examples": 10}
    with pytest.raises(ConfigError, match="elrea_clusters: 50 clusters of elrea_feature_examples=10"):
        get_method("elrea").validate(RunConfig.from_dict(settings))
    # the examples drawn by default (steps x batch of the expert phase), fewer than asked for: before training
    settings = {**elrea_settings(model_dir, tasks_dir), "elrea_clusters": 500, "elrea_feature_examples": None}
    with pytest.raises(ConfigError, match="elrea_clusters: 500 clusters of .* featurised examples"):
        run_training(RunConfig.from_dict(settings), tmp_path)
    assert not (tmp_path / "base" / "checkpoints").exists() and not (tmp_path / "base").exists()


def test_a_resume_is_checked_against_the_phase_it_will_load(tmp_path: Path):
    from loramix.methods import get_method

    elrea = get_method("elrea")
    assert elrea.resume_checkpoints(tmp_path) == tmp_path / "base" / "checkpoints"
    (tmp_path / pipeline.STAGE_FILE).write_bytes(b"")  # the base phase and the clusters are done
    assert elrea.resume_checkpoints(tmp_path) == tmp_path / "experts" / "checkpoints"


def test_evaluations_during_training_watch_both_phases_and_change_nothing(
    runs: list[dict[str, Any]], model_dir: Path, tasks_dir: Path, tmp_path: Path
):
    settings = {**elrea_settings(model_dir, tasks_dir), "eval_every": 5, "eval_split": "test"}
    metrics = run_training(RunConfig.from_dict(settings), tmp_path)
    plain = runs[0]["dir"] / "adapter" / "adapters.safetensors"
    a, b = load_file(plain), load_file(tmp_path / "adapter" / "adapters.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[name], b[name]) for name in a)
    assert metrics["tasks"] == runs[0]["metrics"]["tasks"]
    # the base adapter's 5 steps, then the experts' 15, counted on from the base's in the run's history
    evaluated = [h for h in metrics["history"] if "eval" in h]
    assert [h["step"] for h in evaluated] == [5, 10, 15, 20]
    logged = (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged if '"eval"' in line] == [5]
    # the experts' last evaluation scores the bank as the final one does: by gradient routing, on the same inputs
    last = evaluated[-1]["eval"]
    for name, scores in metrics["tasks"].items():
        assert last["tasks"][name] == {k: v for k, v in scores.items() if k != "n"}
    with pytest.raises(ConfigError, match="keep_best: method elrea trains two phases"):
        get_method("elrea").validate(RunConfig.from_dict({**settings, "keep_best": True}))
