"""Held-out probes: fitted on the encoder's training (and validation) subjects, scored on its ``test`` subjects.

A probe cross-validated over every subject of a run scores, in part, the subjects the encoder
was trained on: an encoder that memorised its training subjects would look good. Here the rows of
an embeddings table are split by the run's own split manifest (the ``split`` column of
embeddings.tsv): the probe (standardisation, and the penalty chosen by an inner CV grouped by
participant) sees only ``train`` and ``val`` rows; only ``test`` rows are scored. With
``leave_site_out``, each site's test rows are scored by a probe fitted on the other sites' fitting
rows.

Statistics, over the test subjects only:

* 95% CI: participant-level bootstrap of the test predictions (a resampled participant brings all
  of its sessions);
* p-value: the test labels are permuted against the fixed test predictions (whole participants,
  within a site for leave-site-out), ``p = (1 + #{perm >= observed}) / (1 + n_perm)``. The fitted
  probe depends only on the fitting subjects, so under the null (the test subjects' labels are
  unrelated to their embeddings) the test labels are exchangeable given the predictions: the test
  is exact for the question asked ("does this probe generalise to new subjects?") and needs no
  refit. Permuting the fitting subjects' labels instead would test whether *a* probe can be
  learned, mixing in the fit's variance, and costs a refit per permutation;
* chance: 1/K, 0.5, 0, or the MAE of predicting the fitting rows' mean.
"""

from __future__ import annotations

import numpy as np

from neurocl.config import ProbeConfig
from neurocl.errors import ConfigError
from neurocl.probe.cv import bootstrap_weights, cross_validated_predictions, permutation_indices
from neurocl.probe.metrics import METRICS, PRIMARY_METRIC, chance_level, score
from neurocl.probe.permutations import n_extreme

FIT_SPLITS = ("train", "val")
TEST_SPLIT = "test"
# A held-out score needs this many test participants (and, for a categorical attribute, this many
# per class): fewer and the score is noise.
MIN_TEST_PARTICIPANTS = 4
MIN_TEST_PER_CLASS = 2
MIN_FIT_PARTICIPANTS = 8
TOO_FEW = "too few test subjects"
ADVICE = "raise splits.test_fraction (or set evaluation.probe.scope: in_sample_cv, labelled in-sample)"


def fit_and_test_rows(splits) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the fitting rows (``train``/``val``) and the scored rows (``test``) of a split column."""
    if splits is None:
        raise ConfigError("held-out probes need the split of every row (the 'split' column of embeddings.tsv); "
                          "set evaluation.probe.scope: in_sample_cv (neurocl probe --scope in_sample_cv) "
                          "for cross-validation over every subject")
    split = np.asarray(splits).astype(str)
    return np.isin(split, FIT_SPLITS), split == TEST_SPLIT


def held_out_folds(fit, test, sites=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fitting rows, scored rows) pairs: one, or one per site (fitted on the other sites) with ``sites``."""
    fit, test = np.asarray(fit, dtype=bool), np.asarray(test, dtype=bool)
    if sites is None:
        return [(np.flatnonzero(fit), np.flatnonzero(test))]
    sites = np.asarray(sites)
    folds = []
    for site in np.unique(sites[test]):
        train, scored = np.flatnonzero(fit & (sites != site)), np.flatnonzero(test & (sites == site))
        if len(train) and len(scored):
            folds.append((train, scored))
    return folds


def test_size_note(codes, groups, kind: str, fit, test, classes=None) -> str:
    """Empty when the test (and fitting) rows can give a held-out score, else why not (counts of participants)."""
    n_test = len(np.unique(groups[test]))
    n_fit = len(np.unique(groups[fit]))
    if n_test < MIN_TEST_PARTICIPANTS:
        return f"{TOO_FEW}: {n_test} (< {MIN_TEST_PARTICIPANTS}); {ADVICE}"
    if n_fit < MIN_FIT_PARTICIPANTS:
        return f"too few training subjects: {n_fit} (< {MIN_FIT_PARTICIPANTS})"
    if kind == "categorical":
        for k in np.unique(codes[fit | test]):
            name = k if classes is None else classes[k]
            in_test = len(np.unique(groups[test & (codes == k)]))
            if in_test < MIN_TEST_PER_CLASS:
                return (f"{TOO_FEW}: class {name} has {in_test} (< {MIN_TEST_PER_CLASS}) of {n_test}; "
                        f"{ADVICE}")
            if not (fit & (codes == k)).any():
                return f"class {name} has no training subject"
    elif np.ptp(codes[test]) == 0:
        return f"{TOO_FEW}: all {n_test} have the same value; {ADVICE}"
    return ""


def held_out_probe(features, codes, groups, kind: str, n_classes, config: ProbeConfig, fit, test,
                   sites=None, classes=None) -> tuple[list[dict], str]:
    """Scores, 95% CIs, p-values and chance of a probe fitted on ``fit`` rows and scored on ``test`` rows.

    ``codes``: class codes 0..K-1 (categorical) or values; ``fit``/``test``: boolean masks. Returns
    rows as :func:`neurocl.probe.probe.probe_attribute` (``n`` = scored rows, ``n_fit`` = fitting
    rows) and a note (empty, or why nothing was scored).
    """
    fit, test = np.asarray(fit, dtype=bool), np.asarray(test, dtype=bool)
    note = test_size_note(codes, groups, kind, fit, test, classes)
    if note:
        return [], note
    folds = held_out_folds(fit, test, sites)
    if not folds:
        return [], "leave-site-out: no site has both test subjects and training subjects elsewhere"
    predictions = cross_validated_predictions(features, codes, groups, kind, folds, config, n_classes)[0]
    tested = np.concatenate([scored for _, scored in folds])
    rng = np.random.default_rng(config.seed)
    block = np.full(len(codes), -1)
    for position, (_, scored) in enumerate(folds):
        block[scored] = position
    # Permute the test participants' labels against the fixed predictions (module docstring).
    order = permutation_indices(groups[tested], config.n_permutations, rng, blocks=block[tested])
    labels = codes[tested][order]
    observed = predictions[tested]
    resample_weights = bootstrap_weights(groups[tested], config.n_bootstrap, rng)
    n_fit = int(np.unique(np.concatenate([train for train, _ in folds])).size)
    rows = []
    for metric in METRICS[kind]:
        scores = score(metric, labels, np.broadcast_to(observed, (len(labels), *observed.shape)))
        value = float(scores[0])
        p_value = (1 + n_extreme(scores[1:], value, metric)) / (1 + config.n_permutations) if config.n_permutations else np.nan
        ci = (np.nan, np.nan)
        if resample_weights is not None:
            ci = tuple(np.nanpercentile(score(metric, codes[tested], observed, resample_weights), [2.5, 97.5]))
        rows.append(dict(metric=metric, value=value, ci_low=ci[0], ci_high=ci[1], p_value=p_value,
                         n_permutations=config.n_permutations, chance=chance_level(metric, codes, folds, n_classes),
                         n=len(tested), n_fit=n_fit))
    return rows, ""


def held_out_score(features: np.ndarray, labels: np.ndarray, kind: str, train: np.ndarray, test: np.ndarray,
                   probe_config: ProbeConfig | None = None, groups=None) -> dict | None:
    """The primary score of a probe fitted on rows ``train`` (penalty by inner CV there), scored on rows ``test``.

    No statistics (the separation bench's per-representation score). ``groups``: participant of each
    row (default: one row per participant). Returns ``{"metric", "value", "chance", "u", "n_train",
    "n_test"}`` (``u = (value - chance) / (1 - chance)``), or None when either side is too small
    (fewer than 8 / 4 participants, or a single class or value) or the features are not finite.
    """
    probe_config = probe_config or ProbeConfig(n_permutations=0, n_bootstrap=0, n_jobs=1)
    # Only the scored rows: the classes (and so chance) are those of these rows, not of others.
    used = np.flatnonzero(np.asarray(train) | np.asarray(test))
    features, labels = np.asarray(features, dtype=np.float64)[used], np.asarray(labels)[used]
    train, test = np.asarray(train, dtype=bool)[used], np.asarray(test, dtype=bool)[used]
    groups = np.arange(len(used)) if groups is None else np.asarray(groups)[used]
    if not np.isfinite(features).all():
        return None
    if kind == "categorical":
        classes, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
        if len(np.unique(codes[train])) < 2 or len(np.unique(codes[test])) < 2:
            return None
        n_classes = len(classes)
    else:
        codes = np.asarray(labels, dtype=np.float64)
        if np.ptp(codes[train]) == 0:
            return None
        n_classes = None
    # The bench's panel cohorts are small (8 test subjects at 40): a class may have a single test
    # subject there, so only the totals are required (at least 2 classes on either side, above).
    if len(np.unique(groups[train])) < MIN_FIT_PARTICIPANTS or len(np.unique(groups[test])) < MIN_TEST_PARTICIPANTS:
        return None
    if kind == "continuous" and np.ptp(codes[test]) == 0:
        return None
    folds = held_out_folds(train, test)
    predictions = cross_validated_predictions(features, codes, groups, kind, folds, probe_config, n_classes)
    metric = PRIMARY_METRIC[kind]
    scored = folds[0][1]
    value = float(score(metric, codes[None, scored], predictions[:, scored])[0])
    chance = chance_level(metric, codes, folds, n_classes)
    return {"metric": metric, "value": value, "chance": chance, "u": (value - chance) / (1.0 - chance),
            "n_train": int(train.sum()), "n_test": int(test.sum())}
