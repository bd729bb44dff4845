"""Cross-validation of the probes: outer folds over participants (or sites), inner selection of the
penalty, out-of-fold predictions, and the participant-level permutations and bootstrap."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, LeaveOneGroupOut, StratifiedKFold

from neurocl.config import ProbeConfig
from neurocl.probe.solvers import logistic_path_proba, ridge_path_predictions


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
    n_splits, note = fold_count(labels, groups, kind, config.n_splits)
    if n_splits < 2:
        return [], note
    return group_folds(labels, groups, kind, n_splits, config.seed), note


def fold_count(labels, groups, kind, wanted) -> tuple[int, str]:
    n_groups = len(np.unique(groups))
    limit, why = n_groups, f"{n_groups} participants"
    if kind == "categorical":
        per_class = pd.Series(groups).groupby(labels).nunique()
        if per_class.min() < limit:
            limit, why = int(per_class.min()), f"class {per_class.idxmin()} has {int(per_class.min())} participants"
    if limit >= wanted:
        return wanted, ""
    return limit, f"{limit} folds instead of {wanted}: {why}"


def group_folds(labels, groups, kind, n_splits, seed) -> list[tuple[np.ndarray, np.ndarray]]:
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
        # Classes smaller than the fold count were already handled by fold_count.
        warnings.simplefilter("ignore", UserWarning)
        participant_folds = list(splitter.split(np.zeros(len(unique)), np.asarray(labels)[first_row]))
    return [
        (np.flatnonzero(np.isin(participant_of_row, train)), np.flatnonzero(np.isin(participant_of_row, test)))
        for train, test in participant_folds
    ]


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
    path = logistic_path_proba(x_train, y_train.astype(np.int64), x_test, n_classes, config.logistic_cs)
    return path[choice, columns] if choice is not None else path


def _inner_choice(x, y, groups, kind, config, n_classes) -> np.ndarray:
    """Index of the best penalty for each label vector, by inner grouped CV (MSE or log-loss)."""
    grid = config.ridge_alphas if kind == "continuous" else config.logistic_cs
    if len(grid) == 1:
        return np.zeros(y.shape[0], dtype=int)
    # Inner folds ignore the labels (not stratified), so that they treat the observed and the
    # permuted label vectors alike.
    n_splits, _ = fold_count(y[0], groups, "continuous", config.inner_splits)
    if n_splits < 2:
        # Too few participants to tune: the middle of the grid, for every label vector alike.
        return np.full(y.shape[0], len(grid) // 2)
    loss = np.zeros((len(grid), y.shape[0]))
    for train, valid in group_folds(y[0], groups, "continuous", n_splits, config.seed):
        path = _fit_predict(x[train], y[:, train], x[valid], kind, config, n_classes)
        if kind == "continuous":
            loss += ((path - y[None, :, valid]) ** 2).sum(axis=2)
        else:
            picked = np.take_along_axis(path, y[None, :, valid, None].astype(int).repeat(len(grid), 0), axis=3)[..., 0]
            loss -= np.log(np.clip(picked, 1e-12, None)).sum(axis=2)
    return loss.argmin(axis=0)


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


def bootstrap_weights(groups, n_bootstrap, rng) -> np.ndarray | None:
    """Row weights of participant-level resamples: a drawn participant brings all its rows."""
    if not n_bootstrap:
        return None
    unique, index = np.unique(groups, return_inverse=True)
    counts = rng.multinomial(len(unique), np.full(len(unique), 1.0 / len(unique)), size=n_bootstrap)
    return counts[:, index].astype(np.float64)
