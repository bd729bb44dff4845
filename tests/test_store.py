"""Tests for neurocl.store: preprocessing, the cache and its manifest, incremental and atomic builds, batches."""

from __future__ import annotations

import hashlib
import json
from collections import namedtuple
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import neurocl.store as store_module
import neurocl.store.build as store_build
import neurocl.store.cache as store_cache
import neurocl.store.rowfile as store_rowfile
from neurocl.cohort import Cohort
from neurocl.errors import CohortError, ConfigError
from neurocl.store import PreprocessConfig, VolumeStore, fits_in_budget
from neurocl.store.preprocess import auto_mask_threshold
from conftest import brute_force_otsu

RAW = PreprocessConfig(mask="none", normalise="none", crop_to_mask=False, dtype="float32")


def build(cohort_yaml: Path, cache: Path, config: PreprocessConfig | None = None, **kwargs) -> VolumeStore:
    return VolumeStore.build(Cohort.from_yaml(cohort_yaml), cache, config or PreprocessConfig(), workers=1,
                             progress=False, **kwargs)


def image_path(cohort_yaml: Path, participant: str) -> Path:
    return cohort_yaml.parent / participant / "anat" / f"{participant}_desc-gm.nii.gz"


@pytest.fixture(scope="module")
def default_store(tiny_cohort, tmp_path_factory) -> VolumeStore:
    return build(tiny_cohort, tmp_path_factory.mktemp("cache") / "store")


@pytest.fixture(scope="module")
def raw_store(tiny_cohort, tmp_path_factory) -> VolumeStore:
    return build(tiny_cohort, tmp_path_factory.mktemp("cache") / "raw", RAW)


# ---------------------------------------------------------------- what a build writes


def test_build_writes_one_float16_memmap_with_manifest(default_store, tiny_cohort):
    cohort = Cohort.from_yaml(tiny_cohort)
    volumes = default_store.volumes
    assert isinstance(volumes, np.memmap) and volumes.dtype == np.float16
    assert volumes.shape == (32, 1, *default_store.spatial_shape) and default_store.spatial_dims == 3
    manifest = default_store.manifest
    assert list(manifest.columns) == ["index", "participant_id", "source", "size", "mtime", "sha256", "params"]
    assert manifest["index"].tolist() == list(range(32))
    assert manifest["participant_id"].tolist() == cohort.table["participant_id"].tolist()
    first = Path(manifest["source"][0])
    assert manifest["sha256"][0] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert manifest["size"][0] == first.stat().st_size
    assert manifest["mtime"][0] == pytest.approx(first.stat().st_mtime)
    params = json.loads(manifest["params"][0])
    reference = nib.load(first)
    assert params["orientation"] == "RAS" and params["shape"] == list(reference.shape)
    np.testing.assert_allclose(params["affine"], reference.affine, atol=1e-6)
    assert default_store.record["config"] == PreprocessConfig().model_dump(mode="json")


def test_stored_voxels_are_the_source_voxels_without_normalisation(raw_store):
    assert raw_store.volumes.dtype == np.float32 and raw_store.mask.all()
    for index in (0, 17):
        source = nib.load(raw_store.manifest["source"][index])
        np.testing.assert_allclose(raw_store.volumes[index, 0], source.get_fdata(), atol=1e-5)
        np.testing.assert_allclose(raw_store.affine, source.affine)


def test_crop_to_mask_keeps_the_world_position_of_each_voxel(default_store, raw_store):
    crop = [slice(start, stop) for start, stop in default_store.record["crop"]]
    assert default_store.spatial_shape == tuple(s.stop - s.start for s in crop)
    corner = np.array([s.start for s in crop] + [1])
    np.testing.assert_allclose(default_store.affine[:, 3], raw_store.affine @ corner)
    np.testing.assert_allclose(default_store.affine[:3, :3], raw_store.affine[:3, :3])
    mean = raw_store.volumes[:, 0].mean(axis=0)
    threshold = 0.01 * np.percentile(mean[mean > 0], 99)
    np.testing.assert_array_equal(default_store.mask, (mean > threshold)[tuple(crop)])
    # the synthetic images' near-zero tails outside the head are not brain
    assert not (default_store.mask & (mean[tuple(crop)] < 1e-6)).any()
    image = default_store.to_nifti(default_store.mask.astype(np.float32))
    np.testing.assert_allclose(image.affine, default_store.affine)


def test_zscore_is_taken_inside_the_mask_and_zero_outside(tiny_cohort, tmp_path, raw_store):
    store = build(tiny_cohort, tmp_path / "z", PreprocessConfig(dtype="float32"))
    crop = tuple(slice(start, stop) for start, stop in store.record["crop"])
    for index in (0, 9):
        volume, raw = store.volumes[index, 0], raw_store.volumes[index, 0][crop]
        inside = raw[store.mask].astype(np.float64)
        np.testing.assert_allclose(volume[store.mask], (inside - inside.mean()) / inside.std(), atol=1e-5)
        assert (volume[~store.mask] == 0).all()


def test_minmax_maps_the_mask_to_zero_one(tiny_cohort, tmp_path):
    store = build(tiny_cohort, tmp_path / "m", PreprocessConfig(normalise="minmax", dtype="float32"))
    inside = store.volumes[:, 0][:, store.mask]
    np.testing.assert_allclose(inside.min(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(inside.max(axis=1), 1.0, atol=1e-6)


def test_voxel_size_resamples_onto_a_coarser_grid(tiny_cohort, tmp_path, raw_store):
    store = build(tiny_cohort, tmp_path / "16mm", RAW.model_copy(update={"voxel_size": 16.0}))
    np.testing.assert_allclose(np.linalg.norm(store.affine[:3, :3], axis=0), 16.0)
    assert store.spatial_shape == tuple(int(np.ceil(n / 2)) for n in raw_store.spatial_shape)
    # The outer corner of the field of view stays where it was.
    np.testing.assert_allclose(store.affine @ [-0.5, -0.5, -0.5, 1], raw_store.affine @ [-0.5, -0.5, -0.5, 1])


def test_reference_grid_sets_the_target_grid(tiny_cohort, tmp_path, raw_store):
    reference = nib.Nifti1Image(np.zeros((10, 12, 11), np.float32), np.diag([12.0, 12.0, 12.0, 1.0]))
    nib.save(reference, tmp_path / "reference.nii.gz")
    store = build(tiny_cohort, tmp_path / "ref", RAW.model_copy(update={"reference": tmp_path / "reference.nii.gz"}))
    assert store.spatial_shape == (10, 12, 11)
    np.testing.assert_allclose(store.affine, reference.affine)


# ---------------------------------------------------------------- cache reuse and incremental rebuilds


def test_second_build_reuses_the_cache(tiny_cohort, default_store):
    again = build(tiny_cohort, default_store.cache_dir)
    assert again.rebuilt == [] and again.record == default_store.record
    np.testing.assert_array_equal(again.volumes, default_store.volumes)


def test_only_changed_images_are_rebuilt(tiny_cohort_copy, tmp_path):
    cache = tmp_path / "store"
    # A fixed mask: the automatic one is a cohort-level statistic that any changed image may move,
    # and then every image's normalisation (not its resampling) is legitimately redone.
    config = PreprocessConfig(dtype="float32", mask=tiny_cohort_copy.parent / "brain_mask.nii.gz")
    before = build(tiny_cohort_copy, cache, config)
    old_volumes = np.array(before.volumes)

    touched = image_path(tiny_cohort_copy, "sub-0003")
    os.utime(touched, (touched.stat().st_atime, touched.stat().st_mtime + 100))
    after_touch = build(tiny_cohort_copy, cache, config)
    assert after_touch.rebuilt == []  # same bytes: the content hash decides, not the mtime

    changed = image_path(tiny_cohort_copy, "sub-0005")
    image = nib.load(changed)
    nib.save(nib.Nifti1Image(image.get_fdata().astype(np.float32) ** 2, image.affine), changed)
    after = build(tiny_cohort_copy, cache, config)
    assert after.rebuilt == [4]
    assert after.manifest["sha256"][4] != before.manifest["sha256"][4]
    assert not np.allclose(after.volumes[4], old_volumes[4])
    np.testing.assert_array_equal(np.delete(np.array(after.volumes), 4, axis=0), np.delete(old_volumes, 4, axis=0))
    assert not (cache / before.record["volumes"]).exists()  # the old build's files are removed


def test_an_image_stored_in_another_orientation_is_reoriented_to_ras(tiny_cohort_copy, tmp_path):
    cache = tmp_path / "store"
    before = build(tiny_cohort_copy, cache, RAW)
    old_volume = np.array(before.volumes[1])
    path = image_path(tiny_cohort_copy, "sub-0002")
    image = nib.load(path)
    # The same image written left-to-right (LAS): flipped data, an affine that keeps every voxel's world position.
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, image.shape[0] - 1
    nib.save(nib.Nifti1Image(image.get_fdata()[::-1].astype(np.float32), image.affine @ flip), path)
    assert nib.aff2axcodes(nib.load(path).affine) == ("L", "A", "S")
    after = build(tiny_cohort_copy, cache, RAW)
    assert after.rebuilt == [1]
    np.testing.assert_allclose(after.volumes[1], old_volume, atol=1e-5)


def test_changed_parameters_trigger_a_rebuild(tiny_cohort, tmp_path):
    cache = tmp_path / "store"
    first = build(tiny_cohort, cache)
    renormalised = build(tiny_cohort, cache, PreprocessConfig(normalise="minmax"))
    assert renormalised.rebuilt == []  # resampling unchanged: only normalisation is redone
    assert renormalised.record["volumes"] != first.record["volumes"]
    assert not np.array_equal(renormalised.volumes, first.volumes)
    resampled = build(tiny_cohort, cache, PreprocessConfig(voxel_size=16.0))
    assert resampled.rebuilt == list(range(32)) and resampled.spatial_shape != first.spatial_shape


def test_interrupted_build_leaves_the_previous_cache_valid(tiny_cohort_copy, tmp_path, monkeypatch):
    cache = tmp_path / "store"
    before = build(tiny_cohort_copy, cache, PreprocessConfig(dtype="float32"))
    old_volumes, old_files = np.array(before.volumes), sorted(os.listdir(cache))
    changed = image_path(tiny_cohort_copy, "sub-0007")
    image = nib.load(changed)
    nib.save(nib.Nifti1Image(image.get_fdata().astype(np.float32) * 3, image.affine), changed)

    calls = []
    normalise = store_build._normalise

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt  # a user pressing Ctrl-C half-way through writing the volumes
        return normalise(*args, **kwargs)

    monkeypatch.setattr(store_build, "_normalise", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_cohort_copy, cache, PreprocessConfig(dtype="float32"))
    monkeypatch.setattr(store_build, "_normalise", normalise)

    assert sorted(os.listdir(cache)) == old_files  # no half-written file left behind
    reopened = VolumeStore.open(cache)
    np.testing.assert_array_equal(reopened.volumes, old_volumes)
    rebuilt = build(tiny_cohort_copy, cache, PreprocessConfig(dtype="float32"))
    assert rebuilt.rebuilt == [6]


def test_cache_inside_the_cohort_folder_is_refused(tiny_cohort):
    with pytest.raises(ConfigError, match="inside the cohort's input folder"):
        build(tiny_cohort, tiny_cohort.parent / "cache")


def test_an_unreadable_image_is_named(tiny_cohort_copy, tmp_path):
    broken = image_path(tiny_cohort_copy, "sub-0004")
    broken.write_bytes(b"not a nifti")
    with pytest.raises(CohortError, match="sub-0004.*cannot preprocess"):
        build(tiny_cohort_copy, tmp_path / "store")


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no preprocessed store"):
        VolumeStore.open(tmp_path)


# ---------------------------------------------------------------- batches and residency


def test_batch_reads_float32_rows_in_the_asked_order(default_store):
    batch = default_store.batch([5, 2, 5])
    assert batch.dtype == torch.float32 and batch.device.type == "cpu"
    expected = np.asarray(default_store.volumes)[[5, 2, 5]].astype(np.float32)
    np.testing.assert_array_equal(batch.numpy(), expected)
    with pytest.raises(ConfigError, match="out of range"):
        default_store.batch([32])


def test_batches_prefetch_gives_the_same_batches_in_order(default_store):
    indices = np.array([7, 3, 30, 1, 0, 12, 4])
    seen = list(default_store.batches(indices, batch_size=3))
    assert [chunk.tolist() for chunk, _ in seen] == [[7, 3, 30], [1, 0, 12], [4]]
    for chunk, volumes in seen:
        assert torch.equal(volumes, default_store.batch(chunk))


def test_rows_for_maps_cohort_rows_to_store_indices(default_store, tiny_cohort):
    subset = Cohort.from_yaml(tiny_cohort).select([9, 2, 20])
    assert default_store.rows_for(subset).tolist() == [9, 2, 20]


def test_memory_budget_decides_residency():
    assert fits_in_budget(2 * 2**30, 2 * 2**30) and not fits_in_budget(2 * 2**30 + 1, 2 * 2**30)


def test_cpu_store_reads_from_the_memory_map(default_store):
    assert default_store.to("cpu").resident is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_residency_and_pinned_staging_serve_the_same_batches(default_store):
    expected = default_store.to("cpu").batch([3, 8])
    resident = default_store.to("cuda", memory_budget_gb=1.0)
    assert resident.resident and resident.batch([3, 8]).device.type == "cuda"
    assert torch.equal(resident.batch([3, 8]).cpu(), expected)
    staged = default_store.to("cuda", memory_budget_gb=1e-6)
    assert not staged.resident
    assert torch.equal(staged.batch([3, 8]).cpu(), expected)
    assert torch.equal(next(staged.batches([3, 8], 2))[1].cpu(), expected)
    default_store.to("cpu")


def test_parallel_workers_build_the_same_store(tiny_cohort, tmp_path):
    cohort = Cohort.from_yaml(tiny_cohort).select([0, 1, 2, 3])
    serial = VolumeStore.build(cohort, tmp_path / "serial", RAW, workers=1, progress=False)
    parallel = VolumeStore.build(cohort, tmp_path / "parallel", RAW, workers=2, progress=False)
    assert parallel.rebuilt == [0, 1, 2, 3]
    np.testing.assert_array_equal(parallel.volumes, serial.volumes)


def test_from_array_stores_given_volumes_with_a_manifest(tmp_path):
    volumes = np.random.default_rng(0).normal(size=(3, 1, 4, 5, 6)).astype(np.float32)
    store = VolumeStore.from_array(volumes, tmp_path / "array", dtype="float32")
    np.testing.assert_array_equal(store.volumes, volumes)
    assert store.manifest["source"].tolist() == ["array[0]", "array[1]", "array[2]"]
    assert store.manifest["sha256"][1] == hashlib.sha256(volumes[1].tobytes()).hexdigest()
    assert VolumeStore.open(tmp_path / "array").spatial_shape == (4, 5, 6) and store.mask.all()
    with pytest.raises(ConfigError, match="expected \\(N, 1, \\*spatial\\)"):
        VolumeStore.from_array(volumes[:, 0], tmp_path / "bad")


# ---------------------------------------------------------------- streaming, disk space, prepared stores


def test_row_file_round_trips_rows_and_is_a_plain_npy(tmp_path):
    rows = np.random.default_rng(0).normal(size=(5, 3, 4)).astype(np.float32)
    writer = store_module.RowFile(tmp_path / "rows.npy", np.float32, 5, (3, 4), create=True)
    for index in (3, 0, 4, 1, 2):  # any order, as worker results arrive
        writer.write(index, rows[index])
    writer.close()
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy"), rows)
    reader = store_module.RowFile.open(tmp_path / "rows.npy")
    np.testing.assert_array_equal(reader.read(2), rows[2])


def test_float16_stage_one_keeps_intensities_beyond_the_float16_range(tiny_cohort_copy, tmp_path):
    # Raw scanner intensities can exceed float16's largest value (65504); stage 1 stores each row
    # scaled by its peak, so the float16 store equals the float32 one to float16 precision.
    for image_file in sorted(tiny_cohort_copy.parent.glob("sub-*/anat/*.nii.gz")):
        image = nib.load(image_file)
        nib.save(nib.Nifti1Image(image.get_fdata().astype(np.float32) * 1e6, image.affine), image_file)
    half = build(tiny_cohort_copy, tmp_path / "half")
    full = build(tiny_cohort_copy, tmp_path / "full", PreprocessConfig(dtype="float32"))
    assert half.record["resampled"] != full.record["resampled"] and "scales" in half.record
    np.testing.assert_array_equal(half.mask, full.mask)  # the auto mask comes from unrounded images
    assert np.isfinite(np.asarray(half.volumes, dtype=np.float32)).all()
    np.testing.assert_allclose(np.asarray(half.volumes, dtype=np.float32), full.volumes, atol=0.02)


def test_not_enough_disk_space_is_one_clear_error_before_any_work(tiny_cohort, tmp_path, monkeypatch):
    from neurocl.errors import StoreError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(store_rowfile.shutil, "disk_usage", lambda path: usage(total=10**9, used=0, free=1000))
    with pytest.raises(StoreError, match=r"not enough free disk space.*GB needed"):
        build(tiny_cohort, tmp_path / "store")
    assert not any((tmp_path / "store").glob("*.npy*"))  # nothing half-written left behind


def test_a_prepared_store_is_opened_without_reading_the_images_again(tiny_cohort, tmp_path, monkeypatch):
    first = build(tiny_cohort, tmp_path / "store")

    def no_hashing(path, *args, **kwargs):
        raise AssertionError(f"{path} was hashed again although its size and mtime are unchanged")

    monkeypatch.setattr(store_cache, "sha256_file", no_hashing)
    again = build(tiny_cohort, tmp_path / "store")
    assert again.rebuilt == [] and again.record == first.record


# ---------------------------------------------------------------- the auto mask on noisy images, global normalisation


def test_otsu_threshold_splits_two_populations_where_a_brute_force_search_does():
    from neurocl.store.preprocess import otsu_threshold

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 600), rng.normal(6, 1.5, 200)])
    # The 256-bin histogram puts the cut within one bin of the exact one.
    assert otsu_threshold(values) == pytest.approx(brute_force_otsu(values), abs=np.ptp(values) / 256 * 1.5)
    assert otsu_threshold(np.full(5, 2.0)) == 2.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def add_scanner_noise(cohort_yaml: Path, sigma: float, seed: int = 0) -> None:
    """Magnitude-image noise over the whole field of view: |v + n1 + i n2|, n1, n2 ~ N(0, sigma^2).

    Its mean outside the head is sigma sqrt(pi / 2), about 1.25 sigma, whatever the number of images.
    """
    rng = np.random.default_rng(seed)
    for path in Cohort.from_yaml(cohort_yaml).image_paths:
        image = nib.load(path)
        voxels = np.asarray(image.dataobj, dtype=np.float32)
        noisy = np.hypot(voxels + rng.normal(0, sigma, voxels.shape), rng.normal(0, sigma, voxels.shape))
        nib.save(nib.Nifti1Image(noisy.astype(np.float32), image.affine), path)


def test_auto_mask_of_a_clean_cohort_is_the_fraction_of_the_mean_images_robust_maximum(tiny_cohort, tmp_path):
    store = build(tiny_cohort, tmp_path / "clean", PreprocessConfig(crop_to_mask=False))
    images = [np.asarray(nib.load(path).dataobj, dtype=np.float64) for path in Cohort.from_yaml(tiny_cohort).image_paths]
    mean = np.mean(images, axis=0)
    expected = mean > 0.01 * np.percentile(mean[mean > 0], 99)
    assert dice(store.mask, expected) > 0.995, dice(store.mask, expected)


def test_auto_mask_of_a_cohort_with_scanner_noise_is_the_brain_not_the_field_of_view(tiny_cohort, tiny_cohort_copy, tmp_path):
    clean = build(tiny_cohort, tmp_path / "clean", PreprocessConfig(crop_to_mask=False)).mask
    add_scanner_noise(tiny_cohort_copy, sigma=0.04)
    noisy = build(tiny_cohort_copy, tmp_path / "noisy", PreprocessConfig(crop_to_mask=False)).mask
    brain = nib.load(tiny_cohort.parent / "brain_mask.nii.gz").get_fdata() > 0.5
    # The old cut (1 % of the robust maximum) is below the noise floor: every voxel passed.
    images = [np.asarray(nib.load(path).dataobj, dtype=np.float64) for path in Cohort.from_yaml(tiny_cohort_copy).image_paths]
    mean = np.mean(images, axis=0)
    assert (mean > 0.01 * np.percentile(mean[mean > 0], 99)).mean() > 0.99
    assert noisy.mean() < 0.5 and dice(noisy, brain) > 0.8 and dice(noisy, clean) > 0.8, \
        (noisy.mean(), dice(noisy, brain), dice(noisy, clean))


def test_global_normalisation_is_one_affine_map_that_keeps_differences_between_subjects(tiny_cohort, tmp_path, raw_store):
    store = build(tiny_cohort, tmp_path / "g", PreprocessConfig(normalise="global", dtype="float32"))
    crop = tuple(slice(start, stop) for start, stop in store.record["crop"])
    raw = np.stack([np.asarray(raw_store.volumes[index, 0][crop], dtype=np.float64)[store.mask]
                    for index in range(len(raw_store))])
    expected = (raw - raw.mean()) / raw.std()
    stored = np.stack([store.volumes[index, 0][store.mask] for index in range(len(store))])
    np.testing.assert_allclose(stored, expected, atol=1e-4)
    assert (store.volumes[:, 0][:, ~store.mask] == 0).all()
    # Each subject's mean stays apart (per-image z-scores would make every mean 0).
    assert np.std(stored.mean(axis=1)) > 0.05
    np.testing.assert_allclose(np.corrcoef(stored.mean(axis=1), raw.mean(axis=1))[0, 1], 1.0, atol=1e-6)


def test_auto_mask_of_images_without_background_keeps_them_whole():
    # A frame-filling image (a photograph): its darker half is tissue, not a noise floor to clear.
    rng = np.random.default_rng(4)
    mean = 0.45 + 0.05 * rng.standard_normal((12, 12, 4))
    threshold = auto_mask_threshold(mean, 0.1)
    assert threshold == pytest.approx(0.1 * np.percentile(mean[mean > 0], 99))
    assert (mean > threshold).all()
