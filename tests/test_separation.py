"""Tests of ``neurocl bench separation``: held-out scoring, the separation index (which must fail a
method that puts everything in one space), and a reduced panel run end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from neurocl.cli import app
from neurocl.errors import ConfigError
from neurocl.io import read_tsv
from neurocl.synthdir import SynthDir
from neurocl.validation.panel import PanelScale, build_cohort, panel_cohort
from neurocl.validation.separation import (
    REPRESENTATIONS,
    SeparationBenchConfig,
    held_out_score,
    print_separation,
    run_separation_bench,
    score_representations,
)


def test_held_out_score_fits_on_training_rows_and_scores_only_test_rows():
    rng = np.random.default_rng(0)
    n = 200
    x = rng.normal(size=(n, 3))
    train = np.arange(n) < 140
    test = ~train
    y = 2.0 * x[:, 0] + 0.1 * rng.normal(size=n)
    good = held_out_score(x, y, "continuous", train, test)
    assert good["metric"] == "r2" and good["value"] > 0.95 and good["n_train"] == 140 and good["n_test"] == 60
    # The relation flips on the test rows: a probe fitted there would score high, one fitted on the
    # training rows and scored on the test rows scores far below chance.
    flipped = np.where(train, y, -y)
    assert held_out_score(x, flipped, "continuous", train, test)["value"] < -1.0
    labels = np.where(x[:, 1] > 0, "a", "b")
    categorical = held_out_score(x, labels, "categorical", train, test)
    assert categorical["metric"] == "balanced_accuracy" and categorical["chance"] == 0.5 and categorical["u"] > 0.8
    assert abs(held_out_score(x, rng.permutation(labels), "categorical", train, test)["u"]) < 0.3
    assert held_out_score(x, y, "continuous", train, test & (np.arange(n) < 143)) is None  # 3 test rows


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """Ground truth of a panel cohort: the factors the embeddings below are made of."""
    spec = build_cohort(panel_cohort("reference"), tmp_path_factory.mktemp("ref") / "c",
                        PanelScale(n_subjects=120, resolution=16.0), seed=7)
    table = SynthDir(spec.parent).read_ground_truth()
    table["split"] = np.where(np.arange(len(table)) % 3 == 0, "test", "train")
    return table


def _factors(table: pd.DataFrame, names: list[str]) -> np.ndarray:
    parts = []
    for name in names:
        column = table[name]
        if not pd.api.types.is_numeric_dtype(column) or name == "subtype":
            parts.append(pd.get_dummies(column.astype(str)).to_numpy(dtype=float))
        else:
            parts.append(((column - column.mean()) / column.std()).to_numpy()[:, None])
    return np.hstack(parts)


def _space(table, name, values, rng):
    values = values + 0.05 * rng.normal(size=values.shape)
    frame = pd.DataFrame(values, columns=[f"{name}_{i}" for i in range(values.shape[1])])
    return pd.concat([table[["participant_id", "split"]].reset_index(drop=True), frame], axis=1)


def _method(truth, common, salient):
    rng = np.random.default_rng(1)
    return {"common": _space(truth, "common", common, rng), "salient": _space(truth, "salient", salient, rng)}


def test_a_method_that_separates_is_called_separated(truth):
    cohort = panel_cohort("reference")
    shared = _factors(truth, list(cohort.shared))
    specific = _factors(truth, list(cohort.specific)) * (truth.group == "target").to_numpy()[:, None]
    rows, summary = score_representations(_method(truth, shared, specific), truth, cohort)
    assert summary["separated"] and summary["separation"] > 0.5
    by_key = {(row["attribute"], row["subset"]): row for row in rows}
    assert by_key["severity", "target"]["values"]["salient"] > 0.8 > by_key["severity", "target"]["values"]["common"]
    assert by_key["sex", "all"]["values"]["common"] > 0.9
    assert by_key["age", "target"]["metric"] == "r2" and by_key["age", "target"]["n_test"] == (
        (truth.split == "test") & (truth.group == "target")).sum()


def test_a_method_that_puts_everything_in_one_space_fails(truth):
    cohort = panel_cohort("reference")
    everything = _factors(truth, list(cohort.shared) + list(cohort.specific))
    rows, summary = score_representations(_method(truth, everything, everything), truth, cohort)
    assert not summary["separated"]
    assert abs(summary["separation"]) < 0.1
    # Every attribute is decodable from both spaces: the information is there, just not separated.
    severity = next(row for row in rows if row["attribute"] == "severity")
    assert min(severity["values"]["common"], severity["values"]["salient"]) > 0.8


def test_a_method_with_the_spaces_swapped_scores_negative(truth):
    cohort = panel_cohort("reference")
    shared = _factors(truth, list(cohort.shared))
    specific = _factors(truth, list(cohort.specific)) * (truth.group == "target").to_numpy()[:, None]
    _, summary = score_representations(_method(truth, specific, shared), truth, cohort)
    assert summary["separation"] < -0.5 and not summary["separated"]


def test_a_reduced_panel_runs_end_to_end_and_scores_every_representation(tmp_path):
    import yaml

    from neurocl.validation.separation import DEMO_PIPELINE

    # The demo's settings with batches that 28 training subjects fill (--pipeline).
    pipeline = yaml.safe_load(DEMO_PIPELINE.read_text())
    pipeline["training"]["batch_size"] = 8
    pipeline["encoder"]["width"] = 4
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(pipeline))
    config = SeparationBenchConfig.preset(
        True, cohorts=["reference", "natural-digits"], n_subjects=40, epochs=1, seeds=[3], workdir=tmp_path / "w",
        pipeline=tmp_path / "small.yaml",
    )
    config = config.model_copy(update={"resolution": 12.0, "patch": 32})
    results = run_separation_bench(config)
    assert [run["cohort"] for run in results["runs"]] == ["reference", "natural-digits"]
    for run in results["runs"]:
        assert run["seed"] == 3 and run["cohort_seed"] == 1003
        assert set(run["rows"][0]["values"]) == set(REPRESENTATIONS)
        # Every representation was scored on the held-out test subjects (40 x 0.2 = 8; 4 targets).
        scored = [row for row in run["rows"] if row["subset"] == "all"]
        assert scored and all(row["n_test"] == 8 for row in scored)
        assert all(value is not None for row in scored for value in row["values"].values())
    natural = results["runs"][1]
    assert {row["attribute"] for row in natural["rows"]} == {"photo", "crop_row", "gamma", "digit", "strength"}
    splits = read_tsv(tmp_path / "w" / "reference-seed3" / "run" / "splits.tsv")
    assert (splits.split == "test").sum() == 8
    assert [entry["cohort"] for entry in results["table"]] == ["reference", "natural-digits"]
    console = Console(record=True, width=200)
    print_separation(results, console)
    text = console.export_text()
    assert "natural-digits" in text and "separation" in text and "simclr" in text


def test_bench_separation_refuses_unknown_cohorts_and_bad_seeds(tmp_path):
    with pytest.raises(ConfigError, match="no panel cohort 'brains'"):
        SeparationBenchConfig.preset(True, cohorts=["brains"])
    result = CliRunner().invoke(app, ["bench", "separation", "--seeds", "0,x"])
    assert result.exit_code == 1 and "--seeds" in result.output
    result = CliRunner().invoke(app, ["bench", "separation", "--pipeline", str(tmp_path / "none.yaml")])
    assert result.exit_code == 1 and "does not exist" in " ".join(result.output.split())


def test_the_table_gives_mean_and_sd_over_seeds():
    from neurocl.validation.separation import aggregate, separation_markdown

    def run(seed, value, separation):
        row = {"attribute": "severity", "role": "specific", "subset": "target", "kind": "continuous",
               "metric": "r2", "chance": 0.0, "values": {"common": 0.1, "salient": value}, "u": {}, "n_test": 20}
        summary = {"specific_gap": value - 0.1, "shared_gap": None, "separation": separation,
                   "separated": separation >= 0.1}
        return {"cohort": "reference", "seed": seed, "rows": [row], "summary": summary}

    table = aggregate([run(0, 0.2, 0.05), run(1, 0.4, 0.15)])
    cell = table[0]["rows"][0]["values"]["salient"]
    assert cell["mean"] == pytest.approx(0.3) and cell["sd"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert table[0]["summary"]["separated_seeds"] == 1 and table[0]["seeds"] == [0, 1]
    markdown = separation_markdown({"table": table})
    assert "| reference | severity | specific | target | r2 (0.00) | 0.10 ± 0.00 | 0.30 ± 0.14 |" in markdown
    assert "| reference | 0,1 | 0.10 ± 0.07 |" in markdown and "1 of 2" in markdown


def test_chance_counts_only_the_classes_of_the_scored_rows():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(90, 2))
    labels = np.where(np.arange(90) < 30, "control", np.where(x[:, 0] > 0, "one", "two"))
    rows = np.arange(90) >= 30  # the targets only: two classes, chance 1/2
    result = held_out_score(x, labels, "categorical", rows & (np.arange(90) < 70), rows & (np.arange(90) >= 70))
    assert result["chance"] == 0.5 and result["n_test"] == 20 and result["value"] > 0.8


def test_set_overrides_reach_the_pipeline_and_bad_fields_are_named():
    from neurocl.validation.separation import bench_settings

    config = SeparationBenchConfig.preset(True, settings=["method.lam_cov=5", "method.attributes=[age,sex]",
                                                            "training.lr=0.001"])
    raw = bench_settings(config)
    assert raw["method"]["lam_cov"] == 5.0 and raw["training"]["lr"] == 0.001
    with pytest.raises(ConfigError, match="lam_covv"):
        bench_settings(SeparationBenchConfig.preset(True, settings=["method.lam_covv=5"]))
    with pytest.raises(ConfigError, match="unknown umap"):
        SeparationBenchConfig.preset(True, baselines=["pca", "umap"])


def test_covariates_follow_each_cohorts_own_column_names(tmp_path):
    """An attribute-aware SepCLR on the renamed cohort trains with that cohort's columns, with PCA only."""
    import yaml

    from neurocl.validation.separation import DEMO_PIPELINE, covariates

    assert covariates(panel_cohort("reference")) == ["age", "sex", "site"]
    assert covariates(panel_cohort("independent")) == ["AGE", "gender", "scanner"]
    assert covariates(panel_cohort("natural-digits")) == ["photo", "crop_row", "gamma"]
    pipeline = yaml.safe_load(DEMO_PIPELINE.read_text())
    pipeline["training"]["batch_size"] = 8
    pipeline["encoder"]["width"] = 4
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(pipeline))
    result = CliRunner().invoke(app, [
        "bench", "separation", "--quick", "--pipeline", str(tmp_path / "small.yaml"), "--cohorts", "independent",
        "--n-subjects", "40", "--epochs", "1", "--seeds", "4", "--baselines", "pca", "--workdir", str(tmp_path / "w"),
        "--set", "method.attributes=[age,sex,site]", "--set", "method.common_objective=yaware",
        "--set", "method.lam_cov=10", "--out", str(tmp_path / "r.json"),
    ])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((tmp_path / "w" / "independent-seed4" / "pipeline.yaml").read_text())
    assert written["method"]["attributes"] == ["AGE", "gender", "scanner"] and written["baselines"] == ["pca"]
    import json

    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    assert set(run["rows"][0]["values"]) == {"common", "salient", "pca"}
    assert run["summary"]["separation"] is not None


def test_target_checks_mark_each_issue_target_met_or_missed_with_its_gap():
    from neurocl.validation.separation import target_checks, targets_markdown

    def cell(mean, sd=None):
        return {"mean": mean, "sd": sd, "n": 3}

    rows = [
        {"attribute": "subtype", "role": "specific", "subset": "target", "chance": 0.5,
         "values": {"common": cell(0.55), "salient": cell(0.95, 0.02), "pca": cell(0.80), "cpca": cell(0.85)}},
        {"attribute": "sex", "role": "shared", "subset": "target", "chance": 0.5,
         "values": {"common": cell(0.90, 0.10), "salient": cell(0.75), "pca": cell(0.92)}},
    ]
    checks = {(c["attribute"], c["check"]): c for c in target_checks({"cohort": "x", "rows": rows})}
    assert checks[("subtype", "specific: salient >= best linear (PCA, cPCA, lin2 salient) + 0.10")]["met"]  # 0.95 >= 0.95
    assert checks[("subtype", "specific: common <= chance + 0.10")]["met"]
    leak = checks[("sex", "shared: salient <= chance + 0.10")]
    assert not leak["met"] and leak["gap"] == pytest.approx(0.15)
    assert checks[("sex", "shared: common >= best linear (PCA, lin2 common) - 0.05")]["met"]  # 0.90 >= 0.87
    spread = checks[("sex", "SD over seeds <= 0.05 (common)")]
    assert not spread["met"] and spread["gap"] == pytest.approx(0.05)
    markdown = targets_markdown({"table": [{"cohort": "x", "rows": rows}]})
    assert "| x | 4 of 6 |" in markdown and "gap 0.15" in markdown


def test_the_linear_floor_of_the_targets_includes_lin2s_two_spaces():
    from neurocl.validation.separation import SHARED_IN_COMMON, SPECIFIC_IN_SALIENT, target_checks

    def cell(mean):
        return {"mean": mean, "sd": None, "n": 1}

    rows = [
        {"attribute": "subtype", "role": "specific", "subset": "target", "chance": 0.5,
         "values": {"common": cell(0.5), "salient": cell(0.95), "pca": cell(0.6), "cpca": cell(0.7),
                    "lin2_common": cell(0.99), "lin2_salient": cell(0.9)}},
        {"attribute": "age", "role": "shared", "subset": "all", "chance": 0.0,
         "values": {"common": cell(0.6), "salient": cell(0.0), "pca": cell(0.5), "cpca": cell(0.9),
                    "lin2_common": cell(0.8), "lin2_salient": cell(0.95)}},
    ]
    checks = {(c["attribute"], c["check"]): c for c in target_checks({"cohort": "x", "rows": rows})}
    # The salient space must beat lin2's salient space (0.90 + 0.10), not only PCA and cPCA; lin2's common
    # space is not a salient floor.
    specific = checks[("subtype", SPECIFIC_IN_SALIENT)]
    assert specific["bound"] == pytest.approx(1.0) and not specific["met"] and specific["gap"] == pytest.approx(0.05)
    # The common space is held against lin2's common space (0.80 - 0.05), not cPCA's or lin2's salient one.
    shared = checks[("age", SHARED_IN_COMMON)]
    assert shared["bound"] == pytest.approx(0.75) and shared["gap"] == pytest.approx(0.15)
