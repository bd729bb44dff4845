"""Multi-seed runs (``training.seeds`` / ``neurocl run --seeds``): one model per seed, per-seed outputs,
the report's spread over seeds, the subtypes' consensus over seeds, resume between seeds, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from neurocl import pipeline, seeds
from neurocl.cli import app
from neurocl.config import load_pipeline
from neurocl.errors import ConfigError
from neurocl.io import read_tsv
from neurocl.rundir import RunDir

PIPELINE = """
name: tiny-seeds
cohort: {cohort}
views: {{p_crop: 0.5, p_flip: 0.5, p_noise: 0.5, p_blur: 0.0, p_cutout: 0.5}}
method: {{name: sepclr, common_dim: 4, salient_dim: 4, target_fraction: 0.5}}
encoder: {{name: small_cnn, width: 4}}
training: {{epochs: 1, batch_size: 4, lr: 0.003, warmup_steps: 1, accelerator: cpu, seed: 5}}
evaluation:
  attributes: [age, group]
  subsets: [all]
  probe: {{n_splits: 3, inner_splits: 2, n_permutations: 5, n_bootstrap: 10, n_jobs: 1}}
maps: {{enabled: true, methods: [gradient_x_input], k_min: 2, k_max: 3, n_bootstrap: 5, n_reference: 5, null_references: []}}
outputs: {{store: {store}, report: true}}
"""


# One torch thread: the bit-for-bit comparisons of these runs hold within one thread count.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("seeds")


@pytest.fixture(scope="module")
def pipeline_yaml(workspace, tiny_cohort) -> Path:
    path = workspace / "tiny.yaml"
    path.write_text(PIPELINE.format(cohort=tiny_cohort, store=workspace / "store"))
    return path


@pytest.fixture(scope="module")
def two_seeds(workspace, pipeline_yaml) -> Path:
    """`neurocl run --seeds 0,1` (the YAML's `seed: 5` is replaced by the first of --seeds)."""
    run_dir = workspace / "two-seeds"
    result = CliRunner().invoke(app, ["run", str(pipeline_yaml), "--out", str(run_dir), "--seeds", "0,1"])
    assert result.exit_code == 0, result.output
    return run_dir


def _weights(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def test_each_seed_trains_its_own_model(two_seeds):
    run = RunDir(two_seeds)
    config = run.read_config()
    assert config.training.seeds == [0, 1] and config.training.seed == 0
    first, second = _weights(run.last_checkpoint), _weights(run.seed_run(1).last_checkpoint)
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[name], second[name]) for name in first if first[name].is_floating_point())
    # The primary model's embeddings are the top level's: single-seed commands read them unchanged.
    top, other = read_tsv(run.embeddings), read_tsv(run.seed_run(1).embeddings)
    assert list(top.columns) == list(other.columns) and len(top) == len(other) == 32
    assert not np.allclose(top.filter(like="salient_").to_numpy(), other.filter(like="salient_").to_numpy())
    for folder in (run, run.seed_run(1)):
        assert folder.probes.is_file() and folder.separation.is_file() and folder.metrics.is_file()
    assert not (run.seeds / "seed-0").exists()  # the primary seed lives in the run folder itself


def test_report_shows_the_spread_over_seeds(two_seeds):
    run = RunDir(two_seeds)
    text = run.report_md.read_text()
    assert "Spread over training seeds" in text
    probes = {seed: read_tsv(folder.probes) for seed, folder in run.seed_runs([0, 1]).items()}
    spread = seeds.probe_spread(probes)
    row = spread[(spread["attribute"] == "age") & (spread["space"] == "common")].iloc[0]
    values = [p[(p["attribute"] == "age") & (p["space"] == "common") & (p["metric"] == row["metric"])
                & (p["subset"] == row["subset"])]["value"].iloc[0] for p in probes.values()]
    assert row["mean"] == pytest.approx(np.mean(values)) and row["sd"] == pytest.approx(np.std(values, ddof=1))
    assert f"{row['mean']:.3f} ± {row['sd']:.3f} (n=2)" in text
    assert f"0: {values[0]:.3f}, 1: {values[1]:.3f}" in text


def _three(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def test_subtypes_consensus_over_seeds(two_seeds):
    run = RunDir(two_seeds)
    consensus = json.loads(run.maps.seed_consensus.read_text())
    subtypes = json.loads(run.maps.subtypes.read_text())
    assert consensus["seeds"] == [0, 1] and consensus["n_seeds"] == 2
    assert consensus["n_subjects"] == subtypes["n_subjects"]
    # The primary seed's partition is the one maps/clusters.tsv holds.
    assert consensus["n_clusters"]["0"] == subtypes["n_clusters"]
    assert all(k >= 2 for k in consensus["n_clusters"].values())  # k_min 2: a partition to agree on, not k = 1
    assert consensus["pairwise_ari"] == [consensus["mean_pairwise_ari"]] and -1.0 <= consensus["mean_pairwise_ari"] <= 1.0
    assert 0.0 <= consensus["unanimous_pair_fraction"] <= 1.0
    text = run.report_md.read_text()
    assert "subtypes across training seeds" in text
    # The report gives figures to 3 decimals without trailing zeros.
    assert f"| mean pairwise ARI between seeds | {_three(consensus['mean_pairwise_ari'])} |" in text
    assert f"| bootstrap stability (primary seed) | {_three(subtypes['stability'])} |" in text


def test_killed_multi_seed_run_resumes_at_the_seed_it_reached(two_seeds, workspace, pipeline_yaml, monkeypatch):
    """Interrupted after the primary seed trained and before seed 1 did; --auto-resume trains seed 1 only."""
    run_dir = workspace / "interrupted"
    original = pipeline.train

    def interrupt_before_seed_1(config, method, folder, *args):
        if folder.path.name == "seed-1":
            raise KeyboardInterrupt
        return original(config, method, folder, *args)

    monkeypatch.setattr(pipeline, "train", interrupt_before_seed_1)
    result = CliRunner().invoke(app, ["run", str(pipeline_yaml), "--out", str(run_dir), "--seeds", "0,1"])
    assert result.exit_code == 130, result.output
    run = RunDir(run_dir)
    assert run.last_checkpoint.is_file() and not run.seed_run(1).last_checkpoint.exists()

    monkeypatch.setattr(pipeline, "train", original)
    result = CliRunner().invoke(app, ["run", str(pipeline_yaml), "--out", str(run_dir), "--seeds", "0,1",
                                      "--auto-resume", "--set", "maps.enabled=false"])
    assert result.exit_code == 0, result.output
    assert "resuming the run" in result.output
    reference = RunDir(two_seeds)
    for seed in (0, 1):
        resumed, expected = _weights(run.seed_runs([0, 1])[seed].last_checkpoint), _weights(reference.seed_runs([0, 1])[seed].last_checkpoint)
        assert all(torch.equal(resumed[name], expected[name]) for name in expected), f"seed {seed}"
    assert run.seed_run(1).probes.is_file() and run.seed_run(1).embeddings.is_file()


def test_resume_without_the_runs_seeds_is_refused_with_a_hint(two_seeds, pipeline_yaml):
    before = sorted(path.relative_to(two_seeds) for path in two_seeds.rglob("*"))
    with pytest.raises(ConfigError, match=r"the run was started with \[0, 1\], this command gives one seed; pass the same --seeds"):
        pipeline.run_pipeline(pipeline_yaml, two_seeds, resume=True)
    assert sorted(path.relative_to(two_seeds) for path in two_seeds.rglob("*")) == before


@pytest.mark.parametrize("seeds_setting, message", [
    ("training.seeds=[]", "training.seeds is empty"),
    ("training.seeds=[1,1]", "repeats seed(s) [1]"),
    ("training.seeds=[1,2]", "training.seed = 5 but training.seeds starts with 1"),
])
def test_seeds_config_errors(pipeline_yaml, seeds_setting, message):
    with pytest.raises(ConfigError, match="training") as error:
        load_pipeline(pipeline_yaml, settings=[seeds_setting])
    assert message in str(error.value)


def test_seeds_given_with_the_same_first_seed_or_alone(pipeline_yaml):
    config = load_pipeline(pipeline_yaml, settings=["training.seeds=[5,7]"])
    assert config.training.run_seeds() == [5, 7]
    single = load_pipeline(pipeline_yaml)
    assert single.training.seeds is None and single.training.run_seeds() == [5]


def test_cli_seeds_must_be_integers(pipeline_yaml, workspace):
    result = CliRunner().invoke(app, ["run", str(pipeline_yaml), "--out", str(workspace / "bad"), "--seeds", "0,x"])
    assert result.exit_code != 0 and "--seeds '0,x'" in result.output
    assert not (workspace / "bad").exists()


def test_spread_helpers_on_tables():
    probes = {
        3: pd.DataFrame({"attribute": ["age"], "subset": ["all"], "space": ["common"], "metric": ["r2"], "value": [0.5]}),
        4: pd.DataFrame({"attribute": ["age"], "subset": ["all"], "space": ["common"], "metric": ["r2"], "value": [0.7]}),
    }
    row = seeds.probe_spread(probes).iloc[0]
    assert row["mean"] == pytest.approx(0.6) and row["sd"] == pytest.approx(np.sqrt(0.02)) and row["per_seed"] == "3: 0.500, 4: 0.700"
    separations = {
        3: {"attributes": {"age": {"all": {"spaces": {"common": {}, "salient": {}}, "decodable_from": ["common"]}}},
            "background_collapse": {"norm_auc": 0.9, "n": True, "n_target": 4}},
        4: {"attributes": {"age": {"all": {"spaces": {"common": {}, "salient": {}}, "decodable_from": []}}},
            "background_collapse": {"norm_auc": 0.7, "n": True, "n_target": 4}},
    }
    counts = seeds.decodable_counts(separations).iloc[0]
    assert counts["decodable from common"] == "1/2" and counts["decodable from salient"] == "0/2"
    collapse = seeds.collapse_spread(separations)
    assert list(collapse["figure"]) == ["norm_auc"] and collapse["mean"].iloc[0] == pytest.approx(0.8)
    assert seeds.run_seeds({"training": {"seeds": [2]}}) == [] and seeds.run_seeds(yaml.safe_load("training: {seeds: [2, 0]}")) == [2, 0]
