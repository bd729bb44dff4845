"""Tests for neurocl.images and the cohorts and stores they open: NumPy arrays, pictures, 2D NIfTI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from neurocl.cohort import Cohort
from neurocl.errors import CohortError
from neurocl.images import GridSpec, image_kind, read_grid, read_voxels, squeeze_ends
from neurocl.store import PreprocessConfig, VolumeStore

RAW = PreprocessConfig(mask="none", normalise="none", crop_to_mask=False, dtype="float32")
MNI_2MM_AFFINE = [[-2.0, 0, 0, 90.0], [0, 2.0, 0, -126.0], [0, 0, 2.0, -72.0], [0, 0, 0, 1]]


def write_cohort(folder: Path, n: int, suffix: str, write, spec_extra: dict | None = None) -> Path:
    """participants.tsv, one image per subject written by ``write(path, index)``, cohort.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"sub-{i:02d}" for i in range(n)]
    pd.DataFrame({"participant_id": ids, "diagnosis": ["control", "patient"] * (n // 2),
                  "age": np.linspace(20, 80, n)}).to_csv(folder / "participants.tsv", sep="\t", index=False)
    (folder / "images").mkdir(exist_ok=True)
    for index, pid in enumerate(ids):
        write(folder / "images" / f"{pid}{suffix}", index)
    spec = {"name": "tiny", "participants": "participants.tsv", "images": "images/{participant_id}" + suffix,
            "group": {"column": "diagnosis", "background": ["control"], "target": ["patient"]},
            "attributes": {"age": "continuous"}, **(spec_extra or {})}
    (folder / "cohort.yaml").write_text(yaml.safe_dump(spec))
    return folder / "cohort.yaml"


def volume(index: int, shape=(9, 10, 11)) -> np.ndarray:
    return np.random.default_rng(index).random(shape).astype(np.float32) + 1.0


# ---------------------------------------------------------------- the module


def test_kind_comes_from_the_template_suffix():
    assert image_kind("{participant_id}.npy") == "array"
    assert image_kind("x/{participant_id}.PNG") == "picture" and image_kind("{participant_id}.jpeg") == "picture"
    assert image_kind("{participant_id}_T1w.nii.gz") == "nifti"


def test_singleton_axes_at_the_ends_are_dropped_but_not_inside():
    assert squeeze_ends((1, 182, 218, 182)) == (182, 218, 182)  # OpenBHB arrays carry a channel axis
    assert squeeze_ends((64, 64, 1)) == (64, 64)
    assert squeeze_ends((64, 1, 64)) == (64, 1, 64)
    assert squeeze_ends((1, 1)) == (1, 1)


def test_grid_spec_needs_exactly_one_of_affine_or_voxel_size():
    with pytest.raises(ValueError, match="exactly one"):
        GridSpec()
    with pytest.raises(ValueError, match="4x4"):
        GridSpec(affine=[[1, 0], [0, 1]])
    np.testing.assert_array_equal(GridSpec(voxel_size=[0.5, 2.0]).matrix(), np.diag([0.5, 2.0, 1.0, 1.0]))
    np.testing.assert_array_equal(GridSpec(voxel_size=1.5).matrix(), np.diag([1.5, 1.5, 1.5, 1.0]))


def test_colour_pictures_become_one_grey_channel_by_luma(tmp_path):
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "x.png")
    grey = read_voxels(tmp_path / "x.png", "picture")
    # ITU-R 601-2 luma, written out: L = R * 299/1000 + G * 587/1000 + B * 114/1000
    assert grey.shape == (4, 6) and np.all(np.abs(grey - (200 * 0.299 + 100 * 0.587 + 50 * 0.114)) <= 1)
    grid = read_grid(tmp_path / "x.png", "picture")
    assert grid.shape == (4, 6) and grid.zooms == (1.0, 1.0)


# ---------------------------------------------------------------- array cohorts (OpenBHB layout)


def test_array_cohort_validates_clean_and_stores_the_arrays_on_the_spec_grid(tmp_path):
    arrays = {}

    def write(path, index):
        arrays[index] = volume(index)
        np.save(path, arrays[index][None])  # (1, X, Y, Z) as OpenBHB writes them

    spec = write_cohort(tmp_path / "bhb", 4, ".npy", write, {"grid": {"affine": MNI_2MM_AFFINE}})
    cohort = Cohort.from_yaml(spec)
    assert cohort.validate() == []
    shape, affine, zooms = cohort.reference_grid()
    assert shape == (9, 10, 11) and zooms == (2.0, 2.0, 2.0)
    store = VolumeStore.build(cohort, tmp_path / "cache", RAW, workers=1, progress=False)
    # The affine flips x (LAS): the stored grid is RAS, so x is reversed and the origin moves to its other end.
    for index in range(4):
        np.testing.assert_allclose(store.volumes[index, 0], arrays[index][::-1], atol=1e-6)
    np.testing.assert_allclose(store.affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
    np.testing.assert_allclose(store.affine[:3, 3], [90.0 - 2.0 * 8, -126.0, -72.0])


def test_array_cohort_without_a_grid_is_refused_naming_the_field(tmp_path):
    spec = write_cohort(tmp_path / "bhb", 2, ".npy", lambda path, index: np.save(path, volume(index)))
    with pytest.raises(CohortError, match=r"cohort.yaml: spec: grid: required for .npy images"):
        Cohort.from_yaml(spec)


def test_array_problems_are_reported_by_row_like_nifti_ones(tmp_path):
    def write(path, index):
        data = volume(index)
        if index == 1:
            data[0, 0, 0] = np.nan
        if index == 2:
            data = volume(index, (9, 10, 12))
        if index == 3:
            data = np.zeros((9, 10, 11, 2), np.float32)
        if index == 4:
            path.write_bytes(b"not an array")
            return
        np.save(path, data)

    spec = write_cohort(tmp_path / "bad", 6, ".npy", write, {"grid": {"voxel_size": 1.0}})
    (tmp_path / "bad" / "images" / "sub-05.npy").unlink()
    problems = {problem.row: problem.problem for problem in Cohort.from_yaml(spec).validate()}
    assert problems[3] == "image has 1 NaN and 0 Inf voxels"
    assert problems[4].startswith("shape (9, 10, 12) differs from the reference grid (9, 10, 11)")
    assert problems[5].startswith("image is 4D with shape (9, 10, 11, 2), expected 2D or 3D")
    assert problems[6].startswith("unreadable image sub-04.npy")
    assert problems[7].startswith("image not found")
    assert 2 not in problems


def test_a_nifti_cohort_refuses_a_grid(tmp_path):
    affine = np.eye(4)
    spec = write_cohort(tmp_path / "n", 2, ".nii.gz",
                        lambda path, index: nib.save(nib.Nifti1Image(volume(index), affine), path),
                        {"grid": {"voxel_size": 1.0}})
    with pytest.raises(CohortError, match="NIfTI headers carry their own grid"):
        Cohort.from_yaml(spec)


# ---------------------------------------------------------------- 2D cohorts


def test_png_cohort_becomes_a_2d_store_of_its_grey_levels(tmp_path):
    pictures = {}

    def write(path, index):
        pictures[index] = np.random.default_rng(index).integers(0, 256, (12, 16), dtype=np.uint8)
        Image.fromarray(pictures[index]).save(path)

    spec = write_cohort(tmp_path / "xray", 4, ".png", write, {"grid": {"voxel_size": 0.5}})
    cohort = Cohort.from_yaml(spec)
    assert cohort.validate() == [] and cohort.spatial_dims == 2
    store = VolumeStore.build(cohort, tmp_path / "cache", RAW, workers=1, progress=False)
    assert store.volumes.shape == (4, 1, 12, 16) and store.spatial_dims == 2 and store.mask.shape == (12, 16)
    for index in range(4):
        np.testing.assert_allclose(store.volumes[index, 0], pictures[index].astype(np.float32), atol=1e-4)
    np.testing.assert_allclose(np.diag(store.affine)[:2], [0.5, 0.5])
    assert store.to_nifti(store.volumes[0, 0]).shape == (12, 16)


def test_2d_nifti_cohort_is_masked_cropped_and_normalised_in_2d(tmp_path):
    def write(path, index):
        image = np.zeros((20, 24), np.float32)
        image[4:16, 6:18] = volume(index, (12, 12))[...]
        nib.save(nib.Nifti1Image(image[..., None], np.diag([1.0, 1.0, 3.0, 1.0])), path)  # (X, Y, 1): a slice

    spec = write_cohort(tmp_path / "slices", 4, ".nii.gz", write)
    cohort = Cohort.from_yaml(spec)
    assert cohort.validate() == [] and cohort.reference_grid()[0] == (20, 24)
    store = VolumeStore.build(cohort, tmp_path / "cache", PreprocessConfig(margin=1), workers=1, progress=False)
    assert store.spatial_shape == (14, 14)  # the 12x12 square plus a margin of 1
    inside = store.volumes[0, 0][store.mask].astype(np.float64)
    assert abs(inside.mean()) < 1e-2 and abs(inside.std() - 1) < 1e-2
    np.testing.assert_allclose(store.affine[:3, 3], [3.0, 5.0, 0.0])
