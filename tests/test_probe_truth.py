"""Ground-truth factors probed and clustered from each space (held out: fitted on train/val, scored on test)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from neurocl.cohort import Cohort
from neurocl.config import ProbeConfig
from neurocl.probe import cluster_recovery, probe_ground_truth

CONFIG = ProbeConfig(n_splits=3, inner_splits=2, n_permutations=0, n_bootstrap=0, n_jobs=1)


def _cohort_and_embeddings(n=80, seed=0):
    """Half patients of subtypes 1/2 that the salient space separates (far apart); the common space is noise."""
    rng = np.random.default_rng(seed)
    ids = [f"sub-{i:03d}" for i in range(n)]
    is_target = np.arange(n) % 2 == 0
    subtype = np.where(is_target, 1 + (np.arange(n) // 2) % 2, 0)
    participants = pd.DataFrame({"participant_id": ids, "dx": np.where(is_target, "PT", "HC"),
                                 "age": rng.uniform(20, 80, n)})
    cohort = Cohort(participants, images="{participant_id}.nii.gz", group={"column": "dx", "background": ["HC"],
                                                                           "target": ["PT"]},
                    attributes={"age": "continuous"})
    split = rng.permutation(np.array(["train", "train", "val", "test"] * (n // 4)))
    salient = rng.normal(scale=0.1, size=(n, 2)) + np.where(subtype == 2, 5.0, 0.0)[:, None] * is_target[:, None]
    embeddings = pd.DataFrame({"participant_id": ids, "split": split,
                               **{f"common_{i}": rng.normal(size=n) for i in range(2)},
                               **{f"salient_{i}": salient[:, i] for i in range(2)}})
    truth = pd.DataFrame({"participant_id": ids, "age": participants["age"], "subtype": subtype})
    return cohort, embeddings, truth


def test_every_factor_not_in_the_participants_table_is_probed_held_out():
    cohort, embeddings, truth = _cohort_and_embeddings()
    probes = probe_ground_truth(embeddings, cohort, truth, subsets=["target"], config=CONFIG)
    assert set(probes["attribute"]) == {"subtype"} and set(probes["scope"]) == {"held_out"}
    primary = probes[probes["metric"] == "balanced_accuracy"].set_index("space")["value"]
    assert primary["salient"] == 1.0 and primary["common"] < 0.8
    test_patients = (embeddings["split"].eq("test") & truth["subtype"].gt(0)).sum()
    assert set(probes.loc[probes["metric"] == "balanced_accuracy", "n"]) == {test_patients}


def test_clustering_scores_the_subtypes_by_ari_and_nmi_on_the_test_patients():
    cohort, embeddings, truth = _cohort_and_embeddings()
    result = cluster_recovery(embeddings, cohort, truth, CONFIG)
    assert list(result) == ["subtype"]
    entry = result["subtype"]
    assert entry["k"] == 2 and entry["n"] == (embeddings["split"].eq("test") & truth["subtype"].gt(0)).sum()
    assert entry["spaces"]["salient"] == {"ari": 1.0, "nmi": 1.0}
    assert entry["spaces"]["common"]["ari"] < 0.5
