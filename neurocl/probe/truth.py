"""Ground-truth factors (the cohort spec's ``ground_truth``) probed and clustered from every space.

A real study does not know its patients' subtypes; a synthetic cohort does. Every factor of the
ground truth that the participants table does not already give (:func:`neurocl.cohort.truth.truth_factors`:
subtype, the generator's latents) is probed like an attribute (:func:`probe_ground_truth`, probes.tsv
format, same scope: held out by default, fitted on train/val and scored on test). A probe can score
well on a space where the subtypes do not form clusters at all, so each subtype-like factor
(:func:`neurocl.cohort.truth.target_only_factors`) is also scored by clustering
(:func:`cluster_recovery`): k-means with k = its true number of values, on the target subjects'
coordinates, against the true labels by the adjusted Rand index and normalised mutual information.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from neurocl.cohort.truth import target_only_factors, truth_factors
from neurocl.config import ProbeConfig
from neurocl.embed import embedding_spaces, join_embeddings
from neurocl.probe.heldout import TEST_SPLIT
from neurocl.probe.probe import SUBSETS, probe_table

# k-means restarts: the partition scored is the best of these (lowest inertia).
N_INIT = 10


def _joined(embeddings: pd.DataFrame, cohort, truth: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """Embeddings joined to the cohort (group, split) and to the truth's ``factors``, in the embeddings' order
    (a factor that is also an attribute takes the truth's full-precision values)."""
    table = join_embeddings(embeddings, cohort)
    table = table.drop(columns=[factor for factor in factors if factor in table.columns])
    keys = ["participant_id"] + (["session_id"] if "session_id" in truth.columns else [])
    truth = truth[keys + factors].astype({key: str for key in keys})
    return table.astype({key: str for key in keys}).merge(truth, on=keys, how="left")


def probe_ground_truth(embeddings: pd.DataFrame, cohort, truth: pd.DataFrame, subsets: Iterable[str] = SUBSETS,
                       config: ProbeConfig | None = None, progress: bool = False) -> pd.DataFrame:
    """Probe every ground-truth factor the cohort does not have as an attribute, from every space (probes.tsv format).

    Parameters
    ----------
    embeddings : embeddings.tsv table ; cohort : Cohort
    truth : :meth:`Cohort.ground_truth` table
    subsets, config, progress : as for :func:`neurocl.probe.probe_embeddings`
    """
    kinds = truth_factors(truth, cohort)
    table = _joined(embeddings, cohort, truth, list(kinds))
    return probe_table(table, embedding_spaces(embeddings), kinds, list(kinds), subsets, config, progress)


def cluster_recovery(embeddings: pd.DataFrame, cohort, truth: pd.DataFrame, config: ProbeConfig | None = None) -> dict:
    """ARI and NMI of k-means against each subtype-like factor, per space, on the target subjects.

    Held-out scope: the target rows of the ``test`` split (k-means sees nothing else); in-sample
    CV: every target row. k = the factor's number of values among every target subject of the
    truth; a factor with fewer than 2k scored rows is left out with a note.

    Returns
    -------
    dict: factor -> {"k", "n", "scope", "spaces": {space: {"ari", "nmi"}}} or {"k", "n", "note"}
    """
    config = config or ProbeConfig()
    factors = [column for column in truth.columns if column not in ("participant_id", "session_id", "group")]
    table = _joined(embeddings, cohort, truth, factors)
    counts = target_only_factors(table, factors)
    scored = table["group"].eq("target")
    if config.scope == "held_out":
        scored &= table["split"].eq(TEST_SPLIT) if "split" in table.columns else False
    spaces = embedding_spaces(embeddings)
    out: dict = {}
    for factor, k in counts.items():
        rows = table[scored & table[factor].notna()]
        entry: dict = {"k": k, "n": int(rows["participant_id"].nunique()), "scope": config.scope}
        if len(rows) < 2 * k:
            out[factor] = {**entry, "note": f"{len(rows)} target rows to cluster (< 2k = {2 * k})"}
            continue
        labels = rows[factor].astype(str).to_numpy()
        entry["spaces"] = {}
        for space, columns in spaces.items():
            found = KMeans(n_clusters=k, n_init=N_INIT, random_state=config.seed).fit_predict(
                rows[columns].to_numpy(dtype=np.float64))
            entry["spaces"][space] = {"ari": float(adjusted_rand_score(labels, found)),
                                      "nmi": float(normalized_mutual_info_score(labels, found))}
        out[factor] = entry
    return out
