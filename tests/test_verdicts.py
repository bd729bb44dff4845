"""Tests for neurocl.probe.verdicts: one rule ties 'decodable' to the CI and to p-values adjusted across a table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control

from neurocl.cohort import Cohort
from neurocl.config import load_pipeline
from neurocl.demo import DEMO_PIPELINE
from neurocl.pipeline import _splits
from neurocl.probe.verdicts import adjusted_p, few_targets_warning, repeated_subsets, verdict, with_verdicts
from neurocl.rundir import RunDir


def test_adjusted_p_matches_scipys_benjamini_hochberg_and_keeps_missing_values_out_of_the_count():
    p = np.array([0.0495, 0.01, np.nan, 0.2, 0.03, 0.01, 0.8])
    finite = np.isfinite(p)
    expected = np.full(p.shape, np.nan)
    expected[finite] = false_discovery_control(p[finite], method="bh")
    np.testing.assert_allclose(adjusted_p(p), expected)
    # By hand: six tests; 0.0495 is 4th smallest -> min(0.0495 * 6 / 4, 0.2 * 6 / 5, 0.8) = 0.07425.
    assert adjusted_p(p)[0] == pytest.approx(0.07425)


@pytest.mark.parametrize(("value", "low", "high", "p_adjusted", "expected"), [
    (0.08, -0.62, 0.36, 0.0495, "inconclusive"),   # significant, but the CI spans chance (20 test patients)
    (0.40, 0.30, 0.50, 0.01, "decodable"),
    (0.40, 0.30, 0.50, 0.20, "inconclusive"),      # the CI clears chance, the adjusted p does not
    (0.01, -0.05, 0.06, 0.70, "not decodable"),    # nothing that would matter is left in the CI
    (0.01, -0.09, 0.11, 0.70, "inconclusive"),     # the CI still reaches 0.11
    (-0.30, -0.60, -0.10, 1.0, "not decodable"),   # worse than chance
])
def test_a_verdict_needs_the_ci_and_the_adjusted_p_to_agree(value, low, high, p_adjusted, expected):
    assert verdict(value, low, high, p_adjusted, 0.0, "r2") == expected


def test_without_a_ci_only_the_adjusted_p_can_say_decodable_and_nothing_is_called_not_decodable():
    assert verdict(0.7, np.nan, np.nan, 0.01, 0.5, "balanced_accuracy") == "decodable"
    assert verdict(0.5, np.nan, np.nan, 0.9, 0.5, "balanced_accuracy") == "inconclusive"


def test_lower_is_better_scores_are_judged_below_chance():
    assert verdict(4.0, 3.0, 5.0, 0.01, 8.0, "mae") == "decodable"
    assert verdict(8.0, 7.95, 8.05, 0.9, 8.0, "mae") == "not decodable"


def _rows(subset, value, n):
    return [{"space": space, "attribute": "severity", "subset": subset, "metric": "r2", "value": value + i,
             "ci_low": value + i - 0.1, "ci_high": value + i + 0.1, "p_value": 0.01, "chance": 0.0, "n": n, "n_fit": 30}
            for i, space in enumerate(("common", "salient"))]


def test_an_all_subset_that_scores_the_target_subjects_is_one_test_not_two():
    probes = pd.DataFrame(_rows("all", 0.2, 12) + _rows("target", 0.2, 12) + _rows("background", 0.0, 20))
    assert repeated_subsets(probes).tolist() == [True, True, False, False, False, False]
    judged = with_verdicts(probes)
    # Four distinct tests at p 0.01: each adjusted to 0.01; the repeats take their twins' figures.
    np.testing.assert_allclose(judged["p_adjusted"], 0.01)
    assert judged["verdict"].tolist()[:2] == judged["verdict"].tolist()[2:4]
    different = pd.DataFrame(_rows("all", 0.3, 40) + _rows("target", 0.2, 12))
    assert not repeated_subsets(different).any()


def test_few_target_subjects_in_the_test_split_raise_a_warning_that_names_the_remedies():
    assert few_targets_warning(20) is None and few_targets_warning(None) is None
    warning = few_targets_warning(19)
    assert warning.startswith("only 19 target subjects") and "in_sample_cv" in warning and "cross-fit" in warning


def test_a_run_warns_on_its_console_before_training_when_the_test_split_holds_few_targets(tiny_cohort, tmp_path, capsys):
    cohort = Cohort.from_yaml(tiny_cohort)
    splits = _splits(load_pipeline(DEMO_PIPELINE, overrides={"cohort": str(tiny_cohort)}), cohort, RunDir(tmp_path / "run"))
    tested = set(splits.table.loc[splits.table["split"] == "test", "participant_id"])
    n_target = len(tested & set(cohort.table.loc[cohort.is_target, "participant_id"]))
    assert 0 < n_target < 20
    err = " ".join(capsys.readouterr().err.split())
    assert f"warning: only {n_target} target subjects in the test split" in err
