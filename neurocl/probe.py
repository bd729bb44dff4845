"""Linear probes of clinical attributes from embedding spaces, with honest statistics.

Which attributes live in which space? For every space (``common_*``, ``salient_*``,
``emb_*`` or any other ``prefix_<i>`` column block of an embeddings table), every
attribute and every subset of subjects (all, target, background) we fit a linear
probe and report a cross-validated score with a bootstrap 95% CI, a permutation
p-value and the score expected by chance (format: ``probes.tsv`` in DESIGN.md;
what each number means: ``docs/probing.md``).

The protocol, so that nothing is ever fit on a test fold:

* outer CV over participants (a participant's rows share a fold; stratified by class
  for categorical attributes) or leave-one-site-out;
* inside each outer training fold, standardisation is fit on the training rows
  only and the regularisation (ridge ``alpha`` or logistic ``C``) is chosen by an
  inner CV over the participants of those rows (not stratified, so that it treats
  observed and permuted labels alike);
* the score is computed once from the pooled out-of-fold predictions;
* the bootstrap resamples participants of those out-of-fold predictions;
* the permutation test permutes the labels (whole participants, within their outer
  test fold, so every permutation is as stratified as the observed labels) and reruns
  the whole scheme, inner selection included: p = (1 + #{perm >= observed}) / (1 + n_perm).

Refitting a few hundred times is affordable because the probes are batched over
label vectors: ridge is solved in closed form from one SVD per fold for every
alpha and every permutation at once, and logistic regression (one-vs-rest beyond two
classes) is a damped Newton solver run on all permutations and classes together
(torch, float64). Probes run in parallel threads (``ProbeConfig.n_jobs``).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy.stats import rankdata
from sklearn.model_selection import KFold, LeaveOneGroupOut, StratifiedKFold

from neurocl.errors import CohortError, ConfigError

logger = logging.getLogger(__name__)

PROBE_COLUMNS = ["space", "attribute", "subset", "metric", "value", "ci_low", "ci_high", "p_value", "chance", "n", "note"]
SUBSETS = ("all", "target", "background")
GROUP_ATTRIBUTE = "group"
METRICS = {"categorical": ("balanced_accuracy", "roc_auc"), "continuous": ("r2", "mae")}
# The metric that says "is this attribute decodable": the first of each kind.
PRIMARY_METRIC = {kind: metrics[0] for kind, metrics in METRICS.items()}
LOWER_IS_BETTER = {"mae"}
_KEY_COLUMNS = ("participant_id", "session_id")
_SPACE_COLUMN = re.compile(r"^(?P<prefix>[A-Za-z][A-Za-z0-9]*)_(?P<index>\d+)$")


class ProbeConfig(BaseModel):
    """Cross-validation and statistics settings of the probes.

    Attributes
    ----------
    n_splits : int
        Outer CV folds (grouped by participant). Reduced, with a note, when a
        class has fewer participants than folds.
    inner_splits : int
        Inner CV folds, inside each outer training fold, that choose the regularisation.
    n_permutations : int
        Label permutations for the p-value (0: no p-value).
    n_bootstrap : int
        Participant-level bootstrap resamples of the out-of-fold predictions for the 95% CI (0: no CI).
    leave_site_out : str or None
        Column of the cohort table (e.g. ``site``) whose values are held out one at a
        time in the outer CV instead of grouped k-fold.
    ridge_alphas : list of float
        Ridge penalties searched by the inner CV (features standardised).
    logistic_cs : list of float
        Inverse L2 penalties of the logistic regression searched by the inner CV.
    min_samples : int
        Fewer labelled rows than this and the combination is skipped (with a note).
    n_jobs : int
        Probes run in parallel threads (-1: one per CPU core); results do not depend on it.
    seed : int
        Seeds the folds, the permutations and the bootstrap.
    """

    model_config = ConfigDict(extra="forbid")

    n_splits: int = Field(5, ge=2)
    inner_splits: int = Field(3, ge=2)
    n_permutations: int = Field(200, ge=0)
    n_bootstrap: int = Field(1000, ge=0)
    leave_site_out: str | None = None
    ridge_alphas: list[float] = Field(default_factory=lambda: np.logspace(-2, 4, 13).tolist(), min_length=1)
    logistic_cs: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0], min_length=1)
    min_samples: int = Field(10, ge=4)
    n_jobs: int = Field(-1, description="Threads probing in parallel (-1: one per CPU core).")
    seed: int = 0

    @field_validator("n_jobs")
    @classmethod
    def _jobs(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"must be >= 1 or -1 (every core), got {value}")
        return value

    @field_validator("ridge_alphas", "logistic_cs")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        bad = [value for value in values if not value > 0]
        if bad:
            raise ValueError(f"every value must be > 0, got {bad}")
        return sorted(values)


# ----------------------------------------------------------------------------- tables


def embedding_spaces(embeddings: pd.DataFrame) -> dict[str, list[str]]:
    """Group the numeric ``prefix_<i>`` columns of an embeddings table into spaces.

    Returns
    -------
    dict
        ``{"common": ["common_0", ...], "salient": [...]}`` in column-index order,
        spaces in the order they first appear.
    """
    spaces: dict[str, list[tuple[int, str]]] = {}
    for column in embeddings.columns:
        match = _SPACE_COLUMN.match(str(column))
        if match is None or column in _KEY_COLUMNS or not pd.api.types.is_numeric_dtype(embeddings[column]):
            continue
        spaces.setdefault(match["prefix"], []).append((int(match["index"]), column))
    return {prefix: [name for _, name in sorted(columns)] for prefix, columns in spaces.items()}


def join_embeddings(embeddings: pd.DataFrame, cohort, source: str = "embeddings") -> pd.DataFrame:
    """Attach the cohort's group and attributes to the embeddings, by participant (and session).

    Rows of either table without a partner are logged as a warning naming them;
    an empty join or duplicated keys raise :class:`CohortError`.

    Returns
    -------
    DataFrame
        The embeddings' keys and space columns, then ``group`` and every cohort
        attribute (from the cohort, not from the embeddings), one row per matched embedding row.
    """
    if "participant_id" not in embeddings.columns:
        raise CohortError(f"{source}: no participant_id column (columns: {list(embeddings.columns)})")
    table = cohort.table
    keys = ["participant_id"]
    if "session_id" in embeddings.columns and "session_id" in table.columns:
        keys.append("session_id")
    elif getattr(cohort, "has_sessions", False):
        raise CohortError(f"{source}: the cohort has sessions but the embeddings have no session_id column")
    duplicated = embeddings.duplicated(keys, keep=False)
    if duplicated.any():
        first = embeddings.loc[duplicated, keys].iloc[0].tolist()
        raise CohortError(f"{source}: {int(duplicated.sum())} rows share their {'/'.join(keys)} (first: {first})")
    space_columns = [column for columns in embedding_spaces(embeddings).values() for column in columns]
    left = embeddings[keys + [c for c in ("split",) if c in embeddings.columns] + space_columns].copy()
    attribute_names = list(getattr(cohort, "attribute_kinds", {}))
    right = table[keys + ["group"] + attribute_names].copy()
    for key in keys:
        left[key] = left[key].astype(str)
        right[key] = right[key].astype(str)
    merged = left.merge(right, on=keys, how="outer", indicator=True)
    only_embeddings = merged.loc[merged["_merge"] == "left_only", keys]
    only_cohort = merged.loc[merged["_merge"] == "right_only", keys]
    if len(only_embeddings):
        warnings.warn(
            f"{source}: {len(only_embeddings)} rows not in the cohort, ignored "
            f"(e.g. {', '.join(only_embeddings['participant_id'].head(5))})",
            stacklevel=2,
        )
    if len(only_cohort):
        logger.info("%d cohort rows have no embedding (e.g. %s)", len(only_cohort), ", ".join(only_cohort["participant_id"].head(5)))
    merged = merged[merged["_merge"] == "both"].drop(columns="_merge").reset_index(drop=True)
    if merged.empty:
        raise CohortError(
            f"{source}: no row matches the cohort by {'/'.join(keys)} "
            f"(first ids: embeddings {embeddings['participant_id'].head(3).tolist()}, cohort {table['participant_id'].head(3).tolist()})"
        )
    return merged


# ----------------------------------------------------------------------------- folds


def outer_folds(labels, groups, kind: str, config: ProbeConfig, sites=None) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Outer CV folds: grouped by participant (stratified for categorical), or leave-one-site-out.

    Parameters
    ----------
    labels : (n,) array
        Class codes (categorical) or values (continuous), no missing values.
    groups : (n,) array
        Participant of each row: a participant's rows always share a fold.
    sites : (n,) array or None
        With it, each site is one test fold (LeaveOneGroupOut).

    Returns
    -------
    folds : list of (train_rows, test_rows)
    note : str
        Empty, or why the fold count differs from the config.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    if sites is not None:
        n_sites = len(np.unique(sites))
        if n_sites < 2:
            return [], f"leave-site-out needs >= 2 sites, found {n_sites}"
        return list(LeaveOneGroupOut().split(labels, labels, sites)), ""
    n_splits, note = _fold_count(labels, groups, kind, config.n_splits)
    if n_splits < 2:
        return [], note
    return _group_folds(labels, groups, kind, n_splits, config.seed), note


def _fold_count(labels, groups, kind, wanted) -> tuple[int, str]:
    n_groups = len(np.unique(groups))
    limit, why = n_groups, f"{n_groups} participants"
    if kind == "categorical":
        per_class = pd.Series(groups).groupby(labels).nunique()
        if per_class.min() < limit:
            limit, why = int(per_class.min()), f"class {per_class.idxmin()} has {int(per_class.min())} participants"
    if limit >= wanted:
        return wanted, ""
    return limit, f"{limit} folds instead of {wanted}: {why}"


def _group_folds(labels, groups, kind, n_splits, seed) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds of participants (stratified by each participant's first label for categorical), as row indices.

    Splitting the participants, then mapping them to their rows, keeps every row of a
    participant in one fold; it is also much faster than sklearn's ``StratifiedGroupKFold``.
    """
    unique, first_row, participant_of_row = np.unique(groups, return_index=True, return_inverse=True)
    if kind == "categorical":
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Classes smaller than the fold count were already handled by _fold_count.
        warnings.simplefilter("ignore", UserWarning)
        participant_folds = list(splitter.split(np.zeros(len(unique)), np.asarray(labels)[first_row]))
    return [
        (np.flatnonzero(np.isin(participant_of_row, train)), np.flatnonzero(np.isin(participant_of_row, test)))
        for train, test in participant_folds
    ]


# ----------------------------------------------------------------------------- estimators


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale by the training rows' mean and SD only (constant features keep SD 1)."""
    mean = train.mean(axis=0)
    scale = train.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return [(x - mean) / scale for x in (train, *others)]


def ridge_path_predictions(x_train, y_train, x_test, alphas) -> np.ndarray:
    r"""Ridge predictions for every penalty and every label vector at once.

    With standardised training features :math:`X = U S V^\top` and centred labels,
    the ridge solution is :math:`w_\alpha = V \,\mathrm{diag}(s / (s^2 + \alpha))\, U^\top (y - \bar y)`,
    so one SVD serves all alphas and all (permuted) label vectors.

    Parameters
    ----------
    x_train : (n, d) ; y_train : (P, n) ; x_test : (m, d) ; alphas : (A,)

    Returns
    -------
    (A, P, m) predictions.
    """
    x_train, x_test = _standardise(x_train, x_test)
    u, s, vt = np.linalg.svd(x_train, full_matrices=False)
    y_mean = y_train.mean(axis=1, keepdims=True)
    projected_labels = u.T @ (y_train - y_mean).T  # (k, P)
    projected_test = x_test @ vt.T  # (m, k)
    shrink = s[None, :] / (s[None, :] ** 2 + np.asarray(alphas)[:, None])  # (A, k)
    return np.einsum("mk,ak,kp->apm", projected_test, shrink, projected_labels) + y_mean[None]


def fit_logistic(x, targets, c: float, init=None, max_iter: int = 50, tol: float = 1e-6, bound_iterations: int = 8):
    r"""L2-penalised binary logistic regressions for many label vectors at once.

    Minimises, for each label vector p,
    :math:`\sum_i \left[\log(1 + e^{f_i}) - t_{pi} f_i\right] + \lVert w \rVert^2 / (2C)`,
    :math:`f_i = w^\top x_i + b`, like sklearn's ``LogisticRegression(C=c)`` (lbfgs). The intercept
    carries a 1e-8 penalty only, so that a label vector with a single class keeps a finite solution.

    Parameters
    ----------
    x : Tensor (n, d)
        Standardised features (float64).
    targets : Tensor (P, n)
        0/1 labels of P problems (observed, permuted, one-vs-rest columns).
    c : float
        Inverse penalty (sklearn's ``C``).
    init : Tensor (P, d + 1) or None
        Warm start (the previous C of a path).
    max_iter, bound_iterations : int
        Newton steps at most, after at most ``bound_iterations`` bound-optimisation steps.
    tol : float
        Converged when every gradient entry is below ``tol * n``.

    Returns
    -------
    Tensor (P, d + 1): weights then intercept.
    """
    n, d = x.shape
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    penalty = torch.full((d + 1,), 1.0 / c, dtype=x.dtype)
    penalty[-1] = 1e-8
    weights = torch.zeros(targets.shape[0], d + 1, dtype=x.dtype) if init is None else init.clone()

    def objective(w, logits, rows):
        return (torch.nn.functional.softplus(logits) - targets[rows] * logits).sum(1) + 0.5 * (w**2 * penalty).sum(1)

    # Phase 1, bound optimisation (Böhning, 1992): pi (1 - pi) <= 1/4, so B = X^T X / 4 + diag(penalty)
    # majorises every problem's Hessian; steps B^-1 grad decrease every objective monotonically
    # without a line search, and B is factorised once for all problems. Cheap per step (no
    # per-problem Hessian), fast where predictions are uncertain (most permutations).
    bound_factor = torch.linalg.cholesky(design.T @ design / 4 + torch.diag(penalty))
    active = torch.arange(targets.shape[0])
    for _ in range(bound_iterations):
        grad = (torch.sigmoid(weights[active] @ design.T) - targets[active]) @ design + weights[active] * penalty
        unconverged = grad.abs().amax(dim=1) >= tol * n
        active, grad = active[unconverged], grad[unconverged]
        if len(active) == 0:
            return weights
        weights[active] -= torch.cholesky_solve(grad.T, bound_factor).T
    # Phase 2, damped Newton for the problems left (confident predictions, where the bound is loose).
    # Row-wise outer products, so that every problem's Hessian X^T diag(pi (1 - pi)) X is one GEMM.
    outer = (design[:, :, None] * design[:, None, :]).reshape(n, (d + 1) ** 2)
    logits = weights[active] @ design.T
    loss = objective(weights[active], logits, active)
    for _ in range(max_iter):
        prob = torch.sigmoid(logits)
        grad = (prob - targets[active]) @ design + weights[active] * penalty
        converged = grad.abs().amax(dim=1) < tol * n
        if converged.all():
            break
        keep = ~converged
        active, grad, prob, logits, loss = active[keep], grad[keep], prob[keep], logits[keep], loss[keep]
        hessian = ((prob * (1 - prob)) @ outer).reshape(-1, d + 1, d + 1) + torch.diag(penalty)
        step = torch.cholesky_solve(grad[..., None], torch.linalg.cholesky(hessian))[..., 0]
        weights[active], logits, loss = _backtrack(objective, weights[active], logits, loss, step, grad, design, active)
    return weights


def _backtrack(objective, w, logits, loss, step, grad, design, rows, max_halvings: int = 30):
    """Armijo backtracking per problem (Newton steps can overshoot when classes are nearly separable).

    Returns the new weights, their logits and objective values (reused by the next iteration).
    """
    decrease = (grad * step).sum(dim=1)
    step_logits = step @ design.T
    size = torch.ones(len(w), dtype=w.dtype)
    accepted = torch.zeros(len(w), dtype=torch.bool)
    for _ in range(max_halvings):
        candidate = objective(w - size[:, None] * step, logits - size[:, None] * step_logits, rows)
        accepted |= candidate <= loss - 1e-4 * size * decrease
        if accepted.all():
            break
        size = torch.where(accepted, size, size / 2)
    size = torch.where(accepted, size, torch.zeros_like(size))[:, None]
    new_logits = logits - size * step_logits
    return w - size * step, new_logits, objective(w - size * step, new_logits, rows)


def _logistic_path_proba(x_train, codes_train, x_test, n_classes, cs) -> np.ndarray:
    """Class probabilities on x_test for every C (warm-started path) and label vector: (C, P, m, K).

    Two classes: one logistic regression. More: one-vs-rest, the K sigmoid outputs normalised to
    sum to 1 (sklearn's ``multi_class="ovr"``); all P x K binary problems are solved as one batch.
    """
    x_train, x_test = (torch.from_numpy(a) for a in _standardise(x_train, x_test))
    codes_train = torch.from_numpy(codes_train)
    n_problems = codes_train.shape[0]
    if n_classes == 2:
        targets = codes_train.to(torch.float64)
    else:
        targets = torch.nn.functional.one_hot(codes_train, n_classes).permute(0, 2, 1).reshape(-1, codes_train.shape[1]).to(torch.float64)
    design_test = torch.cat([x_test, torch.ones(len(x_test), 1, dtype=x_test.dtype)], dim=1)
    weights, probabilities = None, []
    for c in cs:
        weights = fit_logistic(x_train, targets, c, init=weights)
        positive = torch.sigmoid(weights @ design_test.T)  # (P or P K, m)
        if n_classes == 2:
            proba = torch.stack([1 - positive, positive], dim=-1)
        else:
            proba = positive.reshape(n_problems, n_classes, -1).permute(0, 2, 1)
            proba = proba / proba.sum(-1, keepdim=True)
        probabilities.append(proba)
    return torch.stack(probabilities).numpy()


def cross_validated_predictions(features, labels, groups, kind, folds, config: ProbeConfig, n_classes: int | None = None):
    """Out-of-fold predictions of a linear probe, for one or many label vectors.

    For each outer fold, standardisation and the regularisation (chosen by an inner
    grouped CV on the training rows, per label vector) only ever see training rows.

    Parameters
    ----------
    features : (n, d) array
    labels : (n,) or (P, n) array
        Continuous values, or class codes 0..K-1 for categorical. Several rows are
        several problems solved together (the observed labels and their permutations).
    groups : (n,) participant of each row (inner folds are grouped by it)
    kind : "continuous" or "categorical"
    folds : outer folds from :func:`outer_folds`

    Returns
    -------
    (P, n) predictions (continuous) or (P, n, K) class probabilities (categorical);
    rows in no test fold are NaN.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.atleast_2d(np.asarray(labels))
    groups = np.asarray(groups)
    if kind == "categorical":
        n_classes = n_classes or int(labels.max()) + 1
        out = np.full((labels.shape[0], labels.shape[1], n_classes), np.nan)
    else:
        out = np.full(labels.shape, np.nan)
    for train, test in folds:
        choice = _inner_choice(features[train], labels[:, train], groups[train], kind, config, n_classes)
        out[:, test] = _fit_predict(features[train], labels[:, train], features[test], kind, config, n_classes, choice)
    return out


def _fit_predict(x_train, y_train, x_test, kind, config, n_classes, choice=None):
    """Fit on the training rows and predict x_test; ``choice`` (P,) indexes the grid per label vector."""
    columns = np.arange(y_train.shape[0])
    if kind == "continuous":
        path = ridge_path_predictions(x_train, y_train.astype(np.float64), x_test, config.ridge_alphas)
        return path[choice, columns] if choice is not None else path
    path = _logistic_path_proba(x_train, y_train.astype(np.int64), x_test, n_classes, config.logistic_cs)
    return path[choice, columns] if choice is not None else path


def _inner_choice(x, y, groups, kind, config, n_classes) -> np.ndarray:
    """Index of the best penalty for each label vector, by inner grouped CV (MSE or log-loss)."""
    grid = config.ridge_alphas if kind == "continuous" else config.logistic_cs
    if len(grid) == 1:
        return np.zeros(y.shape[0], dtype=int)
    # Inner folds ignore the labels (not stratified), so that they treat the observed and the
    # permuted label vectors alike.
    n_splits, _ = _fold_count(y[0], groups, "continuous", config.inner_splits)
    if n_splits < 2:
        # Too few participants to tune: the middle of the grid, for every label vector alike.
        return np.full(y.shape[0], len(grid) // 2)
    loss = np.zeros((len(grid), y.shape[0]))
    for train, valid in _group_folds(y[0], groups, "continuous", n_splits, config.seed):
        path = _fit_predict(x[train], y[:, train], x[valid], kind, config, n_classes)
        if kind == "continuous":
            loss += ((path - y[None, :, valid]) ** 2).sum(axis=2)
        else:
            picked = np.take_along_axis(path, y[None, :, valid, None].astype(int).repeat(len(grid), 0), axis=3)[..., 0]
            loss -= np.log(np.clip(picked, 1e-12, None)).sum(axis=2)
    return loss.argmin(axis=0)


# ----------------------------------------------------------------------------- metrics


def score(metric: str, labels, predictions, weights=None) -> np.ndarray:
    r"""Probe metrics, batched over problems (rows) and optionally weighted (bootstrap counts).

    * ``balanced_accuracy`` = mean over classes k of :math:`\sum_i w_i [y_i = k][\hat y_i = k] / \sum_i w_i [y_i = k]`,
      :math:`\hat y_i = \arg\max_k \pi_{ik}` (classes with no weight are left out of the mean);
    * ``roc_auc`` = two classes: :math:`P(s_+ > s_-) + \tfrac12 P(s_+ = s_-)` over weighted
      positive/negative pairs, s the probability of class 1; more classes: the unweighted mean of
      the one-vs-rest AUCs (sklearn's ``multi_class="ovr", average="macro"``);
    * ``r2`` = :math:`1 - \sum w (y - \hat y)^2 / \sum w (y - \bar y_w)^2`;
    * ``mae`` = :math:`\sum w |y - \hat y| / \sum w`.

    Parameters
    ----------
    labels : (P, n) or (n,) ; predictions : (P, n) values or (P, n, K) probabilities (or unbatched)
    weights : (B, n) or None ; with weights, labels/predictions must be unbatched and B scores come back.

    Returns
    -------
    (P,) or (B,) array.
    """
    labels = np.atleast_2d(np.asarray(labels))
    predictions = np.asarray(predictions)
    if predictions.ndim == labels.ndim - 1 + (metric in METRICS["categorical"]):
        predictions = predictions[None]
    auc_weights = None if weights is None else np.asarray(weights, dtype=np.float64)
    weights = np.ones(labels.shape, dtype=np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
    if metric == "mae":
        return (weights * np.abs(labels - predictions)).sum(1) / weights.sum(1)
    if metric == "r2":
        mean = (weights * labels).sum(1, keepdims=True) / weights.sum(1, keepdims=True)
        total = (weights * (labels - mean) ** 2).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.0 - (weights * (labels - predictions) ** 2).sum(1) / total
    labels = labels.astype(int)
    n_classes = predictions.shape[-1]
    if metric == "balanced_accuracy":
        predicted = predictions.argmax(-1)
        recalls = []
        for k in range(n_classes):
            in_class = weights * (labels == k)
            with np.errstate(divide="ignore", invalid="ignore"):
                recalls.append((in_class * (predicted == k)).sum(1) / in_class.sum(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.stack(recalls), axis=0)
    if metric == "roc_auc":
        classes = [1] if n_classes == 2 else range(n_classes)
        return np.mean([_binary_auc(labels == k, predictions[..., k], auc_weights) for k in classes], axis=0)
    raise ValueError(f"unknown metric {metric!r}")


def _binary_auc(positive, scores, weights=None) -> np.ndarray:
    """AUC per row: ranks (Mann-Whitney, ties count 1/2) unweighted, or a shared (n, n) win matrix for weights.

    positive, scores : (P, n) ; weights : (B, n) bootstrap counts, then positive/scores must be (1, n).
    """
    if weights is None:
        ranks = rankdata(scores, axis=1)
        n_positive = positive.sum(1)
        n_negative = positive.shape[1] - n_positive
        with np.errstate(divide="ignore", invalid="ignore"):
            return ((ranks * positive).sum(1) - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)
    if positive.shape[0] != 1 or scores.shape[0] != 1:
        raise ValueError("weighted AUC needs a single row of labels and scores")
    wins = np.sign(scores[0][:, None] - scores[0][None, :]) * 0.5 + 0.5
    pos_weight, neg_weight = weights * positive[0], weights * ~positive[0]
    numerator = ((pos_weight @ wins) * neg_weight).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return numerator / (pos_weight.sum(1) * neg_weight.sum(1))


def chance_level(metric: str, labels, folds, n_classes: int | None = None) -> float:
    """Score of a probe that learns nothing: 1/K, 0.5, 0, or the MAE of predicting each training fold's mean."""
    if metric == "balanced_accuracy":
        return 1.0 / n_classes
    if metric == "roc_auc":
        return 0.5
    if metric == "r2":
        return 0.0
    labels = np.asarray(labels, dtype=np.float64)
    errors = [np.abs(labels[test] - labels[train].mean()) for train, test in folds]
    return float(np.concatenate(errors).mean())


# ----------------------------------------------------------------------------- one probe


def probe_attribute(features, labels, groups, kind: str, config: ProbeConfig, sites=None) -> tuple[list[dict], str]:
    """Probe one attribute from one feature matrix: scores, 95% CIs, p-values and chance.

    Parameters
    ----------
    features : (n, d) ; labels : (n,) values, or category labels of any type (categorical)
    groups : (n,) participant ids ; sites : (n,) for leave-site-out or None

    Returns
    -------
    rows : list of dicts with metric, value, ci_low, ci_high, p_value, chance, n (empty when skipped)
    note : str, why it was skipped or anything unusual (fewer folds), else empty.
    """
    features = np.asarray(features, dtype=np.float64)
    groups = np.asarray(groups)
    if len(groups) < config.min_samples:
        return [], f"{len(groups)} labelled rows (< min_samples={config.min_samples})"
    if kind == "categorical":
        classes, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
        n_classes = len(classes)
        if n_classes < 2:
            return [], f"constant label ({classes[0] if n_classes else 'none'})"
    else:
        codes = np.asarray(labels, dtype=np.float64)
        n_classes = None
        if np.ptp(codes) == 0:
            return [], f"constant label ({codes[0]:g})"
    if not np.isfinite(features).all():
        return [], "non-finite embedding values"
    folds, note = outer_folds(codes, groups, kind, config, sites=sites)
    if not folds:
        return [], note
    rng = np.random.default_rng(config.seed)
    test_fold = np.full(len(codes), -1)
    for fold, (_, test) in enumerate(folds):
        test_fold[test] = fold
    permuted = codes[permutation_indices(groups, config.n_permutations, rng, blocks=test_fold)]
    predictions = cross_validated_predictions(features, permuted, groups, kind, folds, config, n_classes)
    tested = np.concatenate([test for _, test in folds])
    observed_codes, observed = codes[tested], predictions[0, tested]
    bootstrap_weights = _bootstrap_weights(groups[tested], config.n_bootstrap, rng)
    rows = []
    for metric in METRICS[kind]:
        scores = score(metric, permuted[:, tested], predictions[:, tested])
        value = float(scores[0])
        p_value = np.nan
        if config.n_permutations:
            null = scores[1:]
            extreme = null <= value if metric in LOWER_IS_BETTER else null >= value
            p_value = (1 + int(np.sum(extreme))) / (1 + config.n_permutations)
        ci = (np.nan, np.nan)
        if bootstrap_weights is not None:
            ci = tuple(np.nanpercentile(score(metric, observed_codes, observed, bootstrap_weights), [2.5, 97.5]))
        chance = chance_level(metric, codes, folds, n_classes)
        rows.append(dict(metric=metric, value=value, ci_low=ci[0], ci_high=ci[1], p_value=p_value, chance=chance, n=len(tested)))
    return rows, note


def permutation_indices(groups, n_permutations: int, rng, blocks=None) -> np.ndarray:
    """Row indices of the observed order then ``n_permutations`` permutations that move whole participants.

    The exchangeable unit is the participant: each participant takes the rows (labels) of another
    participant with the same number of rows, in session order, so that repeated sessions stay
    together under the null. With ``blocks`` (the outer test fold of each row), participants are
    only exchanged within their block: stratified folds are built from the observed labels, and
    permuting within folds keeps every permuted label vector exactly as stratified as the observed
    one (a permutation across folds would unbalance the folds and bias the null distribution down).

    Returns
    -------
    (1 + n_permutations, n) int array; row 0 is the identity.
    """
    groups = np.asarray(groups)
    blocks = np.zeros(len(groups), dtype=int) if blocks is None else np.asarray(blocks)
    _, participant_of_row, counts = np.unique(groups, return_inverse=True, return_counts=True)
    rows_of = [np.flatnonzero(participant_of_row == p) for p in range(len(counts))]
    block_of = blocks[[rows[0] for rows in rows_of]]
    exchangeable = [np.flatnonzero((block_of == block) & (counts == size))
                    for block in np.unique(block_of) for size in np.unique(counts)]
    exchangeable = [members for members in exchangeable if len(members) > 1]
    out = np.tile(np.arange(len(groups)), (n_permutations + 1, 1))
    for k in range(1, n_permutations + 1):
        for members in exchangeable:
            destination = np.concatenate([rows_of[p] for p in members])
            out[k, destination] = np.concatenate([rows_of[p] for p in rng.permutation(members)])
    return out


def _bootstrap_weights(groups, n_bootstrap, rng) -> np.ndarray | None:
    """Row weights of participant-level resamples: a drawn participant brings all its rows."""
    if not n_bootstrap:
        return None
    unique, index = np.unique(groups, return_inverse=True)
    counts = rng.multinomial(len(unique), np.full(len(unique), 1.0 / len(unique)), size=n_bootstrap)
    return counts[:, index].astype(np.float64)


# ----------------------------------------------------------------------------- all probes


def probe_embeddings(
    embeddings: pd.DataFrame,
    cohort,
    attributes: Sequence[str] | None = None,
    subsets: Iterable[str] = SUBSETS,
    config: ProbeConfig | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Probe every attribute from every embedding space, in every subset of subjects.

    Parameters
    ----------
    embeddings : DataFrame
        ``participant_id``, [``session_id``], then ``<space>_<i>`` columns (embeddings.tsv).
    cohort : neurocl.cohort.Cohort
        Gives the group and the attributes (and their kinds); joined by participant (and session).
    attributes : list of str or None
        Attribute names of the cohort; ``"group"`` (background vs target) is also accepted.
        Default: every cohort attribute, plus ``group`` in the ``all`` subset.
    subsets : iterable of "all", "target", "background"

    Returns
    -------
    DataFrame in the probes.tsv format (``PROBE_COLUMNS``): one row per space x attribute x
    subset x metric; a skipped combination is one row with ``metric`` "none" and its reason in ``note``.
    """
    config = config or ProbeConfig()
    subsets = list(subsets)
    unknown_subsets = [s for s in subsets if s not in SUBSETS]
    if unknown_subsets:
        raise ConfigError(f"subsets: unknown {unknown_subsets} (choose from {list(SUBSETS)})")
    kinds = dict(cohort.attribute_kinds)
    if attributes is None:
        attributes = list(kinds) + [GROUP_ATTRIBUTE]
    unknown = [a for a in attributes if a not in kinds and a != GROUP_ATTRIBUTE]
    if unknown:
        raise ConfigError(f"attributes: {unknown} not in the cohort (it has {sorted(kinds)})")
    kinds[GROUP_ATTRIBUTE] = "categorical"
    table = join_embeddings(embeddings, cohort)
    spaces = embedding_spaces(embeddings)
    if not spaces:
        raise CohortError(f"embeddings: no '<space>_<i>' numeric columns (columns: {list(embeddings.columns)})")
    sites = _site_column(table, config)
    jobs = [
        (space, attribute, subset)
        for space in spaces
        for attribute in attributes
        for subset in subsets
        if not (attribute == GROUP_ATTRIBUTE and subset != "all")
    ]
    tasks = []
    for space, attribute, subset in jobs:
        in_subset = table["group"].notna() if subset == "all" else table["group"].eq(subset)
        keep = (in_subset & table[attribute].notna()).to_numpy()
        if sites is not None:
            # pandas 3 may hand back a read-only view: combine into a new array, never in place
            keep = keep & pd.notna(sites)
        tasks.append((
            table.loc[keep, spaces[space]].to_numpy(),
            table.loc[keep, attribute].to_numpy(),
            table.loc[keep, "participant_id"].to_numpy(),
            kinds[attribute],
            None if sites is None else sites[keep],
            attribute == config.leave_site_out,
        ))
    rows = []
    skipped: dict[tuple[str, str, str], list[str]] = {}
    for (space, attribute, subset), task, (results, note) in zip(jobs, tasks, _run_tasks(tasks, config, progress)):
        if not results:
            skipped.setdefault((attribute, subset, note), []).append(space)
            results = [dict(metric="none", value=np.nan, ci_low=np.nan, ci_high=np.nan, p_value=np.nan, chance=np.nan, n=len(task[2]))]
        rows.extend({"space": space, "attribute": attribute, "subset": subset, **result, "note": note} for result in results)
    # One line per reason, not per space: an attribute absent from a group by design (a patients-only
    # score in controls) is skipped in every space alike.
    for (attribute, subset, note), skipped_spaces in skipped.items():
        logger.warning("not probed: %s in %s (%s), spaces %s", attribute, subset, note, ", ".join(skipped_spaces))
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


def _probe_task(features, labels, groups, kind, sites, is_site_column, config):
    if is_site_column:
        return [], "the attribute is the held-out site column"
    return probe_attribute(features, labels, groups, kind, config, sites=sites)


def _run_tasks(tasks, config, progress):
    """Results of :func:`_probe_task` in task order, on ``config.n_jobs`` threads.

    Threads, not processes: the heavy parts (BLAS, batched Cholesky, SVD) release the GIL, and
    threads start instantly and share the data.
    """
    n_jobs = min(os.cpu_count() or 1, len(tasks)) if config.n_jobs == -1 else min(config.n_jobs, len(tasks))
    if n_jobs <= 1:
        return [_probe_task(*task, config) for task in _progress(tasks, progress, "probing")]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        results = pool.map(lambda task: _probe_task(*task, config), tasks)
        return list(_progress(results, progress, f"probing ({n_jobs} threads)", total=len(tasks)))


def _site_column(table, config):
    if config.leave_site_out is None:
        return None
    if config.leave_site_out not in table.columns:
        raise ConfigError(f"leave_site_out: no column {config.leave_site_out!r} in the cohort (columns: {list(table.columns)})")
    return table[config.leave_site_out].to_numpy()


def _progress(items, enabled, description, total=None):
    if not enabled:
        return items
    from rich.progress import track

    from neurocl.logs import progress_console

    return track(items, description=description, transient=True, total=total, console=progress_console())


# ----------------------------------------------------------------------------- separation


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
        ``attributes``: per attribute and subset, per space: the primary score, its CI, p-value and chance,
        plus ``decodable_from`` (spaces with p < 0.05 and score beyond chance) and
        ``salient_minus_common``. ``background_collapse`` (two-space embeddings): mean salient norm of
        background and target rows, their ratio, the AUC of the salient norm for target vs background,
        and the cross-validated target-vs-background AUC of a probe on the salient space.
        ``ground_truth`` (optional): held-out R^2 of each factor from each space, and the MCC.
    """
    config = config or ProbeConfig()
    spaces = embedding_spaces(embeddings)
    result = {"spaces": {name: len(columns) for name, columns in spaces.items()}, "attributes": _decodability(probes)}
    if "salient" in spaces:
        result["background_collapse"] = _background_collapse(embeddings, cohort, spaces["salient"], probes, config)
    if ground_truth is not None:
        result["ground_truth"] = ground_truth_recovery(embeddings, ground_truth, config)
    return result


def _decodability(probes: pd.DataFrame) -> dict:
    out: dict = {}
    scored = probes[probes["metric"].isin(PRIMARY_METRIC.values())]
    for (attribute, subset), rows in scored.groupby(["attribute", "subset"], sort=False):
        entry = {"metric": rows["metric"].iloc[0], "chance": _finite(rows["chance"].iloc[0]), "spaces": {}}
        for _, row in rows.iterrows():
            entry["spaces"][row["space"]] = {
                "value": _finite(row["value"]),
                "ci": [_finite(row["ci_low"]), _finite(row["ci_high"])],
                "p_value": _finite(row["p_value"]),
            }
        entry["decodable_from"] = [
            space
            for space, values in entry["spaces"].items()
            if values["p_value"] is not None and values["p_value"] < 0.05 and values["value"] > entry["chance"]
        ]
        if {"common", "salient"} <= entry["spaces"].keys():
            common, salient = entry["spaces"]["common"]["value"], entry["spaces"]["salient"]["value"]
            entry["salient_minus_common"] = None if common is None or salient is None else salient - common
        out.setdefault(attribute, {})[subset] = entry
    return out


def _background_collapse(embeddings, cohort, salient_columns, probes, config) -> dict:
    table = join_embeddings(embeddings, cohort)
    table = table[table["group"].notna()]
    norms = np.linalg.norm(table[salient_columns].to_numpy(dtype=np.float64), axis=1)
    is_target = table["group"].eq("target").to_numpy()
    if is_target.all() or not is_target.any():
        return {"note": "needs both background and target rows"}
    background_norm, target_norm = float(norms[~is_target].mean()), float(norms[is_target].mean())
    out = {
        "salient_norm_background": background_norm,
        "salient_norm_target": target_norm,
        "norm_ratio": background_norm / target_norm if target_norm > 0 else None,
        "norm_auc": float(score("roc_auc", is_target.astype(int), np.stack([-norms, norms], axis=1))[0]),
    }
    group_rows = probes[(probes["space"] == "salient") & (probes["attribute"] == GROUP_ATTRIBUTE) & (probes["subset"] == "all")]
    auc = group_rows[group_rows["metric"] == "roc_auc"]
    if auc.empty:
        rows, _ = probe_attribute(
            table[salient_columns].to_numpy(), table["group"].to_numpy(), table["participant_id"].to_numpy(), "categorical", config
        )
        auc = pd.DataFrame([r for r in rows if r["metric"] == "roc_auc"])
    if not auc.empty:
        row = auc.iloc[0]
        out["probe_auc"] = _finite(row["value"])
        out["probe_auc_ci"] = [_finite(row["ci_low"]), _finite(row["ci_high"])]
        out["probe_auc_p_value"] = _finite(row["p_value"])
    return out


def _finite(value):
    return float(value) if value is not None and np.isfinite(value) else None


# ----------------------------------------------------------------------------- ground truth


def ground_truth_recovery(embeddings: pd.DataFrame, ground_truth, config: ProbeConfig | None = None) -> dict:
    r"""How well each space recovers each latent factor of a synthetic cohort, on held-out subjects.

    * ``r2[subset][space][factor]``: cross-validated ridge R^2 (same outer/inner scheme as the probes,
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
    from scipy.optimize import linear_sum_assignment

    from neurocl.io import read_tsv

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
    group_labels = table["group"] if "group" in table.columns else None
    subsets = {"all": np.ones(len(table), dtype=bool)}
    if group_labels is not None:
        subsets["target"] = group_labels.astype(str).isin(["target", "1", "1.0", "patient"]).to_numpy()
    r2: dict = {}
    for subset, keep in subsets.items():
        for space, columns in spaces.items():
            features = table.loc[keep, columns].to_numpy(dtype=np.float64)
            for factor, values in targets.items():
                r2.setdefault(subset, {}).setdefault(space, {})[factor] = _held_out_r2(features, values[keep], groups[keep], config)
    continuous = {f: v[:, 0] for f, v in targets.items() if v.shape[1] == 1 and np.ptp(v) > 0}
    mcc = {}
    if continuous:
        factors = np.stack(list(continuous.values()), axis=1)
        folds = _group_folds(np.zeros(len(table)), groups, "continuous", min(config.n_splits, len(np.unique(groups))), config.seed)
        for space, columns in spaces.items():
            mcc[space] = _held_out_mcc(table[columns].to_numpy(dtype=np.float64), factors, list(continuous), folds, linear_sum_assignment)
    return {"factors": factor_columns, "r2": r2, "mcc": mcc}


def _factor_targets(column: pd.Series) -> np.ndarray:
    """(n, 1) values of a continuous factor, or (n, K) indicators of a categorical one."""
    numeric = pd.to_numeric(column, errors="coerce")
    is_categorical = numeric.isna().any() or (np.allclose(numeric, np.round(numeric)) and numeric.nunique() <= 10 and numeric.nunique() > 2)
    if not is_categorical:
        return numeric.to_numpy(dtype=np.float64)[:, None]
    return pd.get_dummies(column.astype(str)).to_numpy(dtype=np.float64)


def _held_out_r2(features, targets, groups, config) -> float | None:
    values = []
    for column in targets.T:
        if np.ptp(column) == 0 or len(column) < config.min_samples:
            continue
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
        test_corr = _abs_correlation(features[test], factors[test])
        per_fold.append(float(np.nanmean(test_corr[dims, facs])))
        matches.append({names[f]: int(d) for d, f in zip(dims, facs)})
    return {
        "mcc": float(np.mean(per_fold)),
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


# ----------------------------------------------------------------------------- command


def probe_command(
    embeddings_tsv,
    cohort_yaml,
    out_dir,
    attributes=None,
    ground_truth=None,
    leave_site_out=None,
    n_permutations: int = 200,
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_jobs: int = -1,
) -> tuple[Path, Path]:
    """``neurocl probe``: probes.tsv, separation.json and separation.tsv in ``out_dir``, and a rich table.

    Returns
    -------
    (probes_path, separation_path)
    """
    from pydantic import ValidationError

    from neurocl.cohort import Cohort
    from neurocl.logs import results_console
    from neurocl.io import read_tsv, write_json, write_tsv

    embeddings_tsv, out_dir = Path(embeddings_tsv), Path(out_dir)
    if not embeddings_tsv.is_file():
        raise CohortError(f"embeddings: no file {embeddings_tsv}")
    if ground_truth is not None and not Path(ground_truth).is_file():
        raise CohortError(f"--ground-truth: no file {ground_truth}")
    try:
        config = ProbeConfig(n_permutations=n_permutations, n_bootstrap=n_bootstrap, leave_site_out=leave_site_out,
                             seed=seed, n_jobs=n_jobs)
    except ValidationError as error:
        raise ConfigError(f"probe options: {error.errors()[0]['loc'][0]}: {error.errors()[0]['msg']}") from None
    cohort = Cohort.from_yaml(cohort_yaml)
    embeddings = read_tsv(embeddings_tsv)
    probes = probe_embeddings(embeddings, cohort, attributes=attributes, config=config, progress=True)
    result = separation(embeddings, cohort, probes, ground_truth=ground_truth, config=config)
    probes_path = write_tsv(out_dir / "probes.tsv", probes)
    separation_path = write_json(out_dir / "separation.json", result)
    write_tsv(out_dir / "separation.tsv", separation_table(result))
    console = results_console()
    console.print(probes_table(probes))
    console.print(f"wrote [bold]{probes_path}[/], [bold]{separation_path}[/]")
    return probes_path, separation_path


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


def probes_table(probes: pd.DataFrame):
    """A rich Table of probes.tsv (value [95% CI], p, chance)."""
    from rich.table import Table

    table = Table(title="Linear probes (out-of-fold)", show_lines=False)
    for name in ("space", "attribute", "subset", "metric", "value [95% CI]", "p", "chance", "n"):
        table.add_column(name, justify="right" if name in ("p", "chance", "n") else "left")
    for _, row in probes.iterrows():
        if row["metric"] == "none":
            table.add_row(row["space"], row["attribute"], row["subset"], "[dim]skipped[/]", f"[dim]{row['note']}[/]", "", "", str(row["n"]))
            continue
        ci = f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]" if np.isfinite(row["ci_low"]) else ""
        p = f"{row['p_value']:.3f}" if np.isfinite(row["p_value"]) else "n/a"
        table.add_row(row["space"], row["attribute"], row["subset"], row["metric"], f"{row['value']:.3f}{ci}", p, f"{row['chance']:.2f}", str(row["n"]))
    return table
