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
    table = read_tsv(spec.parent / "ground_truth.tsv")
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
