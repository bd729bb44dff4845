"""Every way a study probes its embeddings runs end to end under the installed pandas.

pandas 3 (copy-on-write) hands back read-only NumPy views from ``to_numpy()``; a write into one
(``keep &= ...``) raised ``ValueError: output array is read-only`` after a whole training run.
These tests take the tables as a study has them (written to TSV and read back, as ``neurocl
probe`` and the pipeline do) through each probe path: grouped k-fold, leave-site-out, a cohort
with several sessions per participant, and probes on the held-out test split of a holdout split
manifest.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from neurocl.cohort import Cohort, make_splits
from neurocl.embed import write_embeddings
from neurocl.io import read_tsv, write_tsv
from neurocl.probe import ProbeConfig, probe_command, probe_embeddings, separation

SETTINGS = ProbeConfig(scope="in_sample_cv", n_splits=3, inner_splits=2, n_permutations=99, n_bootstrap=20, n_jobs=1)
# 99 permutations: with 39 the smallest p (0.025) cannot survive the Benjamini-Hochberg adjustment of the table.
N_PARTICIPANTS = 48


def test_installed_pandas_is_within_the_supported_range():
    """pyproject.toml states the range these tests run under; a pandas outside it is untested."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    pandas_requirement = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "pandas")
    assert pandas_requirement.specifier.contains(pd.__version__)
    assert any(spec.operator == "<" for spec in pandas_requirement.specifier), "the range needs an upper bound"


def test_pandas_hands_out_read_only_arrays_here():
    """The condition the other tests guard against: under pandas >= 3 a column's array is read-only."""
    column = pd.DataFrame({"a": [1.0, 2.0]})["a"].to_numpy()
    if int(pd.__version__.split(".")[0]) >= 3:
        assert not column.flags.writeable


def _study(tmp_path, sessions: bool):
    """A cohort on disk (participants.tsv + cohort.yaml) and its embeddings.tsv read back.

    Two sites, patients and controls, age in ``common_0``, severity in ``salient_0``; with
    ``sessions`` every third participant has two sessions.
    """
    rng = np.random.default_rng(3)
    records = []
    for index in range(N_PARTICIPANTS):
        patient = index % 2 == 0
        for session in (["ses-1", "ses-2"] if sessions and index % 3 == 0 else ["ses-1"]):
            records.append({
                "participant_id": f"sub-{index:03d}", "session_id": session,
                "diagnosis": "patient" if patient else "control",
                "age": float(rng.uniform(20, 80)), "site": f"site-{index // 2 % 2}",
                "severity": float(rng.uniform(0, 1)) if patient else np.nan,
            })
    participants = pd.DataFrame(records)
    if not sessions:
        participants = participants.drop(columns="session_id")
    write_tsv(tmp_path / "participants.tsv", participants)
    images = "{participant_id}/{session_id}.nii.gz" if sessions else "{participant_id}.nii.gz"
    (tmp_path / "cohort.yaml").write_text(
        "participants: participants.tsv\n"
        f"images: '{images}'\n"
        "group: {column: diagnosis, background: [control], target: [patient]}\n"
        "attributes: {age: continuous, site: categorical, severity: continuous}\n"
    )
    cohort = Cohort.from_yaml(tmp_path / "cohort.yaml")
    table = cohort.table
    n = len(table)
    common = rng.normal(size=(n, 2))
    common[:, 0] = (table["age"].to_numpy() - 50) / 15 + 0.2 * rng.normal(size=n)
    salient = 0.1 * rng.normal(size=(n, 2))
    salient[:, 0] += np.nan_to_num(table["severity"].to_numpy()) * 3
    embeddings = cohort.keys().assign(**{f"common_{i}": common[:, i] for i in range(2)},
                                      **{f"salient_{i}": salient[:, i] for i in range(2)})
    write_embeddings(tmp_path / "embeddings.tsv", embeddings, cohort)  # with its cohort sidecar, as neurocl writes it
    return cohort, read_tsv(tmp_path / "embeddings.tsv")


def _primary(probes: pd.DataFrame, space: str, attribute: str, subset: str = "all") -> pd.Series:
    rows = probes[(probes["space"] == space) & (probes["attribute"] == attribute) & (probes["subset"] == subset)
                  & probes["metric"].isin(["r2", "balanced_accuracy"])]
    assert len(rows) == 1, probes
    return rows.iloc[0]


def test_grouped_kfold_probes_and_separation_run_on_tables_read_back(tmp_path):
    cohort, embeddings = _study(tmp_path, sessions=False)
    probes = probe_embeddings(embeddings, cohort, config=SETTINGS)
    assert _primary(probes, "common", "age")["value"] > 0.5
    assert _primary(probes, "salient", "severity", "target")["value"] > 0.5
    result = separation(embeddings, cohort, probes, config=SETTINGS)
    assert result["attributes"]["age"]["all"]["decodable_from"] == ["common"]


def test_leave_site_out_probes_test_on_each_site_in_turn(tmp_path):
    cohort, embeddings = _study(tmp_path, sessions=False)
    config = SETTINGS.model_copy(update={"leave_site_out": "site"})
    probes = probe_embeddings(embeddings, cohort, attributes=["age", "site"], config=config)
    age = _primary(probes, "common", "age")
    assert age["n"] == N_PARTICIPANTS and age["value"] > 0.5 and age["note"] == ""
    site = probes[probes["attribute"] == "site"]
    assert (site["metric"] == "none").all() and site["note"].str.contains("held-out site column").all()


def test_probe_command_leaves_sites_out(tmp_path):
    """``neurocl probe --leave-site-out site``: the command a researcher runs on a finished run."""
    _study(tmp_path, sessions=False)
    out = tmp_path.with_name(f"{tmp_path.name}-probes")  # outside the cohort's folder, where neurocl may write
    probes_path, separation_path = probe_command(
        tmp_path / "embeddings.tsv", tmp_path / "cohort.yaml", out, attributes=["age"],
        scope="in_sample_cv", leave_site_out="site", n_permutations=9, n_bootstrap=10, n_jobs=1,
    )
    probes = read_tsv(probes_path)
    assert _primary(probes, "common", "age")["value"] > 0.5
    assert "age" in json.loads(separation_path.read_text())["attributes"]


@pytest.mark.parametrize("leave_site_out", [None, "site"])
def test_probes_of_a_cohort_with_sessions_keep_participants_together(tmp_path, leave_site_out):
    cohort, embeddings = _study(tmp_path, sessions=True)
    assert cohort.has_sessions and len(cohort) > N_PARTICIPANTS
    config = SETTINGS.model_copy(update={"leave_site_out": leave_site_out})
    probes = probe_embeddings(embeddings, cohort, attributes=["age", "severity"], config=config)
    age = _primary(probes, "common", "age")
    assert age["n"] == len(cohort) and age["value"] > 0.5
    assert _primary(probes, "salient", "severity", "target")["value"] > 0.5


@pytest.mark.parametrize("leave_site_out", [None, "site"])
def test_held_out_probes_score_the_test_split_of_a_holdout_manifest(tmp_path, leave_site_out):
    """The default: fitted on the manifest's train/val sessions, scored on its test sessions only."""
    cohort, embeddings = _study(tmp_path, sessions=True)
    splits = make_splits(cohort, method="holdout", val_fraction=0.1, test_fraction=0.4, seed=0)
    splits.save(tmp_path / "splits.tsv")
    manifest = read_tsv(tmp_path / "splits.tsv")
    embeddings = embeddings.merge(manifest[["participant_id", "session_id", "split"]], on=["participant_id", "session_id"])
    write_tsv(tmp_path / "embeddings.tsv", embeddings)
    embeddings = read_tsv(tmp_path / "embeddings.tsv")
    config = SETTINGS.model_copy(update={"scope": "held_out", "leave_site_out": leave_site_out})
    probes = probe_embeddings(embeddings, cohort, attributes=["age", "severity"], config=config)
    age = _primary(probes, "common", "age")
    n_test = int(embeddings["split"].eq("test").sum())
    assert 0 < n_test < len(embeddings)
    assert age["scope"] == "held_out" and age["n"] == n_test and age["n_fit"] == len(embeddings) - n_test
    assert age["value"] > 0.3 and age["p_value"] < 0.05
    assert _primary(probes, "salient", "severity", "target")["value"] > 0.3
    result = separation(embeddings, cohort, probes, config=config)
    assert result["scope"] == "held_out"
    assert result["n_test_subjects"] == embeddings.loc[embeddings["split"] == "test", "participant_id"].nunique()
