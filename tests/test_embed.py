"""Embeddings: the one cohort/embeddings join, and the cohort sidecar that catches probing the wrong cohort."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from neurocl.cli import app
from neurocl.cohort import Cohort
from neurocl.embed import check_cohort, cohort_fingerprint, join_embeddings, sidecar_path, write_embeddings
from neurocl.errors import CohortError


def _embeddings(cohort: Cohort, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = cohort.keys().assign(group=cohort.table["group"].to_numpy())
    for i in range(3):
        table[f"common_{i}"] = rng.normal(size=len(table))
    return table


def _edit_age(cohort_yaml, row: int, age: str) -> None:
    participants = cohort_yaml.parent / "participants.tsv"
    table = pd.read_csv(participants, sep="\t", dtype=str, keep_default_na=False)
    table.loc[row, "age"] = age
    table.to_csv(participants, sep="\t", index=False)


def test_the_join_gives_each_row_its_cohort_row_group_and_attributes(tiny_cohort):
    cohort = Cohort.from_yaml(tiny_cohort)
    embeddings = _embeddings(cohort).iloc[::-1].reset_index(drop=True)  # order must not matter
    joined = join_embeddings(embeddings, cohort)
    expected = cohort.table.set_index("participant_id")
    for _, row in joined.iterrows():
        source = expected.loc[row["participant_id"]]
        assert cohort.table["participant_id"].iloc[row["cohort_row"]] == row["participant_id"]
        assert row["group"] == source["group"] and row["age"] == source["age"]


def test_the_join_refuses_unknown_rows_when_strict(tiny_cohort):
    cohort = Cohort.from_yaml(tiny_cohort)
    embeddings = _embeddings(cohort)
    embeddings.loc[0, "participant_id"] = "sub-9999"
    assert len(join_embeddings(embeddings, cohort)) == len(cohort) - 1
    with pytest.raises(CohortError, match="1 rows not in the cohort .*sub-9999"):
        join_embeddings(embeddings, cohort, strict=True)


def test_the_sidecar_names_the_cohort_and_its_fingerprint(tiny_cohort, tmp_path):
    cohort = Cohort.from_yaml(tiny_cohort)
    path = write_embeddings(tmp_path / "embeddings.tsv", _embeddings(cohort), cohort)
    record = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path).name == "embeddings.json"
    assert record == {"cohort": str(cohort.source), "cohort_fingerprint": cohort_fingerprint(cohort)}
    check_cohort(path, cohort)  # the same cohort passes


def test_the_fingerprint_changes_with_a_label_and_not_with_the_folder(tiny_cohort_copy, tmp_path):
    before = cohort_fingerprint(Cohort.from_yaml(tiny_cohort_copy))
    moved = tiny_cohort_copy.parent.rename(tmp_path / "moved")
    assert cohort_fingerprint(Cohort.from_yaml(moved / tiny_cohort_copy.name)) == before
    _edit_age(moved / tiny_cohort_copy.name, 3, "77")
    assert cohort_fingerprint(Cohort.from_yaml(moved / tiny_cohort_copy.name)) != before


def test_probe_refuses_embeddings_of_another_cohort_unless_told(tiny_cohort, tiny_cohort_copy, tmp_path):
    """Synthetic ids overlap between cohorts: the join alone would probe one cohort's embeddings with another's labels."""
    embeddings = write_embeddings(tmp_path / "embeddings.tsv", _embeddings(Cohort.from_yaml(tiny_cohort)),
                                  Cohort.from_yaml(tiny_cohort))
    _edit_age(tiny_cohort_copy, 0, "80")
    options = ["probe", str(embeddings), "--cohort", str(tiny_cohort_copy), "--attributes", "age", "--scope", "in_sample_cv",
               "--n-permutations", "0", "--n-bootstrap", "0", "--jobs", "1"]
    refused = CliRunner().invoke(app, options + ["--out", str(tmp_path / "refused")])
    assert refused.exit_code == 1
    assert "--other-cohort" in " ".join(refused.output.split())
    assert not (tmp_path / "refused").exists()
    accepted = CliRunner().invoke(app, options + ["--out", str(tmp_path / "accepted"), "--other-cohort"])
    assert accepted.exit_code == 0, accepted.output
    assert (tmp_path / "accepted" / "probes.tsv").is_file()
