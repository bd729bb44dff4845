"""Which attributes live in which space, whether background subjects collapse in the salient space,
and (synthetic cohorts) how well each latent factor is recovered."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from neurocl.config import ProbeConfig
from neurocl.embed import embedding_spaces, join_embeddings
from neurocl.errors import CohortError
from neurocl.io import read_tsv
from neurocl.probe.cv import cross_validated_predictions, group_folds, outer_folds
from neurocl.probe.heldout import TEST_SPLIT, fit_and_test_rows, held_out_folds, test_size_note
from neurocl.probe.metrics import PRIMARY_METRIC, score
from neurocl.probe.probe import GROUP_ATTRIBUTE, probe_attribute
from neurocl.probe.truth import cluster_recovery
from neurocl.probe.verdicts import with_verdicts


def separation(embeddings: pd.DataFrame, cohort, probes: pd.DataFrame, ground_truth=None, config: ProbeConfig | None = None) -> dict:
    """Which attributes live where, whether background subjects collapse in the salient space, and
    (with ground truth) how well each latent factor is recovered.

    Parameters
    ----------
    embeddings, cohort : as for :func:`probe_embeddings`
    probes : DataFrame from :func:`probe_embeddings`
    ground_truth : path or DataFrame or None
        ``ground_truth.tsv`` of a synthetic cohort (participant_id + one column per factor).

    Returns
    -------
    dict (separation.json)
        ``attributes``: per attribute and subset, per space: the primary score, its CI, p-value, the
        p-value adjusted across every primary test (Benjamini-Hochberg) and the verdict
        (:mod:`neurocl.probe.verdicts`), plus the chance score, ``decodable_from`` and
        ``inconclusive_in`` (the spaces with each verdict), ``same_subjects_as`` (a subset ``all``
        that scores the target subjects only) and ``salient_minus_common``. ``background_collapse`` (two-space embeddings): mean salient norm of
        background and target rows, their ratio, the AUC of the salient norm for target vs background,
        and the cross-validated target-vs-background AUC of a probe on the salient space.
        ``ground_truth`` (optional): held-out R^2 of each factor from each space, the MCC, and
        ``clustering``: ARI and NMI of k-means against each subtype-like factor on the target test
        subjects (:func:`neurocl.probe.truth.cluster_recovery`).
    """
    config = config or ProbeConfig()
    spaces = embedding_spaces(embeddings)
    result = {"scope": config.scope, **_scored_subjects(embeddings, config),
              "spaces": {name: len(columns) for name, columns in spaces.items()}, "attributes": _decodability(probes)}
    if "salient" in spaces:
        result["background_collapse"] = _background_collapse(embeddings, cohort, spaces["salient"], probes, config)
    if ground_truth is not None:
        truth = ground_truth if isinstance(ground_truth, pd.DataFrame) else read_tsv(ground_truth)
        result["ground_truth"] = ground_truth_recovery(embeddings, ground_truth, config)
        result["ground_truth"]["clustering"] = cluster_recovery(embeddings, cohort, truth, config)
    return result


def _scored_subjects(embeddings: pd.DataFrame, config: ProbeConfig) -> dict:
    """Who the figures are computed on: the number of test subjects (held out), or of every subject (in-sample)."""
    if config.scope == "held_out" and "split" in embeddings.columns:
        return {"n_test_subjects": int(embeddings.loc[embeddings["split"].eq(TEST_SPLIT), "participant_id"].nunique())}
    return {"n_subjects": int(embeddings["participant_id"].nunique())}


def _decodability(probes: pd.DataFrame) -> dict:
    out: dict = {}
    judged = with_verdicts(probes)
    scored = judged[judged["metric"].isin(PRIMARY_METRIC.values())]
    for (attribute, subset), rows in scored.groupby(["attribute", "subset"], sort=False):
        entry = {"metric": rows["metric"].iloc[0], "chance": _finite(rows["chance"].iloc[0]), "spaces": {}}
        if rows["repeats"].all():
            entry["same_subjects_as"] = "target" if "target" in set(scored.loc[scored["attribute"] == attribute, "subset"]) \
                else "background"
        for _, row in rows.iterrows():
            entry["spaces"][row["space"]] = {
                "value": _finite(row["value"]),
                "ci": [_finite(row["ci_low"]), _finite(row["ci_high"])],
                "p_value": _finite(row["p_value"]),
                "p_adjusted": _finite(row["p_adjusted"]),
                "verdict": row["verdict"],
            }
        # neurocl.probe.verdicts: the CI above chance and the BH-adjusted p below ALPHA.
        entry["decodable_from"] = [space for space, values in entry["spaces"].items() if values["verdict"] == "decodable"]
        entry["inconclusive_in"] = [space for space, values in entry["spaces"].items() if values["verdict"] == "inconclusive"]
        if {"common", "salient"} <= entry["spaces"].keys():
            common, salient = entry["spaces"]["common"]["value"], entry["spaces"]["salient"]["value"]
            entry["salient_minus_common"] = None if common is None or salient is None else salient - common
        out.setdefault(attribute, {})[subset] = entry
    return out


def _background_collapse(embeddings, cohort, salient_columns, probes, config) -> dict:
    table = join_embeddings(embeddings, cohort)
    table = table[table["group"].notna()]
    if config.scope == "held_out":
        # Norms and their AUC on the test subjects: the encoder never trained on them.
        table = table[table["split"].eq(TEST_SPLIT)] if "split" in table.columns else table.iloc[:0]
    norms = np.linalg.norm(table[salient_columns].to_numpy(dtype=np.float64), axis=1)
    is_target = table["group"].eq("target").to_numpy()
    if is_target.all() or not is_target.any():
        return {"note": "needs both background and target rows"}
    background_norm, target_norm = float(norms[~is_target].mean()), float(norms[is_target].mean())
    out = {
        "scope": config.scope,
        "n_background": int(table.loc[~is_target, "participant_id"].nunique()),
        "n_target": int(table.loc[is_target, "participant_id"].nunique()),
        "salient_norm_background": background_norm,
        "salient_norm_target": target_norm,
        "norm_ratio": background_norm / target_norm if target_norm > 0 else None,
        "norm_auc": float(score("roc_auc", is_target.astype(int), np.stack([-norms, norms], axis=1))[0]),
    }
    group_rows = probes[(probes["space"] == "salient") & (probes["attribute"] == GROUP_ATTRIBUTE) & (probes["subset"] == "all")]
    auc = group_rows[group_rows["metric"] == "roc_auc"]
    if auc.empty:
        # No group probe in probes.tsv (not asked for): probe it here, with the same scope.
        every = join_embeddings(embeddings, cohort)
        every = every[every["group"].notna()]
        splits = every["split"].to_numpy(dtype=object) if "split" in every.columns else None
        rows, _ = probe_attribute(every[salient_columns].to_numpy(), every["group"].to_numpy(),
                                  every["participant_id"].to_numpy(), "categorical", config, splits=splits)
        auc = pd.DataFrame([r for r in rows if r["metric"] == "roc_auc"])
    if not auc.empty:
        row = auc.iloc[0]
        out["probe_auc"] = _finite(row["value"])
        out["probe_auc_ci"] = [_finite(row["ci_low"]), _finite(row["ci_high"])]
        out["probe_auc_p_value"] = _finite(row["p_value"])
    return out


def _finite(value):
    return float(value) if value is not None and np.isfinite(value) else None


def ground_truth_recovery(embeddings: pd.DataFrame, ground_truth, config: ProbeConfig | None = None) -> dict:
    r"""How well each space recovers each latent factor of a synthetic cohort, on held-out subjects.

    ``config.scope`` "held_out" (default): ridge fitted on the ``train``/``val`` rows of the
    embeddings' ``split`` column, scored on its ``test`` rows (the MCC's matching is also made on the
    fitting rows); "in_sample_cv": cross-validated over every subject (out-of-fold for the probe,
    in-sample for the encoder).

    * ``r2[subset][space][factor]``: ridge R^2 (same inner penalty choice as the probes,
      no permutations). Categorical factors (text, or integers with at most 10 values) are one-hot
      encoded and their R^2 is the mean over indicators. Subsets: all subjects, and target only
      (target-only factors such as severity are 0 for every background subject).
    * ``mcc[space]``: mean correlation coefficient. In each outer fold, dimensions and continuous
      factors are matched by the Hungarian algorithm on the training rows' absolute Pearson
      correlations; the matched pairs' absolute correlations are then measured on the test rows and
      averaged over folds. Meant for spaces whose dimensions match factors one to one
      (``n_dimensions`` == ``n_factors``); otherwise min(d, f) pairs are matched.

    Parameters
    ----------
    embeddings : DataFrame with participant_id and space columns
    ground_truth : path to ground_truth.tsv or DataFrame (participant_id, [group], factor columns)
    """
    config = config or ProbeConfig()
    source = str(ground_truth) if not isinstance(ground_truth, pd.DataFrame) else "ground truth"
    truth = read_tsv(ground_truth) if not isinstance(ground_truth, pd.DataFrame) else ground_truth.copy()
    if "participant_id" not in truth.columns:
        raise CohortError(f"{source}: no participant_id column")
    spaces = embedding_spaces(embeddings)
    factor_columns = [c for c in truth.columns if c not in ("participant_id", "session_id", "group")]
    table = embeddings.drop(columns=[c for c in ("group",) if c in embeddings.columns]).merge(
        truth.drop(columns=[c for c in ("session_id",) if c in truth.columns]), on="participant_id", how="inner"
    )
    if table.empty:
        raise CohortError(f"{source}: no participant_id in common with the embeddings")
    targets = {factor: _factor_targets(table[factor]) for factor in factor_columns}
    groups = table["participant_id"].to_numpy()
    if config.scope == "held_out":
        fit, test = fit_and_test_rows(table["split"].to_numpy(dtype=object) if "split" in table.columns else None)
    else:
        fit = test = None
    group_labels = table["group"] if "group" in table.columns else None
    subsets = {"all": np.ones(len(table), dtype=bool)}
    if group_labels is not None:
        subsets["target"] = group_labels.astype(str).isin(["target", "1", "1.0", "patient"]).to_numpy()
    r2: dict = {}
    for subset, keep in subsets.items():
        for space, columns in spaces.items():
            features = table.loc[keep, columns].to_numpy(dtype=np.float64)
            for factor, values in targets.items():
                split = None if fit is None else (fit[keep], test[keep])
                r2.setdefault(subset, {}).setdefault(space, {})[factor] = _held_out_r2(features, values[keep], groups[keep],
                                                                                      config, split)
    continuous = {f: v[:, 0] for f, v in targets.items() if v.shape[1] == 1 and np.ptp(v) > 0}
    mcc = {}
    if continuous:
        factors = np.stack(list(continuous.values()), axis=1)
        if fit is None:
            folds = group_folds(np.zeros(len(table)), groups, "continuous", min(config.n_splits, len(np.unique(groups))),
                                config.seed)
        else:
            folds = held_out_folds(fit, test)
        for space, columns in spaces.items():
            mcc[space] = _held_out_mcc(table[columns].to_numpy(dtype=np.float64), factors, list(continuous), folds, linear_sum_assignment)
    return {"scope": config.scope, "factors": factor_columns, "r2": r2, "mcc": mcc}


def _factor_targets(column: pd.Series) -> np.ndarray:
    """(n, 1) values of a continuous factor, or (n, K) indicators of a categorical one."""
    numeric = pd.to_numeric(column, errors="coerce")
    is_categorical = numeric.isna().any() or (np.allclose(numeric, np.round(numeric)) and numeric.nunique() <= 10 and numeric.nunique() > 2)
    if not is_categorical:
        return numeric.to_numpy(dtype=np.float64)[:, None]
    return pd.get_dummies(column.astype(str)).to_numpy(dtype=np.float64)


def _held_out_r2(features, targets, groups, config, split=None) -> float | None:
    """Mean R^2 over the target columns: out-of-fold (``split`` None) or fitted on ``split[0]`` rows, scored on ``split[1]``."""
    values = []
    for column in targets.T:
        if np.ptp(column) == 0 or len(column) < config.min_samples:
            continue
        if split is not None:
            if test_size_note(column, groups, "continuous", *split):
                continue
            folds = held_out_folds(*split)
        else:
            folds, _ = outer_folds(column, groups, "continuous", config)
        if not folds:
            continue
        predictions = cross_validated_predictions(features, column, groups, "continuous", folds, config)[0]
        tested = np.concatenate([test for _, test in folds])
        values.append(float(score("r2", column[tested], predictions[tested])[0]))
    return float(np.mean(values)) if values else None


def _held_out_mcc(features, factors, names, folds, assignment) -> dict:
    per_fold, matches = [], []
    for train, test in folds:
        train_corr = _abs_correlation(features[train], factors[train])
        dims, facs = assignment(-np.nan_to_num(train_corr))
        test_corr = _abs_correlation(features[test], factors[test])[dims, facs]
        # Matched factors constant on the scored rows (a few test subjects) have no correlation.
        per_fold.append(float(np.mean(test_corr[np.isfinite(test_corr)])) if np.isfinite(test_corr).any() else np.nan)
        matches.append({names[f]: int(d) for d, f in zip(dims, facs)})
    finite = [value for value in per_fold if np.isfinite(value)]
    return {
        "mcc": float(np.mean(finite)) if finite else None,
        "n_dimensions": features.shape[1],
        "n_factors": factors.shape[1],
        "matching_first_fold": matches[0],
    }


def _abs_correlation(a, b) -> np.ndarray:
    """|Pearson r| between each column of a (n, d) and of b (n, f): (d, f); NaN for constant columns."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs((a.T @ b) / np.outer(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)))


def separation_table(result: dict) -> pd.DataFrame:
    """Flatten separation.json's per-attribute section: one row per attribute x subset, one column per space."""
    rows = []
    for attribute, subsets in result.get("attributes", {}).items():
        for subset, entry in subsets.items():
            row = {"attribute": attribute, "subset": subset, "metric": entry["metric"], "chance": entry["chance"]}
            for space, values in entry["spaces"].items():
                row[space] = values["value"]
                row[f"{space}_p"] = values["p_value"]
            row["decodable_from"] = ",".join(entry["decodable_from"]) or "none"
            rows.append(row)
    return pd.DataFrame(rows)
