"""Probe metrics, batched over problems and optionally weighted (bootstrap counts), and their chance levels."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata

METRICS = {"categorical": ("balanced_accuracy", "roc_auc"), "continuous": ("r2", "mae")}
# The metric that says "is this attribute decodable": the first of each kind.
PRIMARY_METRIC = {kind: metrics[0] for kind, metrics in METRICS.items()}
LOWER_IS_BETTER = {"mae"}


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
