"""Permutation p-values with as many permutations as the decision needs.

A probe's p-value serves one decision: is the score decodable at ``ALPHA`` (0.05)? A fixed 1,000
permutations of a null attribute (p ~ 0.5) or of a strong one (p ~ 0.001) spend nearly all their
work after the answer is clear. Here permutations are run in rounds whose cumulative counts are
99, 199, 399, 799, ... (each round doubles the total, up to ``n_permutations``); after each round,
with ``b`` of the ``m`` permuted scores as extreme as the observed one, the test stops when the
``1 - DECISION_RISK`` Clopper-Pearson interval of the permutation p-value (the exceedance
probability that ``b / m`` estimates) lies wholly above or wholly below ``ALPHA``. It is a
sequential Monte Carlo test in the manner of Besag & Clifford (1991, Biometrika 78:301), who stop
once a p-value is clearly large, and Gandy (2009, JASA 104:1504), who bound the chance that
stopping changes the decision: at each check that chance is below ``DECISION_RISK`` (the
interval's coverage), so below ``DECISION_RISK`` times the number of checks (at most 5 for
1,000 permutations) in all. The reported p-value stays ``(1 + b) / (1 + m)``.

Typical counts: a null attribute stops after 99 permutations, a strong one after 199 (p = 0.005);
only p-values within a few hundredths of ``ALPHA`` run to ``n_permutations``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import beta

from neurocl.probe.metrics import LOWER_IS_BETTER, score

# The level at which probes call a score decodable (separation.json, the report, the demo).
ALPHA = 0.05
# Chance, per check, that stopping early gives another decision than all permutations would.
DECISION_RISK = 1e-3
FIRST_ROUND = 99


def permutation_checkpoints(n_permutations: int, first: int = FIRST_ROUND) -> list[int]:
    """Cumulative permutation counts after which the decision is checked: 99, 199, 399, ... then ``n_permutations``."""
    checkpoints, count = [], first
    while count < n_permutations:
        checkpoints.append(count)
        count = 2 * count + 1
    return checkpoints + [n_permutations]


def decision_is_clear(n_extreme: int, n_drawn: int, alpha: float = ALPHA, risk: float = DECISION_RISK) -> bool:
    """Whether the two-sided ``1 - risk`` Clopper-Pearson interval of ``n_extreme / n_drawn`` excludes ``alpha``.

    Lower bound ``Beta(risk/2; b, m - b + 1)`` (0 when b = 0), upper bound
    ``Beta(1 - risk/2; b + 1, m - b)`` (1 when b = m).
    """
    lower = beta.ppf(risk / 2, n_extreme, n_drawn - n_extreme + 1) if n_extreme > 0 else 0.0
    upper = beta.ppf(1 - risk / 2, n_extreme + 1, n_drawn - n_extreme) if n_extreme < n_drawn else 1.0
    return bool(upper < alpha or lower > alpha)


def n_extreme(null: np.ndarray, observed: float, metric: str) -> int:
    """Permuted scores at least as good as the observed one (``<=`` for lower-is-better metrics)."""
    return int(np.sum(null <= observed if metric in LOWER_IS_BETTER else null >= observed))


def sequential_predictions(predict: Callable[[np.ndarray], np.ndarray], permuted: np.ndarray, tested: np.ndarray,
                           metric: str, adaptive: bool = True) -> np.ndarray:
    """Predictions of the observed labels and of as many permutations as the decision needs.

    Parameters
    ----------
    predict : callable
        ``predict(label_rows) -> predictions`` of :func:`~neurocl.probe.cv.cross_validated_predictions`
        for a block of label vectors; every label vector is fitted on its own, so blocks give the
        same predictions as one call.
    permuted : (1 + P, n) array
        The observed labels then P permutations of them.
    tested : (t,) int array
        Rows that have an out-of-fold prediction.
    metric : str
        The metric whose p-value decides (the kind's primary metric).
    adaptive : bool
        False: all P permutations.

    Returns
    -------
    (1 + m, ...) predictions, m <= P the permutations used.
    """
    n_permutations = permuted.shape[0] - 1
    if not adaptive or n_permutations == 0:
        return predict(permuted)
    parts, done = [], 0
    for checkpoint in permutation_checkpoints(n_permutations):
        parts.append(predict(permuted[done:checkpoint + 1]))
        done = checkpoint + 1
        predictions = np.concatenate(parts)
        scores = score(metric, permuted[:done, tested], predictions[:, tested])
        if decision_is_clear(n_extreme(scores[1:], scores[0], metric), checkpoint):
            break
    return predictions
