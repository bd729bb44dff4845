"""End to end: the pipeline's subtypes stage answers "no subtypes" on a cohort that has none.

A real run (``neurocl synth`` cohort with one lesion pattern and a continuous severity,
``subtypes=0`` -> ``run_pipeline`` -> maps stage) must come out with k = 1; the failure guarded
against (issue #14) is the stage trying only k >= 2, so that a severity axis came out as two
"subtypes". The same run's maps stage, given a salient embedding with two planted, well separated
groups of patients, must answer k = 2 and find those groups: the k = 1 is the data's answer, not
the stage's only one.

Why the k = 2 side uses a planted embedding and not a second real run of a 2-subtype cohort: at
this size (40 subjects at 8 mm, a width-4 CNN, 15 to 25 epochs) the trained salient space of a
2-subtype cohort separates the subtypes at some settings and not at others (measured, seed 0:
k = 2 with ARI 1.0 at 15 epochs on one thread; k = 1, gap test p = 0.075, at 25 epochs or on two
threads), so such a test would pass or fail with the thread count. The stage then says "none",
which is the behaviour wanted, but not a stable test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import adjusted_rand_score

from neurocl.pipeline import run_pipeline
from neurocl.synth import SynthConfig, make_synthetic_cohort


def _run(tmp_path_factory, subtypes: int):
    """A real run of a tiny synthetic cohort with ``subtypes`` subtypes, maps stage on; (run folder, cohort YAML)."""
    folder = tmp_path_factory.mktemp(f"subtypes{subtypes}")
    cohort = make_synthetic_cohort(
        folder / "cohort",
        SynthConfig(n_subjects=40, subtypes=subtypes, sites=1, resolution=8.0, seed=0, subtype_effect=2.5,
                    deformation=0.0, head_size_noise=0.0, sex_effect=0.0, age_effect=0.0),
        workers=1,
    )
    pipeline = {
        "name": f"subtypes-{subtypes}",
        "cohort": str(cohort),
        "splits": {"val_fraction": 0.0, "test_fraction": 0.0},
        "views": {"p_flip": 0.0, "p_crop": 0.0},
        "method": {"name": "sepclr", "common_dim": 4, "salient_dim": 4, "tau": 0.5, "beta_null": 10.0,
                   "lam_mi": 100.0, "target_fraction": 0.5},
        "encoder": {"name": "small_cnn", "width": 4},
        "training": {"epochs": 15, "batch_size": 16, "lr": 0.003, "accelerator": "cpu", "precision": "32-true",
                     "seed": 0},
        # Every subject trains (no test split): the probes, if any, could only be in-sample.
        "evaluation": {"attributes": [], "probe": {"scope": "in_sample_cv", "n_splits": 2, "n_permutations": 0,
                                                   "n_bootstrap": 0}},
        # k over 1..2: the question is "none or some" (the gap test over k = 2..k_max decides it).
        "maps": {"enabled": True, "methods": ["gradient_x_input"], "null_references": [], "k_min": 1, "k_max": 2,
                 "n_bootstrap": 0, "n_reference": 39, "plots": False, "n_regions": 4},
        "outputs": {"report": False},
    }
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    return run_pipeline(folder / "pipeline.yaml", folder / "run"), cohort


@pytest.fixture(scope="module")
def unimodal_run(tmp_path_factory):
    return _run(tmp_path_factory, 0)


def test_the_subtypes_stage_finds_no_subtypes_in_a_severity_continuum(unimodal_run):
    run, cohort = unimodal_run
    summary = json.loads((run / "maps" / "subtypes.json").read_text())
    clusters = pd.read_csv(run / "maps" / "clusters.tsv", sep="\t")
    truth = pd.read_csv(cohort.parent / "ground_truth.tsv", sep="\t")
    clusters = clusters.merge(truth[["participant_id", "subtype", "severity"]], on="participant_id")
    # Every patient has the one pattern, with its own severity: a continuum, no clusters.
    assert len(clusters) == summary["n_subjects"] == 20
    assert clusters["subtype"].nunique() == 1 and clusters["severity"].nunique() == 20
    assert summary["n_clusters"] == 1 and (clusters["cluster"] == 1).all()
    test = summary["one_cluster_test"]
    assert not test["reject"] and test["p_value"] > 0.05


def test_the_same_stage_finds_two_planted_groups_of_patients(unimodal_run, tmp_path):
    from neurocl.maps import MapsConfig, run_maps

    run = Path(shutil.copytree(unimodal_run[0], tmp_path / "run"))
    embeddings = pd.read_csv(run / "embeddings.tsv", sep="\t")
    salient = [c for c in embeddings if c.startswith("salient_")]
    targets = np.flatnonzero((embeddings["group"] == "target").to_numpy())
    rng = np.random.default_rng(0)
    planted = rng.permutation(np.arange(len(targets)) % 2)  # two groups of patients, 10 each
    centres = rng.normal(scale=3.0, size=(2, len(salient)))
    embeddings.loc[targets, salient] = centres[planted] + rng.normal(scale=0.3, size=(len(targets), len(salient)))
    embeddings.to_csv(run / "embeddings.tsv", sep="\t", index=False)
    config = MapsConfig(k_min=1, k_max=2, n_bootstrap=0, n_reference=39, methods=["gradient_x_input"],
                        null_references=[], plots=False, n_regions=4)
    run_maps(run, config=config, progress=False)
    summary = json.loads((run / "maps" / "subtypes.json").read_text())
    assert summary["n_clusters"] == 2 and summary["one_cluster_test"]["reject"]
    clusters = pd.read_csv(run / "maps" / "clusters.tsv", sep="\t")
    by_id = dict(zip(embeddings.loc[targets, "participant_id"], planted))
    assert adjusted_rand_score([by_id[p] for p in clusters["participant_id"]], clusters["cluster"]) == 1.0
