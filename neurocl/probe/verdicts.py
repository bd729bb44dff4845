"""When a probe's score counts as decodable: one rule for separation.json, the report and the demo.

A score is only as sure as its 95% bootstrap CI, and a table of probes holds many tests, so a
verdict asks both:

* **decodable**: the CI lies wholly above chance and the permutation p-value, adjusted across the
  table's tests (Benjamini-Hochberg), is below ``ALPHA``;
* **not decodable**: the CI lies below chance + ``NEGLIGIBLE``: no score that would matter is left
  in it;
* **inconclusive**: anything else. Typically the CI spans chance and still reaches scores that would
  matter (R² 0.08 [-0.62, 0.36] on 20 test patients), or the CI and the adjusted p disagree.

Without a CI (``n_bootstrap: 0``) the adjusted p decides "decodable"; nothing is then called "not
decodable", since nothing bounds the score.

A row of subset ``all`` that scores exactly the subjects of subset ``target`` (an attribute recorded
for target subjects only, such as a severity score) is the same test: it is shown once and counted
once (:func:`repeated_subsets`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from neurocl.probe.metrics import LOWER_IS_BETTER, PRIMARY_METRIC
from neurocl.probe.permutations import ALPHA

# Scores within this distance of chance (balanced-accuracy or AUC points, R²) are too small to matter.
NEGLIGIBLE = 0.1
# Below this many target subjects in the test split, held-out CIs are too wide to conclude much.
FEW_TARGET_TEST = 20
VERDICTS = ("decodable", "not decodable", "inconclusive")
ADJUSTMENT = "Benjamini-Hochberg"


def adjusted_p(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (missing ones stay missing, and do not count as tests).

    With the m finite p-values sorted, p_(1) <= ... <= p_(m): q_(i) = min_{k >= i} min(1, p_(k)·m/k).
    """
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    if m == 0:
        return adjusted
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return adjusted


def verdict(value, ci_low, ci_high, p_adjusted, chance, metric: str) -> str:
    """'decodable', 'not decodable' or 'inconclusive' for one score (see the module docstring)."""
    def finite(x) -> bool:
        return x is not None and bool(np.isfinite(x))

    if not finite(value) or not finite(chance):
        return "inconclusive"
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0  # lower-is-better scores are mirrored around chance
    significant = finite(p_adjusted) and p_adjusted < ALPHA
    if not (finite(ci_low) and finite(ci_high)):
        return "decodable" if significant and sign * (value - chance) > 0 else "inconclusive"
    worst, best = sorted((sign * (ci_low - chance), sign * (ci_high - chance)))
    if worst > 0 and significant:
        return "decodable"
    if best < NEGLIGIBLE:
        return "not decodable"
    return "inconclusive"


def repeated_subsets(probes: pd.DataFrame) -> pd.Series:
    """True for each row of subset ``all`` whose (space, attribute, metric) scores the same subjects with
    the same result as the ``target`` or ``background`` row (same n, n_fit, value and CI)."""
    keys = ["space", "attribute", "metric"]
    figures = [column for column in ("n", "n_fit", "value", "ci_low", "ci_high") if column in probes.columns]
    repeated = pd.Series(False, index=probes.index)
    others = probes[probes["subset"].isin(["target", "background"])]
    for index, row in probes[probes["subset"] == "all"].iterrows():
        match = others
        for key in keys:
            match = match[match[key] == row[key]]
        for column in figures:
            match = match[(match[column] == row[column]) | (match[column].isna() & pd.isna(row[column]))]
        repeated[index] = not match.empty
    return repeated


def with_verdicts(probes: pd.DataFrame) -> pd.DataFrame:
    """``probes`` (probes.tsv) with ``repeats`` (a subset ``all`` row that repeats another subset's test),
    ``p_adjusted`` (BH across the distinct primary tests) and ``verdict`` (primary rows; empty otherwise)."""
    out = probes.copy()
    out["repeats"] = repeated_subsets(out) if not out.empty else pd.Series(dtype=bool)
    tested = out["metric"].isin(PRIMARY_METRIC.values()) & ~out["repeats"]
    out["p_adjusted"] = np.nan
    out.loc[tested, "p_adjusted"] = adjusted_p(out.loc[tested, "p_value"].astype(float).to_numpy())
    # A repeated row takes the verdict of the test it repeats.
    for index in out.index[out["repeats"] & out["metric"].isin(PRIMARY_METRIC.values())]:
        row = out.loc[index]
        twin = out[tested & (out["space"] == row["space"]) & (out["attribute"] == row["attribute"])
                   & (out["metric"] == row["metric"]) & (out["value"] == row["value"])]
        if not twin.empty:
            out.loc[index, "p_adjusted"] = twin["p_adjusted"].iloc[0]
    primary = out["metric"].isin(PRIMARY_METRIC.values())
    out["verdict"] = ""
    out.loc[primary, "verdict"] = [verdict(r["value"], r["ci_low"], r["ci_high"], r["p_adjusted"], r["chance"], r["metric"])
                                   for _, r in out[primary].iterrows()]
    return out


def n_tests(judged: pd.DataFrame) -> int:
    """The distinct tests of a :func:`with_verdicts` table (what its p-values were adjusted across)."""
    return int((judged["p_adjusted"].notna() & ~judged["repeats"]).sum())


def few_targets_warning(n_target: int | None) -> str | None:
    """A warning when the test split holds fewer than :data:`FEW_TARGET_TEST` target subjects, else None."""
    if n_target is None or n_target >= FEW_TARGET_TEST:
        return None
    return (f"only {n_target} target subjects in the test split (fewer than {FEW_TARGET_TEST}): held-out scores of "
            "target-only attributes have wide CIs and most verdicts on them will be inconclusive. Set "
            "evaluation.probe.scope: in_sample_cv (cross-validated over every subject, labelled in-sample), raise "
            "splits.test_fraction, or cross-fit: several runs whose splits files test each subject once, pooled")


def multiple_testing_note(n_tests: int) -> str:
    """What the adjusted p column is, for a table of ``n_tests`` distinct tests."""
    return (f"p: permutation p-value of each test; adj. p: {ADJUSTMENT} adjusted across the table's {n_tests} "
            f"distinct tests (false discovery rate). Verdicts: decodable = 95% CI wholly above chance and adj. p < "
            f"{ALPHA:g}; not decodable = CI below chance + {NEGLIGIBLE:g}; inconclusive = anything else (a CI that "
            "spans chance and reaches a score that would matter)")
