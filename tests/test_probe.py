"""Linear probes: planted signals are found, noise is at chance, nothing leaks from test folds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, mean_absolute_error, r2_score, roc_auc_score
from typer.testing import CliRunner

import neurocl.probe as probe
from neurocl.probe import solvers
from neurocl.cohort import Cohort
from neurocl.embed import write_embeddings
from neurocl.probe import (
    PROBE_COLUMNS,
    ProbeConfig,
    cross_validated_predictions,
    fit_logistic,
    outer_folds,
    permutation_indices,
    probe_attribute,
    probe_embeddings,
    ridge_path_predictions,
    score,
    separation,
)

# The unit tests of the cross-validation machinery probe every row (in-sample CV); held-out probes
# have their own tests (tests/test_probe_heldout.py) and the fixture below.
FAST = ProbeConfig(scope="in_sample_cv", n_permutations=99, n_bootstrap=200, n_jobs=1)


def _participants(n):
    return np.array([f"sub-{i:03d}" for i in range(n)])


# ----------------------------------------------------------------------------- signal and chance


def test_planted_continuous_signal_is_found():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(120, 8))
    labels = 2.0 * features[:, 0] + rng.normal(size=120)
    rows, note = probe_attribute(features, labels, _participants(120), "continuous", FAST)
    r2 = next(row for row in rows if row["metric"] == "r2")
    assert note == ""
    assert r2["value"] > 0.6 and r2["p_value"] == pytest.approx(1 / 100)
    assert r2["ci_low"] < r2["value"] < r2["ci_high"] and r2["ci_low"] > 0.4
    assert r2["chance"] == 0.0


def test_planted_categorical_signal_is_found():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(120, 8))
    labels = np.where(features[:, 1] + 0.5 * rng.normal(size=120) > 0, "patient", "control")
    rows, _ = probe_attribute(features, labels, _participants(120), "categorical", FAST)
    metrics = {row["metric"]: row for row in rows}
    assert metrics["balanced_accuracy"]["value"] > 0.8 and metrics["roc_auc"]["value"] > 0.9
    assert metrics["balanced_accuracy"]["p_value"] == pytest.approx(1 / 100)
    assert metrics["balanced_accuracy"]["chance"] == 0.5 and metrics["roc_auc"]["chance"] == 0.5


@pytest.mark.parametrize("kind", ["continuous", "categorical"])
def test_random_embeddings_score_at_chance(kind):
    rng = np.random.default_rng(2)
    features = rng.normal(size=(120, 8))
    labels = rng.normal(size=120) if kind == "continuous" else rng.choice(["a", "b", "c"], size=120)
    rows, _ = probe_attribute(features, labels, _participants(120), kind, FAST)
    for row in rows:
        assert row["p_value"] >= 0.05, row
        lower_better = row["metric"] == "mae"
        # A probe that learns nothing is at chance: the CI covers it, or lies on the wrong side of it.
        assert (row["ci_high"] >= row["chance"]) if lower_better else (row["ci_low"] <= row["chance"]), row


# ----------------------------------------------------------------------------- leakage


def _leakage_probe(kind):
    """Predictions of one held-out row before and after changing every other row of its test fold."""
    rng = np.random.default_rng(3)
    n = 60
    features = rng.normal(size=(n, 5))
    labels = features[:, 0] + rng.normal(size=n) if kind == "continuous" else (features[:, 0] > 0).astype(int)
    groups = _participants(n)
    folds, _ = outer_folds(labels, groups, kind, ProbeConfig(n_splits=3))
    config = ProbeConfig(n_splits=3, inner_splits=3)
    _, test = folds[0]
    watched, others = test[0], test[1:]
    before = cross_validated_predictions(features, labels, groups, kind, folds, config)[0, watched]
    # Whole-set statistics would move: other test rows get huge, shifted features and flipped labels.
    changed_features, changed_labels = features.copy(), labels.copy()
    changed_features[others] = changed_features[others] * 50 + 20
    changed_labels[others] = -changed_labels[others] if kind == "continuous" else 1 - changed_labels[others]
    after = cross_validated_predictions(changed_features, changed_labels, groups, kind, folds, config)[0, watched]
    return before, after


@pytest.mark.parametrize("kind", ["continuous", "categorical"])
def test_a_held_out_prediction_ignores_the_rest_of_its_test_fold(kind):
    before, after = _leakage_probe(kind)
    np.testing.assert_allclose(after, before, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["continuous", "categorical"])
def test_the_leakage_check_catches_standardising_on_the_whole_set(kind, monkeypatch):
    def whole_set(train, *others):
        everything = np.concatenate([train, *others])
        mean, scale = everything.mean(0), everything.std(0)
        return [(x - mean) / scale for x in (train, *others)]

    monkeypatch.setattr(solvers, "standardise", whole_set)
    before, after = _leakage_probe(kind)
    assert np.abs(np.asarray(after) - np.asarray(before)).max() > 1e-3


def test_outer_folds_keep_participants_together_and_can_leave_sites_out():
    groups = np.repeat(_participants(20), 2)
    labels = np.tile([0, 1], 20)
    for train, test in outer_folds(labels, groups, "categorical", ProbeConfig(n_splits=4))[0]:
        assert not set(groups[train]) & set(groups[test])
    sites = np.repeat(["A", "B", "C", "D"], 10)
    folds, _ = outer_folds(labels, groups, "categorical", ProbeConfig(), sites=sites)
    assert [set(sites[test]) for _, test in folds] == [{"A"}, {"B"}, {"C"}, {"D"}]


def test_permutations_move_whole_participants():
    groups = np.array(["a", "a", "b", "b", "c", "d", "d", "e"])
    indices = permutation_indices(groups, 50, np.random.default_rng(0))
    assert (indices[0] == np.arange(len(groups))).all()
    for order in indices[1:]:
        assert sorted(order) == list(range(len(groups)))
        for participant in np.unique(groups):
            rows = np.flatnonzero(groups == participant)
            assert len(set(groups[order[rows]])) == 1  # one donor participant per participant


# ----------------------------------------------------------------------------- estimators and metrics


def test_ridge_path_matches_sklearn_on_standardised_features():
    rng = np.random.default_rng(4)
    x_train, x_test, y = rng.normal(size=(40, 6)), rng.normal(size=(10, 6)), rng.normal(size=40)
    mean, sd = x_train.mean(0), x_train.std(0)
    path = ridge_path_predictions(x_train, y[None], x_test, [0.1, 10.0])
    for index, alpha in enumerate([0.1, 10.0]):
        reference = Ridge(alpha=alpha).fit((x_train - mean) / sd, y).predict((x_test - mean) / sd)
        np.testing.assert_allclose(path[index, 0], reference, rtol=1e-8)


def test_logistic_matches_sklearn():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(80, 4))
    y = (x[:, 0] + rng.normal(size=80) > 0).astype(float)
    weights = fit_logistic(torch.from_numpy(x), torch.from_numpy(y)[None], c=0.5)[0].numpy()
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(weights[:-1], reference.coef_[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(weights[-1], reference.intercept_[0], rtol=1e-4, atol=1e-6)


def test_scores_match_sklearn_and_bootstrap_weights_repeat_rows():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 3, size=50)
    proba = rng.dirichlet(np.ones(3), size=50)
    assert score("balanced_accuracy", labels, proba)[0] == pytest.approx(balanced_accuracy_score(labels, proba.argmax(1)))
    assert score("roc_auc", labels, proba)[0] == pytest.approx(roc_auc_score(labels, proba, multi_class="ovr"))
    values, predictions = rng.normal(size=50), rng.normal(size=50)
    assert score("r2", values, predictions)[0] == pytest.approx(r2_score(values, predictions))
    assert score("mae", values, predictions)[0] == pytest.approx(mean_absolute_error(values, predictions))
    counts = rng.integers(0, 3, size=50)
    repeated = np.repeat(np.arange(50), counts)
    binary = (labels == 1).astype(int)
    for metric, y, p in (("roc_auc", binary, proba[:, [0, 1]]), ("r2", values, predictions), ("balanced_accuracy", labels, proba)):
        expected = score(metric, y[repeated], p[repeated])[0]
        assert score(metric, y, p, weights=counts[None].astype(float))[0] == pytest.approx(expected)


# ----------------------------------------------------------------------------- tables, separation, command


@pytest.fixture(scope="module")
def two_space_cohort():
    """100 participants: age in common, severity and group in salient, background collapsed in salient."""
    rng = np.random.default_rng(7)
    n = 100
    ids = _participants(n)
    patient = np.arange(n) % 2 == 0
    age = rng.uniform(20, 80, n)
    severity = np.where(patient, rng.uniform(0, 1, n), np.nan)
    participants = pd.DataFrame({"participant_id": ids, "diagnosis": np.where(patient, "patient", "control"),
                                 "age": age, "sex": rng.choice(["F", "M"], n), "severity": severity})
    cohort = Cohort(participants, images="{participant_id}.nii.gz",
                    group={"column": "diagnosis", "background": ["control"], "target": ["patient"]},
                    attributes={"age": "continuous", "sex": "categorical", "severity": "continuous"})
    common = rng.normal(size=(n, 3))
    common[:, 0] = (age - 50) / 15 + 0.3 * rng.normal(size=n)
    salient = np.where(patient[:, None], rng.normal(size=(n, 3)) * 0.2 + 1, 0.05 * rng.normal(size=(n, 3)))
    salient[patient, 0] += 3 * severity[patient]
    # The run's split manifest: 60 train, 10 val, 30 test subjects (half of each patients).
    split = np.select([np.arange(n) < 60, np.arange(n) < 70], ["train", "val"], "test")
    embeddings = pd.DataFrame({"participant_id": ids, "split": split,
                               **{f"common_{i}": common[:, i] for i in range(3)},
                               **{f"salient_{i}": salient[:, i] for i in range(3)}})
    truth = pd.DataFrame({"participant_id": ids, "group": np.where(patient, "target", "background"), "age": age,
                          "severity": np.nan_to_num(severity)})
    # 99 permutations: the smallest p (0.01) survives the Benjamini-Hochberg adjustment across the
    # table's 16 tests that separation's verdicts apply; 29 (p >= 0.033) could not.
    config = ProbeConfig(n_permutations=99, n_bootstrap=50, n_jobs=1)
    probes = probe_embeddings(embeddings, cohort, config=config)
    return cohort, embeddings, truth, probes, config


def test_probes_table_covers_every_space_attribute_and_subset(two_space_cohort):
    _, _, _, probes, _ = two_space_cohort
    assert list(probes.columns) == PROBE_COLUMNS
    combos = set(zip(probes["space"], probes["attribute"], probes["subset"]))
    for space in ("common", "salient"):
        for attribute in ("age", "sex", "severity"):
            assert {(space, attribute, s) for s in ("all", "target", "background")} <= combos
        assert (space, "group", "all") in combos and (space, "group", "target") not in combos
    skipped = probes[(probes["attribute"] == "severity") & (probes["subset"] == "background")]
    assert (skipped["metric"] == "none").all() and skipped["note"].str.contains("0 labelled rows").all()


def test_separation_says_where_each_attribute_lives(two_space_cohort):
    cohort, embeddings, truth, probes, config = two_space_cohort
    result = separation(embeddings, cohort, probes, ground_truth=truth, config=config)
    attributes = result["attributes"]
    assert attributes["age"]["all"]["decodable_from"] == ["common"]
    assert attributes["severity"]["target"]["decodable_from"] == ["salient"]
    assert "salient" in attributes["group"]["all"]["decodable_from"]
    collapse = result["background_collapse"]
    assert collapse["norm_ratio"] < 0.2 and collapse["norm_auc"] > 0.95 and collapse["probe_auc"] > 0.95
    r2 = result["ground_truth"]["r2"]
    assert r2["all"]["common"]["age"] > 0.8 and r2["all"]["salient"]["age"] < 0.1
    assert r2["target"]["salient"]["severity"] > 0.8
    json.dumps(result)  # JSON-ready


def test_mcc_is_one_when_dimensions_are_the_factors():
    rng = np.random.default_rng(8)
    factors = rng.normal(size=(60, 2))
    ids = _participants(60)
    embeddings = pd.DataFrame({"participant_id": ids, "z_0": factors[:, 1] * 3, "z_1": -factors[:, 0]})
    truth = pd.DataFrame({"participant_id": ids, "f_a": factors[:, 0], "f_b": factors[:, 1]})
    mcc = probe.ground_truth_recovery(embeddings, truth, ProbeConfig(scope="in_sample_cv", n_jobs=1))["mcc"]["z"]
    assert mcc["mcc"] == pytest.approx(1.0)
    assert mcc["matching_first_fold"] == {"f_a": 1, "f_b": 0}


def test_probe_command_writes_probes_and_separation(tiny_cohort, tmp_path):
    from neurocl.cli import app

    cohort = Cohort.from_yaml(tiny_cohort)
    rng = np.random.default_rng(9)
    embeddings = cohort.keys().assign(**{f"emb_{i}": rng.normal(size=len(cohort)) for i in range(3)})
    embeddings["emb_0"] += cohort.table["age"].to_numpy() / 10
    write_embeddings(tmp_path / "embeddings.tsv", embeddings, cohort)  # with its sidecar, as neurocl writes it
    result = CliRunner().invoke(app, ["probe", str(tmp_path / "embeddings.tsv"), "--cohort", str(tiny_cohort),
                                      "--attributes", "age,group", "--scope", "in_sample_cv", "--n-permutations", "9", "--n-bootstrap", "20", "--jobs", "1",
                                      "--ground-truth", str(tiny_cohort.parent / "ground_truth.tsv"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    probes = pd.read_csv(tmp_path / "out" / "probes.tsv", sep="\t")
    assert set(probes["attribute"]) == {"age", "group"} and set(probes["space"]) == {"emb"}
    separation_json = json.loads((tmp_path / "out" / "separation.json").read_text())
    assert "age" in separation_json["attributes"] and "ground_truth" in separation_json
    assert (tmp_path / "out" / "separation.tsv").is_file()


def test_unknown_attribute_is_a_clear_error(two_space_cohort):
    from neurocl.errors import ConfigError

    cohort, embeddings, _, _, config = two_space_cohort
    with pytest.raises(ConfigError, match="'weight'"):
        probe_embeddings(embeddings, cohort, attributes=["weight"], config=config)


def test_parallel_probes_equal_serial_ones(two_space_cohort):
    cohort, embeddings, _, _, _ = two_space_cohort
    settings = dict(n_permutations=9, n_bootstrap=20)
    serial = probe_embeddings(embeddings, cohort, attributes=["age", "sex"], subsets=["all"], config=ProbeConfig(n_jobs=1, **settings))
    parallel = probe_embeddings(embeddings, cohort, attributes=["age", "sex"], subsets=["all"], config=ProbeConfig(n_jobs=2, **settings))
    pd.testing.assert_frame_equal(serial, parallel)


def test_a_skip_expected_in_every_space_is_reported_once(tiny_cohort, capsys):
    from neurocl.cohort import Cohort
    from neurocl.probe import ProbeConfig, probe_embeddings

    cohort = Cohort.from_yaml(tiny_cohort)
    rng = np.random.default_rng(0)
    embeddings = cohort.keys().assign(split="train", group=cohort.table["group"].to_numpy())
    for space in ("common", "salient"):
        for i in range(2):
            embeddings[f"{space}_{i}"] = rng.standard_normal(len(cohort))
    config = ProbeConfig(scope="in_sample_cv", n_permutations=0, n_bootstrap=0, n_splits=2)
    capsys.readouterr()
    probes = probe_embeddings(embeddings, cohort, attributes=["severity"], config=config)
    skipped = probes[(probes["metric"] == "none") & (probes["subset"] == "background")]
    assert sorted(skipped["space"]) == ["common", "salient"]
    messages = [line for line in capsys.readouterr().err.splitlines() if "severity in background" in line]
    assert len(messages) == 1 and messages[0].endswith("spaces common, salient")


# ----------------------------------------------------------------------------- solvers in the row span


def test_logistic_with_more_dimensions_than_rows_matches_sklearn():
    """d > n: the probe solves in the span of the training rows; the probabilities are sklearn's."""
    rng = np.random.default_rng(12)
    x_train, x_test = rng.normal(size=(24, 40)), rng.normal(size=(10, 40))
    y = (x_train[:, 0] + 0.5 * rng.normal(size=24) > 0).astype(np.int64)
    proba = solvers.logistic_path_proba(x_train, y[None], x_test, 2, [0.1, 1.0])  # (C, P, m, K)
    mean, sd = x_train.mean(0), x_train.std(0)
    for position, c in enumerate([0.1, 1.0]):
        reference = LogisticRegression(C=c, tol=1e-12, max_iter=100_000).fit((x_train - mean) / sd, y)
        expected = reference.predict_proba((x_test - mean) / sd)
        np.testing.assert_allclose(proba[position, 0], expected, atol=1e-5)


# ----------------------------------------------------------------------------- adaptive permutations


@pytest.mark.parametrize(("n_extreme", "n_drawn"), [(0, 99), (0, 199), (1, 199), (5, 99), (30, 99), (60, 799), (40, 799)])
def test_decision_is_clear_when_the_exact_binomial_interval_excludes_alpha(n_extreme, n_drawn):
    from scipy.stats import binomtest

    from neurocl.probe.permutations import ALPHA, DECISION_RISK, decision_is_clear

    interval = binomtest(n_extreme, n_drawn).proportion_ci(confidence_level=1 - DECISION_RISK, method="exact")
    expected = interval.high < ALPHA or interval.low > ALPHA
    assert decision_is_clear(n_extreme, n_drawn) == expected


def test_permutation_rounds_double_the_total_up_to_the_cap():
    from neurocl.probe.permutations import permutation_checkpoints

    assert permutation_checkpoints(1000) == [99, 199, 399, 799, 1000]
    assert permutation_checkpoints(99) == [99]
    assert permutation_checkpoints(20) == [20]


def _probe_p(features, labels, kind, **settings):
    config = ProbeConfig(scope="in_sample_cv", n_bootstrap=0, n_jobs=1, **settings)
    rows, _ = probe_attribute(features, labels, _participants(len(labels)), kind, config)
    return {row["metric"]: (row["value"], row["p_value"], row["n_permutations"]) for row in rows}


def test_a_null_attribute_stops_after_99_permutations_and_a_strong_one_after_199():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(120, 5))
    null = _probe_p(x, rng.normal(size=120), "continuous", n_permutations=999)["r2"]
    strong = _probe_p(x, 2 * x[:, 0] + rng.normal(size=120), "continuous", n_permutations=999)["r2"]
    assert null[2] == 99 and null[1] > 0.2
    assert strong[2] == 199 and strong[1] == pytest.approx(1 / 200)


def test_adaptive_p_values_are_those_of_the_fixed_test_on_the_permutations_used():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(60, 4))
    labels = (x[:, 0] + 2 * rng.normal(size=60) > 0).astype(int)
    adaptive = _probe_p(x, labels, "categorical", n_permutations=999)
    used = adaptive["balanced_accuracy"][2]
    assert used < 999
    fixed = _probe_p(x, labels, "categorical", n_permutations=used, adaptive_permutations=False)
    assert fixed == adaptive
    everything = _probe_p(x, labels, "categorical", n_permutations=999, adaptive_permutations=False)
    assert everything["balanced_accuracy"][2] == 999
    # Same decision at 0.05 as all 999 permutations.
    assert (adaptive["balanced_accuracy"][1] < 0.05) == (everything["balanced_accuracy"][1] < 0.05)


# ----------------------------------------------------------------------------- progress in a log


def test_progress_in_a_log_file_is_one_line_per_attribute(two_space_cohort, capsys):
    cohort, embeddings, _, _, _ = two_space_cohort
    config = ProbeConfig(n_permutations=9, n_bootstrap=10, n_jobs=2)
    probes = probe_embeddings(embeddings, cohort, attributes=["age", "sex", "group"], config=config, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("probed ")]
    assert [line.split(" (")[0] for line in lines] == ["probed age", "probed sex", "probed group"]
    assert lines[-1].startswith("probed group (3/3 attributes, ")
    # Tasks ran attribute by attribute, the table keeps the space-major order.
    assert list(probes["space"].drop_duplicates()) == ["common", "salient"]
    assert probes.loc[probes["space"] == "common", "attribute"].iloc[0] == "age"
