"""Held-out probes (the default scope): fitted on train/val subjects, scored only on test subjects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import neurocl.validation.separation as bench
from neurocl.cohort import Cohort
from neurocl.errors import ConfigError
from neurocl.probe import PROBE_COLUMNS, ProbeConfig, held_out_score, probe_attribute, probe_embeddings, separation
from neurocl.pipeline import run_pipeline

REPO = Path(__file__).resolve().parent.parent
CONFIG = ProbeConfig(n_permutations=199, n_bootstrap=100, n_jobs=1)


def _cohort(n, rng):
    ids = np.array([f"sub-{i:03d}" for i in range(n)])
    patient = np.arange(n) % 2 == 0
    participants = pd.DataFrame({"participant_id": ids, "diagnosis": np.where(patient, "patient", "control"),
                                 "age": rng.uniform(20, 80, n), "sex": rng.choice(["F", "M"], n)})
    return Cohort(participants, images="{participant_id}.nii.gz",
                  group={"column": "diagnosis", "background": ["control"], "target": ["patient"]},
                  attributes={"age": "continuous", "sex": "categorical"})


def _memorised(n=120, n_test=40, seed=0):
    """Embeddings that carry age and sex exactly for the train/val subjects and pure noise for the test subjects:
    what an encoder that memorised its training subjects would give."""
    rng = np.random.default_rng(seed)
    cohort = _cohort(n, rng)
    table = cohort.table
    split = np.where(np.arange(n) < n - n_test, np.where(np.arange(n) % 7 == 0, "val", "train"), "test")
    seen = split != "test"
    x = rng.normal(size=(n, 4))
    x[seen, 0] = (table["age"].to_numpy()[seen] - 50) / 15
    x[seen, 1] = np.where(table["sex"].to_numpy()[seen] == "F", 2.0, -2.0) + 0.1 * rng.normal(size=int(seen.sum()))
    embeddings = pd.DataFrame({"participant_id": table["participant_id"], "split": split,
                               **{f"emb_{i}": x[:, i] for i in range(4)}})
    return cohort, embeddings


def _primary(probes, attribute, subset="all"):
    rows = probes[(probes["attribute"] == attribute) & (probes["subset"] == subset)
                  & probes["metric"].isin(["r2", "balanced_accuracy"])]
    assert len(rows) == 1
    return rows.iloc[0]


def test_training_subjects_are_never_scored():
    """Signal only in the training subjects: the held-out score is at chance, in-sample CV is high."""
    cohort, embeddings = _memorised()
    held_out = probe_embeddings(embeddings, cohort, attributes=["age", "sex"], subsets=["all"], config=CONFIG)
    in_sample = probe_embeddings(embeddings, cohort, attributes=["age", "sex"], subsets=["all"],
                                 config=CONFIG.model_copy(update={"scope": "in_sample_cv", "n_permutations": 99,
                                                                  "n_splits": 3, "inner_splits": 2}))
    for attribute, high in (("age", 0.3), ("sex", 0.7)):
        scored, cross_validated = _primary(held_out, attribute), _primary(in_sample, attribute)
        assert cross_validated["value"] > high and cross_validated["p_value"] < 0.05
        assert scored["value"] < cross_validated["chance"] + 0.15 and scored["p_value"] > 0.05
        assert scored["n"] == 40 and scored["n_fit"] == 80 and cross_validated["n"] == 120
        assert scored["ci_low"] <= scored["value"] <= scored["ci_high"]


def test_probes_tsv_says_which_scope_each_figure_has():
    cohort, embeddings = _memorised()
    for scope in ("held_out", "in_sample_cv"):
        config = CONFIG.model_copy(update={"scope": scope, "n_permutations": 9, "n_bootstrap": 10})
        probes = probe_embeddings(embeddings, cohort, attributes=["age"], subsets=["all"], config=config)
        assert list(probes.columns) == PROBE_COLUMNS and (probes["scope"] == scope).all()
        result = separation(embeddings, cohort, probes, config=config)
        assert result["scope"] == scope
        assert ("n_test_subjects" in result) == (scope == "held_out")


def test_a_planted_signal_in_test_subjects_is_found_with_an_exact_permutation_p():
    rng = np.random.default_rng(3)
    n = 100
    x = rng.normal(size=(n, 5))
    labels = 2 * x[:, 0] + rng.normal(size=n)
    split = np.where(np.arange(n) < 70, "train", "test")
    rows, note = probe_attribute(x, labels, np.arange(n).astype(str), "continuous", CONFIG, splits=split)
    r2 = next(row for row in rows if row["metric"] == "r2")
    assert note == "" and r2["value"] > 0.6 and r2["p_value"] == pytest.approx(1 / 200) and r2["n"] == 30
    # The score depends on the test rows only through their own features and labels.
    moved = labels.copy()
    moved[:70] = rng.permutation(moved[:70])
    rows, _ = probe_attribute(x, moved, np.arange(n).astype(str), "continuous", CONFIG, splits=split)
    assert next(row for row in rows if row["metric"] == "r2")["value"] < 0.3


def test_too_few_test_subjects_is_a_warning_per_attribute_and_an_error_when_nothing_is_scored(capsys):
    cohort, embeddings = _memorised()
    # 3 test subjects, all of them are patients (even ids): sex in target has too few per class.
    embeddings["split"] = np.where(np.arange(120) < 117, "train", "test")
    with pytest.raises(ConfigError, match=r"age in all: too few test subjects: 3 \(< 4\).*splits.test_fraction"):
        probe_embeddings(embeddings, cohort, attributes=["age", "sex"], subsets=["all"], config=CONFIG)
    embeddings["split"] = np.where(np.arange(120) < 110, "train", "test")
    embeddings.loc[embeddings["participant_id"].isin(cohort.table.loc[cohort.table["sex"] == "F", "participant_id"])
                   & embeddings["split"].eq("test"), "split"] = "train"
    embeddings.loc[embeddings.index[:1], "split"] = "test"  # one test subject of the other sex at most
    capsys.readouterr()
    probes = probe_embeddings(embeddings, cohort, attributes=["age", "sex"], subsets=["all"], config=CONFIG)
    assert _primary(probes, "age")["metric"] == "r2"
    sex = probes[probes["attribute"] == "sex"]
    assert (sex["metric"] == "none").all() and sex["note"].str.contains(r"too few test subjects: class \w has [01]").all()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: held-out probe: sex")]
    assert len(warnings) == 1 and "splits.test_fraction" in warnings[0]


def test_embeddings_without_a_test_split_are_refused_with_the_fix():
    cohort, embeddings = _memorised()
    with pytest.raises(ConfigError, match="in_sample_cv"):
        probe_embeddings(embeddings.drop(columns="split"), cohort, attributes=["age"], config=CONFIG)


def test_the_separation_bench_scores_with_the_probe_package():
    assert bench.held_out_score is held_out_score
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 3))
    y = x[:, 0] + 0.1 * rng.normal(size=60)
    train, test = np.arange(60) < 40, np.arange(60) >= 40
    assert held_out_score(x, y, "continuous", train, test)["value"] > 0.9
    assert held_out_score(x, y, "continuous", train, test & (np.arange(60) < 43)) is None  # 3 test subjects


def test_a_pipeline_without_test_subjects_is_refused_before_training(tiny_cohort):
    from neurocl.config import load_pipeline

    settings = ["splits.test_fraction=0"]
    with pytest.raises(ConfigError, match=r"splits.test_fraction is 0.*in_sample_cv"):
        load_pipeline(REPO / "pipelines" / "demo.yaml", overrides={"cohort": str(tiny_cohort)}, settings=settings)
    config = load_pipeline(REPO / "pipelines" / "demo.yaml", overrides={"cohort": str(tiny_cohort)},
                           settings=settings + ["evaluation.probe.scope=in_sample_cv"])
    assert config.evaluation.probe.scope == "in_sample_cv"


def test_a_split_too_small_for_held_out_probes_is_refused_before_the_first_write(tiny_cohort, tmp_path):
    # 32 subjects, test_fraction 0.05: 1-2 test participants, below the held-out minimum; refused
    # before the store or the run folder is written, not after training.
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"test participant\(s\) of 32; held-out probes need at least 4.*in_sample_cv"):
        run_pipeline(REPO / "pipelines" / "demo.yaml", out, overrides={"cohort": str(tiny_cohort)},
                     settings=["splits.test_fraction=0.05", f"outputs.store={tmp_path / 'store'}"])
    assert not out.exists() and not (tmp_path / "store").exists()
