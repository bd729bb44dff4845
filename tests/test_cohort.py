"""Tests for neurocl.cohort: spec loading, validation of broken cohorts, subject-level splits."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from neurocl.cli import app
from neurocl.cohort import Cohort, CohortSpec, Problem, Splits, make_splits, print_problems
from neurocl.errors import CohortError, ConfigError

IMAGES = "{participant_id}/anat/{participant_id}_desc-gm.nii.gz"
GROUP = {"column": "diagnosis", "background": ["control"], "target": ["patient"]}


def write_spec(folder: Path, participants_tsv: str, **overrides) -> Path:
    """A cohort YAML + participants.tsv written as plain text (no neurocl code involved)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "participants.tsv").write_text(participants_tsv)
    fields = {
        "name": "test",
        "participants": "participants.tsv",
        "images": f'"{IMAGES}"',
        "group": "{column: diagnosis, background: [control], target: [patient]}",
        "attributes": "{age: continuous, site: categorical}",
    }
    fields.update(overrides)
    text = "".join(f"{key}: {value}\n" for key, value in fields.items() if value is not None)
    (folder / "cohort.yaml").write_text(text)
    return folder / "cohort.yaml"


TSV = "participant_id\tdiagnosis\tage\tsite\nsub-01\tcontrol\t30.5\t01\nsub-02\tpatient\tn/a\tsite-B\n\nsub-03\tother\t41\tn/a\n"


# ---------------------------------------------------------------------- loading
def test_table_keeps_categorical_spelling_and_reads_na_as_missing(tmp_path):
    cohort = Cohort.from_yaml(write_spec(tmp_path, TSV))
    table = cohort.table
    assert table["participant_id"].tolist() == ["sub-01", "sub-02", "sub-03"]
    assert table["site"].iloc[0] == "01"  # not the number 1
    assert pd.isna(table["site"].iloc[2])
    assert table["age"].iloc[0] == 30.5 and np.isnan(table["age"].iloc[1])
    assert table["age"].dtype == float


def test_group_values_map_to_background_target_and_others_to_missing(tmp_path):
    cohort = Cohort.from_yaml(write_spec(tmp_path, TSV))
    assert cohort.table["group"].iloc[:2].tolist() == ["background", "target"]
    assert pd.isna(cohort.table["group"].iloc[2])
    assert cohort.is_target.tolist() == [False, True, False]


def test_row_is_the_tsv_line_number_counting_header_and_blank_lines(tmp_path):
    cohort = Cohort.from_yaml(write_spec(tmp_path, TSV))
    # header = line 1, sub-01 line 2, sub-02 line 3, blank line 4, sub-03 line 5
    assert cohort.table["row"].tolist() == [2, 3, 5]


def test_image_paths_resolve_against_the_yaml_folder_and_root(tmp_path):
    spec = write_spec(
        tmp_path / "spec",
        "participant_id\tsession_id\tdiagnosis\nsub-01\tses-1\tcontrol\nsub-01\tses-2\tpatient\n",
        root="../data",
        images='"{participant_id}/{session_id}/gm.nii.gz"',
        attributes=None,
    )
    cohort = Cohort.from_yaml(spec)
    expected = [(tmp_path / "data" / "sub-01" / session / "gm.nii.gz").resolve() for session in ("ses-1", "ses-2")]
    assert cohort.image_paths == expected
    assert cohort.has_sessions
    assert cohort.keys().columns.tolist() == ["participant_id", "session_id"]


def test_missing_group_column_error_names_yaml_field_and_columns(tmp_path):
    spec = write_spec(tmp_path, TSV, group="{column: dx, background: [control], target: [patient]}")
    with pytest.raises(CohortError) as error:
        Cohort.from_yaml(spec)
    message = str(error.value)
    assert str(spec) in message and "group.column" in message and "'dx'" in message
    assert "participant_id, diagnosis, age, site" in message


def test_unknown_placeholder_in_image_template_is_rejected(tmp_path):
    spec = write_spec(tmp_path, TSV, images='"{participant_id}/{subject}.nii.gz"')
    with pytest.raises(CohortError, match=r"images: unknown placeholder \{subject\}") as error:
        Cohort.from_yaml(spec)
    assert str(spec) in str(error.value)


def test_invalid_attribute_kind_and_unknown_field_are_both_reported(tmp_path):
    spec = write_spec(tmp_path, TSV, attributes="{age: numeric}", atributes="{}")
    with pytest.raises(CohortError) as error:
        Cohort.from_yaml(spec)
    assert "attributes.age" in str(error.value) and "'numeric'" in str(error.value)
    assert "atributes: Extra inputs are not permitted (got {}); did you mean attributes? (top-level fields: name," in str(error.value)


def test_a_mistyped_spec_field_names_the_nearest_one(tmp_path):
    with pytest.raises(CohortError, match=r"on_invalide: .*did you mean on_invalid\?"):
        Cohort.from_yaml(write_spec(tmp_path / "a", TSV, on_invalide="exclude"))
    with pytest.raises(CohortError, match=r"group.backgrund: .*did you mean group.background\? \(group fields: column, "):
        Cohort.from_yaml(write_spec(tmp_path / "b", TSV, group="{column: diagnosis, backgrund: [control], target: [patient]}"))


def test_missing_participants_file_is_named(tmp_path):
    spec = write_spec(tmp_path, TSV, participants="nowhere.tsv")
    with pytest.raises(CohortError, match="nowhere.tsv not found"):
        Cohort.from_yaml(spec)


def test_missing_participant_id_column_is_named(tmp_path):
    spec = write_spec(tmp_path, "subject\tdiagnosis\tage\tsite\ns1\tcontrol\t1\ta\n")
    with pytest.raises(CohortError, match="'participant_id' is not a column of .*participants.tsv"):
        Cohort.from_yaml(spec)


def test_session_placeholder_without_session_column_is_an_error(tmp_path):
    spec = write_spec(tmp_path, TSV, images='"{participant_id}/{session_id}.nii.gz"')
    with pytest.raises(CohortError, match="'session_id' is not a column"):
        Cohort.from_yaml(spec)


def test_byte_order_mark_and_windows_line_endings_are_read(tmp_path):
    cohort = Cohort.from_yaml(write_spec(tmp_path, "\ufeff" + TSV.replace("\n", "\r\n")))
    assert cohort.table["participant_id"].tolist() == ["sub-01", "sub-02", "sub-03"]
    assert cohort.table["site"].iloc[1] == "site-B"


def test_dataframe_cells_read_as_a_tsv_would():
    participants = pd.DataFrame(
        {"participant_id": ["sub-1", "sub-2", "sub-3"], "diagnosis": [0, 1, "n/a"], "site": [1.0, 2.0, np.nan]}
    )
    group = {"column": "diagnosis", "background": 0, "target": 1}
    cohort = Cohort(participants, "{participant_id}.nii.gz", group, {"site": "categorical"})
    assert cohort.table["group"].iloc[:2].tolist() == ["background", "target"]
    assert cohort.categories == {"site": ["1", "2"]}
    assert pd.isna(cohort.table["site"].iloc[2]) and pd.isna(cohort.table["group"].iloc[2])


def test_attribute_matrix_codes_sorted_categories_and_subsets_keep_the_codes():
    participants = pd.DataFrame(
        {
            "participant_id": ["sub-1", "sub-2", "sub-3", "sub-4"],
            "diagnosis": ["control", "patient", "patient", "control"],
            "site": ["b", "a", "n/a", "c"],
            "age": [20, 30, 40, None],
        }
    )
    cohort = Cohort(participants, "{participant_id}.nii.gz", GROUP, {"site": "categorical", "age": "continuous"})
    matrix = cohort.attribute_matrix(["site", "age"])
    expected = np.array([[1, 20], [0, 30], [np.nan, 40], [2, np.nan]], dtype=float)
    np.testing.assert_array_equal(matrix, expected)
    subset = cohort.select([3, 0])  # categories a, b, c of the whole cohort, not of the subset
    np.testing.assert_array_equal(subset.attribute_matrix(["site"]), [[2.0], [1.0]])


# ---------------------------------------------------------------------- validation
def participants_lines(spec: Path) -> list[str]:
    return (spec.parent / "participants.tsv").read_text().splitlines()


def image_of(spec: Path, participant_id: str) -> Path:
    return spec.parent / IMAGES.format(participant_id=participant_id)


def test_synthetic_cohort_loads_and_validates_clean(tiny_cohort):
    cohort = Cohort.from_yaml(tiny_cohort)
    assert cohort.validate() == []
    cohort.check()
    lines = participants_lines(tiny_cohort)
    assert len(cohort) == len(lines) - 1 == 32
    assert (cohort.table["group"] == "background").sum() == sum("\tcontrol\t" in line for line in lines)
    shape, affine, zooms = cohort.reference_grid()
    first = nib.load(image_of(tiny_cohort, "sub-0001"))
    assert shape == first.shape and np.allclose(affine, first.affine) and np.allclose(zooms, 8.0)


def break_cohort(spec: Path) -> dict[str, tuple[int, str]]:
    """Break a copy in every way validate() must catch; returns participant_id -> (line, expected words)."""
    lines = participants_lines(spec)
    header = lines[0].split("\t")
    ids = [line.split("\t")[0] for line in lines[1:]]
    line_of = {pid: number for number, pid in enumerate(ids, start=2)}
    reference = nib.load(image_of(spec, ids[0]))
    data = np.asarray(reference.dataobj, dtype=np.float32)
    expected = {}

    image_of(spec, ids[1]).unlink()
    expected[ids[1]] = "image not found"
    image_of(spec, ids[2]).write_bytes(b"\x00 not a nifti \xff" * 20)
    expected[ids[2]] = "unreadable image"
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), reference.affine), image_of(spec, ids[3]))
    expected[ids[3]] = "4D"
    nib.save(nib.Nifti1Image(data[:-1], reference.affine), image_of(spec, ids[4]))
    expected[ids[4]] = "shape"
    shifted = reference.affine.copy()
    shifted[0, 3] += 2.0
    nib.save(nib.Nifti1Image(data, shifted), image_of(spec, ids[5]))
    expected[ids[5]] = "affine differs"
    nib.save(nib.Nifti1Image(data, reference.affine @ np.diag([0.5, 1, 1, 1])), image_of(spec, ids[6]))
    expected[ids[6]] = "voxel size"
    with_nan = data.copy()
    with_nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(with_nan, reference.affine), image_of(spec, ids[7]))
    expected[ids[7]] = "1 NaN"
    gz = image_of(spec, ids[8]).read_bytes()
    image_of(spec, ids[8]).write_bytes(gz[: len(gz) // 2])
    expected[ids[8]] = "corrupt image data"

    def set_cell(pid: str, column: str, value: str) -> None:
        cells = lines[line_of[pid] - 1].split("\t")
        cells[header.index(column)] = value
        lines[line_of[pid] - 1] = "\t".join(cells)

    set_cell(ids[9], "age", "abc")
    expected[ids[9]] = "age 'abc' is not a finite number"
    set_cell(ids[10], "diagnosis", "unknown")
    expected[ids[10]] = "diagnosis 'unknown' is neither background nor target"
    set_cell(ids[11], "sex", "n/a")
    expected[ids[11]] = "required attribute 'sex' is missing"
    lines.append(lines[line_of[ids[12]] - 1])
    expected[ids[12]] = f"duplicate of line {line_of[ids[12]]}"
    (spec.parent / "participants.tsv").write_text("\n".join(lines) + "\n")
    spec.write_text(spec.read_text() + "required: [sex]\n")
    return {pid: (len(lines) if "duplicate" in words else line_of[pid], words) for pid, words in expected.items()}


def test_every_problem_is_reported_at_once_with_its_row(tiny_cohort_copy):
    expected = break_cohort(tiny_cohort_copy)
    problems = Cohort.from_yaml(tiny_cohort_copy).validate()
    for pid, (line, words) in expected.items():
        matching = [p for p in problems if p.participant_id == pid and words in p.problem]
        assert [p.row for p in matching] == [line], f"{pid}: {words!r} not reported on line {line}: {problems}"
    assert {p.participant_id for p in problems} == set(expected)


def test_check_raises_one_error_listing_every_problem(tiny_cohort_copy):
    expected = break_cohort(tiny_cohort_copy)
    with pytest.raises(CohortError) as error:
        Cohort.from_yaml(tiny_cohort_copy).check()
    message = str(error.value)
    for pid, (line, words) in expected.items():
        assert f"line {line} ({pid}): " in message and words in message


def test_empty_background_group_is_reported(tiny_cohort_copy):
    lines = participants_lines(tiny_cohort_copy)
    kept = [lines[0]] + [line for line in lines[1:] if "\tcontrol\t" not in line]
    (tiny_cohort_copy.parent / "participants.tsv").write_text("\n".join(kept) + "\n")
    problems = Cohort.from_yaml(tiny_cohort_copy).validate(check_images=False)
    assert problems == [Problem(None, None, "background group is empty (no row has diagnosis in ['control'])")]


def test_trailing_singleton_dimension_counts_as_3d(tiny_cohort_copy):
    path = image_of(tiny_cohort_copy, "sub-0002")
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., None], image.affine), path)
    assert nib.load(path).ndim == 4
    assert Cohort.from_yaml(tiny_cohort_copy).validate() == []


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_validate_and_cli_never_write_into_the_cohort_folder(tiny_cohort_copy):
    break_cohort(tiny_cohort_copy)
    before = folder_state(tiny_cohort_copy.parent)
    Cohort.from_yaml(tiny_cohort_copy).validate(progress=True)
    CliRunner().invoke(app, ["validate", str(tiny_cohort_copy)])
    assert folder_state(tiny_cohort_copy.parent) == before


def test_cli_validate_exits_zero_when_clean_and_one_with_problems(tiny_cohort, tiny_cohort_copy):
    runner = CliRunner()
    clean = runner.invoke(app, ["validate", str(tiny_cohort)])
    assert clean.exit_code == 0, clean.output
    assert "cohort OK: 32 images, 16 background, 16 target" in clean.output
    tiny_cohort_copy.parent.joinpath(IMAGES.format(participant_id="sub-0005")).unlink()
    broken = runner.invoke(app, ["validate", str(tiny_cohort_copy)])
    assert broken.exit_code == 1
    assert "sub-0005" in broken.output and "image not found" in broken.output
    missing_spec = runner.invoke(app, ["validate", str(tiny_cohort_copy.parent / "missing.yaml")])
    assert missing_spec.exit_code == 1
    assert "cohort spec not found" in missing_spec.output and "Traceback" not in missing_spec.output


def test_print_problems_renders_row_participant_and_problem():
    console = Console(record=True, width=200)
    print_problems([Problem(7, "sub-0006", "image not found: x.nii.gz"), Problem(None, None, "target group is empty")], console)
    text = console.export_text()
    assert "row" in text and "participant_id" in text and "problem" in text
    assert "7 │ sub-0006" in text and "image not found: x.nii.gz" in text
    assert "2 problem(s) in 1 row(s)" in text


# ---------------------------------------------------------------------- splits
def split_cohort(n_controls: int = 30, n_patients: int = 10, sites: int = 3) -> Cohort:
    """A cohort with sessions: every third subject has two sessions; images need not exist to split."""
    records = []
    for index in range(n_controls + n_patients):
        sessions = ["ses-1", "ses-2"] if index % 3 == 0 else ["ses-1"]
        for session in sessions:
            records.append(
                {
                    "participant_id": f"sub-{index:03d}",
                    "session_id": session,
                    "diagnosis": "control" if index < n_controls else "patient",
                    "site": f"site-{index % sites + 1}",
                    "sex": "FM"[index % 2],
                    "age": 20 + index,
                }
            )
    attributes = {"site": "categorical", "sex": "categorical", "age": "continuous"}
    return Cohort(pd.DataFrame(records), "{participant_id}/{session_id}.nii.gz", GROUP, attributes)


def subject_labels(splits: Splits) -> pd.Series:
    return splits.table.drop_duplicates("participant_id").set_index("participant_id")[splits.column]


def labels_per_subject(cohort: Cohort, splits: Splits) -> dict[str, set]:
    merged = cohort.keys().merge(splits.table, on=cohort.keys().columns.tolist())
    assert len(merged) == len(cohort)
    return merged.groupby("participant_id")[splits.column].agg(set).to_dict()


@pytest.mark.parametrize("method", ["holdout", "kfold", "leave-site-out"])
def test_no_participant_is_in_two_splits_whatever_its_sessions(method):
    cohort = split_cohort()
    splits = make_splits(cohort, method=method, n_splits=4, seed=3)
    assert all(len(labels) == 1 for labels in labels_per_subject(cohort, splits).values())
    for train_rows, test_rows in splits.folds(cohort):
        train_ids = set(cohort.table["participant_id"].iloc[train_rows])
        test_ids = set(cohort.table["participant_id"].iloc[test_rows])
        assert not train_ids & test_ids


def test_kfold_tests_every_subject_exactly_once():
    cohort = split_cohort()
    folds = make_splits(cohort, method="kfold", n_splits=5).folds(cohort)
    tested = np.concatenate([test_rows for _, test_rows in folds])
    assert sorted(tested) == list(range(len(cohort)))
    for train_rows, test_rows in folds:
        assert len(train_rows) + len(test_rows) == len(cohort)


def test_stratification_balances_group_proportions():
    cohort = split_cohort(n_controls=30, n_patients=10)
    subjects = cohort.table.drop_duplicates("participant_id")
    for seed in range(5):
        kfold = make_splits(cohort, method="kfold", n_splits=5, seed=seed)
        folds = subjects["participant_id"].map(subject_labels(kfold))
        # 10 patients over 5 folds: exactly 2 patients and 6 controls in each fold
        assert (subjects.loc[subjects["group"] == "target"].assign(fold=folds).groupby("fold").size() == 2).all()
        assert (subjects.loc[subjects["group"] == "background"].assign(fold=folds).groupby("fold").size() == 6).all()
        holdout = make_splits(cohort, method="holdout", val_fraction=0.2, test_fraction=0.3, seed=seed)
        split = subjects["participant_id"].map(subject_labels(holdout))
        for name, fraction in (("test", 0.3), ("val", 0.2), ("train", 0.5)):
            patients = int(((split == name) & (subjects["group"] == "target")).sum())
            assert abs(patients - 10 * fraction) <= 1, (seed, name, patients)


def test_stratifying_by_site_also_balances_sites():
    cohort = split_cohort(n_controls=30, n_patients=30, sites=3)
    splits = make_splits(cohort, method="kfold", n_splits=5, stratify=("group", "site"), seed=1)
    subjects = cohort.table.drop_duplicates("participant_id").merge(splits.table.drop_duplicates("participant_id"))
    # each (group, site) stratum has 10 subjects: 2 per fold
    assert (subjects.groupby(["group", "site", "fold"]).size() == 2).all()


def test_a_stratum_of_one_subject_falls_into_a_single_split():
    cohort = split_cohort(n_controls=19, n_patients=1)
    splits = make_splits(cohort, method="holdout", seed=0)
    assert set(splits.table["split"]) == {"train", "val", "test"}
    assert len(labels_per_subject(cohort, splits)["sub-019"]) == 1


def test_leave_site_out_holds_out_exactly_one_site_per_fold():
    cohort = split_cohort(sites=3)
    splits = make_splits(cohort, method="leave-site-out")
    folds = splits.folds(cohort)
    assert len(folds) == 3
    held_out = []
    for train_rows, test_rows in folds:
        test_sites = set(cohort.table["site"].iloc[test_rows])
        assert len(test_sites) == 1
        assert not test_sites & set(cohort.table["site"].iloc[train_rows])
        held_out += test_sites
    assert held_out == ["site-1", "site-2", "site-3"]


def test_splits_save_load_round_trip(tmp_path):
    cohort = split_cohort()
    for method in ("holdout", "kfold"):
        splits = make_splits(cohort, method=method, seed=7)
        path = splits.save(tmp_path / f"{method}.tsv")
        assert path.read_text().splitlines()[0].split("\t") == ["participant_id", "session_id", splits.column]
        loaded = Splits.load(path, cohort)
        pd.testing.assert_frame_equal(loaded.table, splits.table, check_dtype=False)
        for name in (["train", "val", "test"] if method == "holdout" else range(5)):
            np.testing.assert_array_equal(loaded.rows(cohort, name), splits.rows(cohort, name))


def test_same_seed_gives_same_splits_and_another_seed_differs():
    cohort = split_cohort()
    first = make_splits(cohort, method="holdout", seed=11).table
    pd.testing.assert_frame_equal(first, make_splits(cohort, method="holdout", seed=11).table)
    assert not first.equals(make_splits(cohort, method="holdout", seed=12).table)


def test_load_rejects_unknown_split_name(tmp_path):
    path = tmp_path / "splits.tsv"
    path.write_text("participant_id\tsplit\nsub-000\ttrain\nsub-001\tvalidation\n")
    with pytest.raises(CohortError, match=r"line 3: unknown split 'validation'"):
        Splits.load(path)


def test_load_rejects_subjects_missing_from_the_cohort(tmp_path):
    path = tmp_path / "splits.tsv"
    path.write_text("participant_id\tfold\nsub-000\t0\nsub-999\t1\n")
    with pytest.raises(CohortError, match="1 participant.* not in cohort .*sub-999"):
        Splits.load(path, split_cohort())


def test_load_rejects_a_subject_in_two_splits(tmp_path):
    path = tmp_path / "splits.tsv"
    path.write_text("participant_id\tsession_id\tsplit\nsub-000\tses-1\ttrain\nsub-000\tses-2\ttest\n")
    with pytest.raises(CohortError, match="sub-000 appears in several splits"):
        Splits.load(path)


def test_rows_rejects_cohort_subjects_absent_from_the_manifest(tmp_path):
    cohort = split_cohort()
    splits = make_splits(cohort.select(cohort.table["participant_id"] != "sub-004"), method="kfold")
    with pytest.raises(CohortError, match="not in the split manifest: sub-004"):
        splits.rows(cohort, 0)


def test_stratifying_by_a_continuous_attribute_is_rejected():
    with pytest.raises(ConfigError, match="stratify: 'age' cannot stratify"):
        make_splits(split_cohort(), stratify=("group", "age"))



def test_shipped_study_template_loads_against_a_matching_table(tmp_path):
    """cohorts/study_template.yaml must stay a valid spec: point it at a table with its columns."""
    import yaml

    from neurocl.cohort import CohortSpec

    template = Path(__file__).resolve().parents[1] / "cohorts" / "study_template.yaml"
    raw = yaml.safe_load(template.read_text())
    spec = CohortSpec.model_validate(raw)
    columns = ["participant_id", "session_id", spec.group.column, *spec.attributes]
    row = ["sub-01", "ses-1", spec.group.target[0], "30", "F", "s1", "1500", "12", "20"]
    (tmp_path / "participants.tsv").write_text("\t".join(columns) + "\n" + "\t".join(row) + "\n")
    raw.update(participants="participants.tsv", root=".")
    cohort = Cohort.from_spec(CohortSpec.model_validate(raw), base_dir=tmp_path)
    assert cohort.table.loc[0, "group"] == "target"
    assert cohort.table.loc[0, "image"].endswith("mri/mwp1sub-01_ses-1_T1w.nii.gz")


TRUTH_TSV = "participant_id\tsubtype\tseverity\tlatent\nsub-01\t0\t0\t0.25\nsub-02\t2\t7.5\t-1.5\n"


def test_ground_truth_is_read_relative_to_the_spec_and_keyed_by_participant(tmp_path):
    spec = write_spec(tmp_path / "c", TSV, ground_truth="truth/factors.tsv")
    (tmp_path / "c" / "truth").mkdir()
    (tmp_path / "c" / "truth" / "factors.tsv").write_text(TRUTH_TSV)
    truth = Cohort.from_yaml(spec).ground_truth()
    assert truth["participant_id"].tolist() == ["sub-01", "sub-02"]
    assert truth["subtype"].tolist() == [0, 2] and truth["latent"].tolist() == [0.25, -1.5]
    assert Cohort.from_yaml(write_spec(tmp_path / "none", TSV)).ground_truth() is None


def test_the_ground_truth_of_a_row_left_out_is_dropped_not_refused(tmp_path):
    spec = write_spec(tmp_path / "c", TSV, ground_truth="factors.tsv", include="[sub-01, sub-03]")
    (tmp_path / "c" / "factors.tsv").write_text(TRUTH_TSV + "sub-03\t1\t2\t3\n")
    cohort = Cohort.from_yaml(spec)
    assert cohort.table["participant_id"].tolist() == ["sub-01", "sub-03"]
    assert cohort.ground_truth()["participant_id"].tolist() == ["sub-01", "sub-03"]  # sub-02: not selected


@pytest.mark.parametrize("content, message", [
    (None, r"ground_truth: .*factors\.tsv not found"),
    ("subject\tsubtype\nsub-01\t1\n", "no participant_id column"),
    ("participant_id\nsub-01\n", "no factor column"),
    (TRUTH_TSV + "sub-01\t1\t2\t3\n", r"factors\.tsv line 4: duplicate of line 2 \(sub-01\)"),
    (TRUTH_TSV + "n/a\t1\t2\t3\n", r"factors\.tsv line 4: participant_id is missing"),
    (TRUTH_TSV + "sub-99\t1\t2\t3\n", r"factors\.tsv line 4: sub-99 is not a row of the cohort"),
    ("participant_id\tsession_id\tsubtype\nsub-01\tses-1\t1\n", "session_id column but the cohort"),
])
def test_ground_truth_problems_name_the_file_and_line(tmp_path, content, message):
    spec = write_spec(tmp_path, TSV, ground_truth="factors.tsv")
    if content is not None:
        (tmp_path / "factors.tsv").write_text(content)
    cohort = Cohort.from_yaml(spec)
    with pytest.raises(CohortError, match=message):
        cohort.ground_truth()


def test_ground_truth_factors_leave_out_attributes_and_find_subtype_like_ones(tmp_path):
    from neurocl.cohort.truth import target_only_factors, truth_factors

    spec = write_spec(tmp_path, TSV, ground_truth="factors.tsv")
    (tmp_path / "factors.tsv").write_text("participant_id\tgroup\tage\tsubtype\tlatent\nsub-01\tbackground\t30\t0\t0.3\n"
                                          "sub-02\ttarget\t40\t2\t1.7\nsub-03\ttarget\t41\t1\t2.2\n")
    cohort = Cohort.from_yaml(spec)
    truth = cohort.ground_truth()
    assert truth_factors(truth, cohort) == {"subtype": "categorical", "latent": "continuous"}
    assert target_only_factors(truth, ["subtype", "latent"]) == {"subtype": 2}


def test_a_synthetic_cohort_spec_names_its_ground_truth(tiny_cohort):
    cohort = Cohort.from_yaml(tiny_cohort)
    truth = cohort.ground_truth()
    assert cohort.ground_truth_path == tiny_cohort.parent / "ground_truth.tsv"
    assert set(truth["participant_id"]) == set(cohort.table["participant_id"]) and "subtype" in truth


# ---------------------------------------------------------------------- include and on_invalid: exclude
COHORTS = Path(__file__).resolve().parents[1] / "cohorts"
# A messy BIDS dataset in the CAT12 layout: line -> (participant_id, diagnosis, age, sex, site).
MESSY = {2: ("sub-01", "control", "30", "F", "A"), 3: ("sub-02", "patient", "41", "M", "A"),
         4: ("sub-03", "n/a", "52", "F", "B"), 5: ("sub-04", "patient", "n/a", "M", "B"),
         6: ("sub-05", "control", "25", "M", "B"), 7: ("sub-06", "n/a", "60", "M", "A"),
         8: ("sub-07", "patient", "38", "F", "pilot"), 9: ("sub-08", "control", "45", "F", "A"),
         10: ("sub-09", "patient", "33", "F", "B")}
NO_IMAGE = "sub-05"
# What the shipped spec (include: site != 'pilot', on_invalid: exclude) must leave out, and why.
LEFT_OUT = {4: ("sub-03", "diagnosis missing"), 5: ("sub-04", "age missing"), 6: ("sub-05", "image missing"),
            7: ("sub-06", "diagnosis missing"), 8: ("sub-07", "not selected by include")}


def write_cat12_dataset(folder: Path, **changes) -> Path:
    """The messy dataset on disk (8^3 NIfTIs, plain-text TSV) with cohorts/cat12_derivatives.yaml beside it,
    its fields changed by ``changes`` (None removes one)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    lines = ["participant_id\tdiagnosis\tage\tsex\tsite"] + ["\t".join(MESSY[line]) for line in sorted(MESSY)]
    (folder / "participants.tsv").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(0)
    for pid, *_ in MESSY.values():
        anat = folder / "derivatives" / "cat12" / pid / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        if pid != NO_IMAGE:
            volume = rng.random((8, 8, 8)).astype(np.float32)
            nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), anat / f"mwp1{pid}_T1w.nii.gz")
    raw = yaml.safe_load((COHORTS / "cat12_derivatives.yaml").read_text())
    raw.update(changes)
    (folder / "cohort.yaml").write_text(yaml.safe_dump({key: value for key, value in raw.items() if value is not None}))
    return folder / "cohort.yaml"


def test_a_messy_cat12_dataset_is_refused_by_default_with_every_bad_row_named(tmp_path):
    spec = write_cat12_dataset(tmp_path / "bids", on_invalid=None)
    cohort = Cohort.from_yaml(spec)
    problems = cohort.validate()
    expected = {4: "diagnosis is missing", 5: "required attribute 'age' is missing", 6: "image not found",
                7: "diagnosis is missing"}
    assert {problem.row: problem.problem.split(" (")[0].split(":")[0] for problem in problems} == expected
    with pytest.raises(CohortError, match=r"4 problem\(s\)"):
        cohort.check()
    assert cohort.excluded["row"].tolist() == [8]  # the include filter still applies


def test_on_invalid_exclude_leaves_out_the_bad_rows_and_records_why(tmp_path):
    cohort = Cohort.from_yaml(write_cat12_dataset(tmp_path / "bids"))
    assert cohort.table["participant_id"].tolist() == ["sub-01", "sub-02", "sub-08", "sub-09"]
    assert cohort.table["row"].tolist() == [2, 3, 9, 10]
    cohort.check()
    excluded = cohort.excluded
    assert excluded.columns.tolist() == ["participant_id", "row", "reason", "problem"]
    assert {row: (pid, reason) for row, pid, reason in excluded[["row", "participant_id", "reason"]].values} == LEFT_OUT
    assert "mwp1sub-05_T1w.nii.gz" in excluded.set_index("row").at[6, "problem"]
    assert cohort.categories["site"] == ["A", "B"]  # 'pilot' was only on a row left out
    assert cohort.n_read == len(MESSY)


def test_a_row_with_two_problems_is_left_out_once_with_both(tmp_path):
    spec = write_cat12_dataset(tmp_path / "bids", include=None)
    (tmp_path / "bids" / "participants.tsv").write_text(
        (tmp_path / "bids" / "participants.tsv").read_text().replace("sub-03\tn/a\t52", "sub-03\tn/a\tn/a"))
    row = Cohort.from_yaml(spec).excluded.set_index("row").loc[4]
    assert row["reason"] == "diagnosis missing; age missing"
    assert row["problem"].count("; ") == 1


def test_exclusion_keeps_the_problems_of_the_whole_cohort_errors(tmp_path):
    # Every patient row left out: the target group is empty, which no exclusion can fix.
    spec = write_cat12_dataset(tmp_path / "a", include="diagnosis != 'patient' or participant_id == 'sub-04'")
    with pytest.raises(CohortError, match=r"target group is empty .*after leaving out 7 of 9 rows: include, on_invalid"):
        Cohort.from_yaml(spec).check()
    # A wrong images template: no image reads, so nothing is left out for its image.
    spec = write_cat12_dataset(tmp_path / "b", images="derivatives/cat12/{participant_id}/anat/mwp2{participant_id}_T1w.nii.gz")
    cohort = Cohort.from_yaml(spec)
    assert set(cohort.excluded["reason"]) == {"diagnosis missing", "age missing", "not selected by include"}
    with pytest.raises(CohortError, match="no image could be read .*check the spec's root and images template"):
        cohort.check()
    spec = write_cat12_dataset(tmp_path / "c", group={"column": "dx", "background": ["control"], "target": ["patient"]})
    with pytest.raises(CohortError, match="group.column: 'dx' is not a column"):
        Cohort.from_yaml(spec)


def test_a_duplicate_row_is_left_out_and_the_first_kept(tmp_path):
    spec = write_cat12_dataset(tmp_path / "bids", include=None)
    tsv = tmp_path / "bids" / "participants.tsv"
    tsv.write_text(tsv.read_text() + "sub-01\tpatient\t31\tF\tA\n")
    cohort = Cohort.from_yaml(spec)
    assert cohort.table.loc[cohort.table["participant_id"] == "sub-01", "row"].tolist() == [2]
    assert cohort.excluded.set_index("row").at[11, "reason"] == "duplicate row"


@pytest.mark.parametrize(("include", "selected", "kept"), [
    ("age >= 40", ["sub-02", "sub-03", "sub-06", "sub-08"], ["sub-02", "sub-08"]),  # continuous: numbers
    ("site == 'B' and sex == 'F'", ["sub-03", "sub-09"], ["sub-09"]),
    ("participant_id.str.endswith('1') or `sex` == 'M'", ["sub-01", "sub-02", "sub-04", "sub-05", "sub-06"],
     ["sub-01", "sub-02"]),
    (["sub-08", "sub-01"], ["sub-01", "sub-08"], ["sub-01", "sub-08"]),  # table order, not list order
])
def test_include_selects_rows_by_query_or_ids_before_any_check(tmp_path, include, selected, kept):
    cohort = Cohort.from_yaml(write_cat12_dataset(tmp_path / "bids", include=include))
    assert cohort.table["participant_id"].tolist() == kept
    reasons = cohort.excluded.set_index("participant_id")["reason"]
    not_selected = sorted(pid for pid, *_ in MESSY.values() if pid not in selected)
    # A row not selected is never checked: sub-05's missing image is no reason when include leaves it out.
    assert sorted(reasons.index[reasons == "not selected by include"]) == not_selected
    assert len(reasons) == len(MESSY) - len(kept)


def test_include_reads_a_categorical_site_as_written_and_other_numeric_columns_as_numbers(tmp_path):
    frame = pd.DataFrame({"participant_id": ["sub-1", "sub-2", "sub-3"], "diagnosis": ["control", "patient", "patient"],
                          "site": ["01", "1", "02"], "iq": ["100", "120", "n/a"]})
    cohort = Cohort(frame, images="{participant_id}.nii.gz", group=GROUP, attributes={"site": "categorical"},
                    include="site == '01' or iq > 110")
    assert cohort.table["participant_id"].tolist() == ["sub-1", "sub-2"]


@pytest.mark.parametrize(("include", "message"), [
    ("sitee == 'A'", r"""include: "sitee == 'A'" failed: name 'sitee' is not defined \(columns: participant_id"""),
    ("sex > 3", r"include: 'sex > 3' failed: '>' not supported"),
    ("age", r"include: 'age' must give True or False for each row"),
    (["sub-01", "sub-99"], r"include: sub-99 not in the participants table"),
    ("age.to_csv('x.tsv')", r"include: .*only these methods may be called"),
    ("age > @limit", r"include: .*'@' \(a local variable\) is not allowed"),
    ("age.__class__", r"include: .*'__' are not allowed"),
    ("age >", r"include: 'age >' is not a valid query"),
    ([], r"include: an empty list selects no participant"),
])
def test_a_bad_include_is_one_error_naming_the_field(tmp_path, include, message):
    with pytest.raises(CohortError, match=message) as error:
        Cohort.from_yaml(write_cat12_dataset(tmp_path / "bids", include=include))
    assert "\n" not in str(error.value) and "cohort.yaml" in str(error.value)


def test_the_cohort_fingerprint_follows_the_selection(tmp_path):
    from neurocl.embed import cohort_fingerprint

    all_rows = Cohort.from_yaml(write_cat12_dataset(tmp_path / "a", include=None))
    selected = Cohort.from_yaml(write_cat12_dataset(tmp_path / "b"))
    same_rows = Cohort.from_yaml(write_cat12_dataset(tmp_path / "c", include="site in ['A', 'B']"))
    assert cohort_fingerprint(all_rows) != cohort_fingerprint(selected) == cohort_fingerprint(same_rows)


def test_cli_validate_says_what_exclude_would_leave_out_and_what_it_left_out(tmp_path):
    runner = CliRunner()
    refused = runner.invoke(app, ["validate", str(write_cat12_dataset(tmp_path / "a", on_invalid=None))],
                            terminal_width=200)
    assert refused.exit_code == 1
    assert ("with on_invalid: exclude, 4 of 8 rows would be left out (2 diagnosis missing, 1 age missing, "
            "1 image missing), leaving 2 background and 2 target") in refused.output
    excluded = runner.invoke(app, ["validate", str(write_cat12_dataset(tmp_path / "b"))], terminal_width=200)
    assert excluded.exit_code == 0, excluded.output
    assert "left out of the cohort" in excluded.output and "not selected by include" in excluded.output
    assert ("left out 5 of 9 rows: 2 diagnosis missing, 1 age missing, 1 image missing, 1 not selected by include"
            in excluded.output)
    assert "cohort OK: 4 images, 2 background, 2 target" in excluded.output


def test_the_shipped_fmriprep_spec_loads_against_its_layout(tmp_path):
    import yaml

    raw = yaml.safe_load((COHORTS / "fmriprep_derivatives.yaml").read_text())
    (tmp_path / "participants.tsv").write_text(
        "participant_id\tdiagnosis\tage\tsex\tsite\nsub-01\tcontrol\t30\tF\tA\nsub-02\tpatient\t17\tM\tA\n"
        "sub-03\tpatient\t50\tM\tB\n")
    for pid in ("sub-01", "sub-02", "sub-03"):
        anat = tmp_path / "derivatives" / "fmriprep" / pid / "anat"
        anat.mkdir(parents=True)
        volume = np.random.default_rng(int(pid[-1])).random((8, 8, 8)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), anat / f"{pid}_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz")
    cohort = Cohort.from_spec(CohortSpec.model_validate(raw), base_dir=tmp_path)
    assert cohort.table["participant_id"].tolist() == ["sub-01", "sub-03"]  # include: age >= 18
    cohort.check()
