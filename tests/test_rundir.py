"""The run folder: its paths, its inputs record, and runs refused when their store or cohort changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from neurocl.cli import app
from neurocl.cohort import Cohort
from neurocl.config import load_pipeline
from neurocl.embed import write_embeddings
from neurocl.errors import ConfigError, NeuroclError, OutputError
from neurocl.io import write_text
from neurocl.rundir import RunDir, load_run, store_fingerprint
from neurocl.store import VolumeStore


def _prepared_run(folder: Path, cohort_yaml: Path, store_dir: Path) -> tuple[RunDir, VolumeStore]:
    """A run folder as `neurocl run` leaves it up to training: config.yaml, store, inputs record, embeddings."""
    folder.mkdir(exist_ok=True)
    pipeline = folder / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"cohort": str(cohort_yaml), "outputs": {"store": str(store_dir)}}))
    config = load_pipeline(pipeline)
    run = RunDir(folder / "run")
    run.prepare(config, resume=False)
    cohort = Cohort.from_yaml(cohort_yaml)
    store = VolumeStore.build(cohort, run.store_folder(config), config.preprocess, workers=1, progress=False)
    run.record_inputs(store, cohort)
    embeddings = cohort.keys().assign(group=cohort.table["group"].to_numpy(), salient_0=np.arange(len(cohort), dtype=float))
    write_embeddings(run.embeddings, embeddings, cohort)
    return run, store


def _drop_last_subject(cohort_yaml: Path) -> None:
    participants = cohort_yaml.parent / "participants.tsv"
    lines = participants.read_text().splitlines()
    participants.write_text("\n".join(lines[:-1]) + "\n")


def test_two_runs_sharing_a_store_with_different_cohorts_refuse_the_stale_one(tiny_cohort, tiny_cohort_copy, tmp_path):
    shared = tmp_path / "shared_store"
    run_a, _ = _prepared_run(tmp_path / "a", tiny_cohort, shared)
    _drop_last_subject(tiny_cohort_copy)
    run_b, store_b = _prepared_run(tmp_path / "b", tiny_cohort_copy, shared)  # rebuilds the shared store
    assert len(store_b) == 31
    with pytest.raises(NeuroclError, match="now holds other volumes"):
        load_run(run_a.path)
    result = CliRunner().invoke(app, ["maps", str(run_a.path)])
    assert result.exit_code == 1
    assert "now holds other volumes" in " ".join(result.output.split())


def test_a_run_whose_cohort_changed_is_refused(tiny_cohort_copy, tmp_path):
    run, store = _prepared_run(tmp_path, tiny_cohort_copy, tmp_path / "store")
    participants = tiny_cohort_copy.parent / "participants.tsv"
    table = pd.read_csv(participants, sep="\t", dtype=str)
    table.loc[0, "age"] = "99"
    table.to_csv(participants, sep="\t", index=False)
    with pytest.raises(NeuroclError, match="cohort .* changed"):
        run.check_inputs(store, Cohort.from_yaml(tiny_cohort_copy))


def test_a_rebuild_of_the_same_images_keeps_the_store_fingerprint(tiny_cohort, tmp_path):
    cohort = Cohort.from_yaml(tiny_cohort)
    first = VolumeStore.build(cohort, tmp_path / "one", workers=1, progress=False)
    second = VolumeStore.build(cohort, tmp_path / "two", workers=1, progress=False)
    assert store_fingerprint(first) == store_fingerprint(second)
    other = VolumeStore.build(cohort.select(np.arange(len(cohort) - 1)), tmp_path / "three", workers=1, progress=False)
    assert store_fingerprint(other) != store_fingerprint(first)


def test_a_new_run_refuses_a_non_empty_folder_and_resume_refuses_an_empty_one(tmp_path, tiny_cohort):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"cohort": str(tiny_cohort)}))
    config = load_pipeline(pipeline)
    with pytest.raises(ConfigError, match="holds no run"):
        RunDir(tmp_path / "empty").prepare(config, resume=True)
    with pytest.raises(ConfigError, match="not empty"):
        RunDir(tmp_path).prepare(config, resume=False)


def test_a_baseline_folder_is_a_run_folder_of_its_own(tmp_path):
    run = RunDir(tmp_path)
    baseline = run.baseline("cpca")
    assert baseline.path.parent == run.baselines
    assert baseline.embeddings.name == run.embeddings.name and baseline.probes.parent == baseline.path


def _failed_before_training(folder: Path, cohort_yaml: Path) -> tuple[RunDir, Path]:
    """A run folder as neurocl leaves it after failing before training: its marker, config.yaml, splits.tsv, logs/."""
    run = RunDir(folder / "run")
    run.own.mark_run()
    pipeline = folder / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"cohort": str(cohort_yaml), "training": {"batch_size": 4}}))
    write_text(run.config, "cohort: somewhere/else.yaml\n")
    write_text(run.splits, "participant_id\tsplit\nsub-0001\ttrain\n")
    write_text(run.prepared, "{}")
    return run, pipeline


def test_a_run_that_never_trained_restarts_with_the_same_command(tmp_path, tiny_cohort):
    run, pipeline = _failed_before_training(tmp_path, tiny_cohort)
    config = load_pipeline(pipeline)
    for resume in (False, True):
        run.check_out(config, resume=resume)  # neither "not empty" nor "a section changed"
    run.prepare(config, resume=False)
    assert load_pipeline(pipeline) == run.read_config()
    assert not run.splits.exists() and not run.prepared.exists()


def test_a_folder_with_other_files_is_not_taken_for_an_untrained_run(tmp_path, tiny_cohort):
    run, pipeline = _failed_before_training(tmp_path, tiny_cohort)
    (run.path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds a run already"):
        run.check_out(load_pipeline(pipeline), resume=False)


def test_a_folder_of_run_file_names_without_the_marker_is_not_taken_for_a_run(tmp_path, tiny_cohort):
    run, pipeline = _failed_before_training(tmp_path, tiny_cohort)
    run.own.run_marker.unlink()  # a user's folder that happens to hold a config.yaml and a splits.tsv
    config = load_pipeline(pipeline)
    with pytest.raises(ConfigError, match="not a neurocl run folder"):
        run.check_out(config, resume=False)
    with pytest.raises(ConfigError, match="not a neurocl run folder"):
        run.check_out(config, resume=True)
    assert run.config.read_text() == "cohort: somewhere/else.yaml\n"


def test_a_trained_run_is_not_restarted(tmp_path, tiny_cohort):
    run, pipeline = _failed_before_training(tmp_path, tiny_cohort)
    write_text(run.last_checkpoint, "weights")
    with pytest.raises(ConfigError, match="holds a run already"):
        run.check_out(load_pipeline(pipeline), resume=False)


def test_out_inside_the_cohort_folder_is_refused(tiny_cohort):
    cohort = Cohort.from_yaml(tiny_cohort)
    with pytest.raises(OutputError, match="inside the cohort root"):
        RunDir(tiny_cohort.parent / "runs" / "a").check_out(None, resume=False, inputs=cohort.input_paths())
