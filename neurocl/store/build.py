"""A store's build: a cohort's images through stage 1 (:mod:`~neurocl.store.resample`) and stage 2
(mask, crop, normalise), or arrays already preprocessed, written to new token-named files and
committed by replacing ``store.json``. Callers hold the store's lock (:func:`~neurocl.store.cache.store_lock`)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from neurocl.errors import CohortError, ConfigError
from neurocl.io import atomic_path, write_json, write_tsv
from neurocl.store.cache import (
    STORE_FORMAT, _entries, _known_hashes, _previous_build, _remove_stale, _reusable, _same_order, _with_index,
)
from neurocl.store.grids import _grid_params, ras_grid, resampled_grid
from neurocl.store.preprocess import PreprocessConfig, auto_mask_threshold
from neurocl.store.resample import Source, _resample_all, _resample_image
from neurocl.store.rowfile import RowFile, _new_memmap

if TYPE_CHECKING:
    from neurocl.cohort import Cohort


def build_cohort(cohort: "Cohort", cache_dir: Path, config: PreprocessConfig, workers: int | None,
                 progress: bool) -> tuple[list[int], pd.DataFrame | None]:
    """Preprocess ``cohort`` into ``cache_dir`` (see :meth:`~neurocl.store.VolumeStore.build`).

    Returns the store indices whose stage 1 was recomputed, and the manifest the opened store must
    show instead of the committed one when nothing was rebuilt (the sources may have moved; their
    content is identical), else None.
    """
    shape, affine, source = _target_grid(cohort, config)
    previous = _previous_build(cache_dir)
    entries = _entries(cohort, _grid_params(shape, affine, source.affine), known=_known_hashes(previous))
    reuse = _reusable(entries, previous)
    same_final = previous is not None and previous["record"]["config"] == config.model_dump(mode="json")
    if previous is not None and previous["resampled"].dtype != np.dtype(config.dtype):
        reuse = {}  # another stage-1 precision: recompute rather than mix precisions
    if previous is not None and same_final and len(reuse) == len(entries) and _same_order(previous, entries):
        previous["resampled"].close()
        return [], _with_index(entries)  # sources may have moved; content is identical

    token = uuid.uuid4().hex[:12]
    names = {kind: f"{kind}-{token}.{ext}" for kind, ext in
             (("resampled", "npy"), ("scales", "npy"), ("volumes", "npy"), ("mask", "npy"), ("manifest", "tsv"))}
    rebuilt = [i for i in range(len(entries)) if i not in reuse]
    # Stage 1 is kept in the store's own precision: a float16 store keeps a float16 stage 1
    # (rows scaled by their peak), half the disk of a float32 copy of the whole cohort.
    stage1_dtype = np.dtype(config.dtype)
    scales = np.ones(len(entries)) if stage1_dtype == np.float16 else None
    with _progress(progress) as bar:
        with atomic_path(cache_dir / names["resampled"]) as tmp:
            resampled = RowFile(tmp, stage1_dtype, len(entries), shape, create=True, scales=scales)
            # The auto mask's cohort sum is taken from each image as it arrives, in float64
            # before any rounding to the stored precision: one pass, one volume in memory.
            total = np.zeros(shape, dtype=np.float64)

            def keep(index: int, volume: np.ndarray) -> None:
                resampled.write(index, volume)
                np.add(total, volume, out=total)

            try:
                for new_index, old_index in reuse.items():
                    keep(new_index, previous["resampled"].read(old_index))
                _resample_all(entries, rebuilt, shape, affine, keep, workers, bar, source)
                mask, crop = _final_mask(total / max(1, len(entries)), config, shape, affine, source.two_d)
                crop_affine = affine.copy()
                crop_affine[:3, 3] = affine[:3, :3] @ np.array([s.start for s in crop]) + affine[:3, 3]
                # A 2D cohort was resampled as one-slice volumes: the stored grid drops that axis.
                spatial_crop = crop[:2] + (0,) if source.two_d else crop
                cropped_mask = mask[spatial_crop]
                with atomic_path(cache_dir / names["volumes"]) as tmp_volumes:
                    volumes = RowFile(tmp_volumes, config.dtype, len(entries), (1, *cropped_mask.shape), create=True)
                    try:
                        cohort_stats = _cohort_statistics(resampled, spatial_crop, cropped_mask) \
                            if config.normalise == "global" else None
                        task = bar.add_task("normalising", total=len(entries))
                        for index in range(len(entries)):
                            volume = _normalise(resampled.read(index)[spatial_crop], cropped_mask, config,
                                                entries.iloc[index], cohort_stats)
                            volumes.write(index, volume[None])
                            bar.advance(task)
                    finally:
                        volumes.close()
            finally:
                resampled.close()
                if previous is not None:
                    previous["resampled"].close()
        if scales is not None:
            with atomic_path(cache_dir / names["scales"]) as tmp:
                np.save(tmp, scales)
        with atomic_path(cache_dir / names["mask"]) as tmp:
            np.save(tmp, cropped_mask)
        write_tsv(cache_dir / names["manifest"], _with_index(entries))
        record = {
            "format": STORE_FORMAT,
            **{kind: name for kind, name in names.items() if kind != "scales" or scales is not None},
            "config": config.model_dump(mode="json"),
            "grid": {"shape": list(shape), "affine": affine.tolist()},
            "crop": [[s.start, s.stop] for s in crop],
            "affine": crop_affine.tolist(),
            "spatial_shape": list(cropped_mask.shape),
        }
        write_json(cache_dir / "store.json", record)
    _remove_stale(cache_dir, keep=set(names.values()))
    return rebuilt, None


def write_array(volumes: np.ndarray, cache_dir: Path, affine: np.ndarray | None, dtype: str) -> None:
    """Commit ``(N, 1, *spatial)`` volumes already preprocessed as a store in ``cache_dir``
    (see :meth:`~neurocl.store.VolumeStore.from_array`)."""
    spatial = tuple(int(n) for n in volumes.shape[2:])
    affine = np.eye(4) if affine is None else np.asarray(affine, float)
    config = PreprocessConfig(mask="none", normalise="none", crop_to_mask=False, dtype=dtype)
    token = uuid.uuid4().hex[:12]
    kinds = (("volumes", "npy"), ("mask", "npy"), ("manifest", "tsv"))
    names = {kind: f"{kind}-{token}.{ext}" for kind, ext in kinds}
    with atomic_path(cache_dir / names["volumes"]) as tmp:
        stored = _new_memmap(tmp, np.dtype(dtype), volumes.shape)
        for index in range(len(volumes)):
            stored[index] = volumes[index]
        stored.flush()
        hashes = [hashlib.sha256(np.ascontiguousarray(row).tobytes()).hexdigest() for row in stored]
        del stored
    with atomic_path(cache_dir / names["mask"]) as tmp:
        np.save(tmp, np.ones(spatial, dtype=bool))
    manifest = pd.DataFrame({
        "index": np.arange(len(volumes)),
        "participant_id": [f"sub-{index:04d}" for index in range(len(volumes))],
        "source": [f"array[{index}]" for index in range(len(volumes))],
        "size": [int(np.prod(volumes.shape[1:])) * np.dtype(dtype).itemsize] * len(volumes),
        "mtime": np.nan,
        "sha256": hashes,
        "params": "{}",
    })
    write_tsv(cache_dir / names["manifest"], manifest)
    record = {
        "format": STORE_FORMAT,
        **names,
        "resampled": None,
        "config": config.model_dump(mode="json"),
        "grid": {"shape": list(spatial), "affine": affine.tolist()},
        "crop": [[0, n] for n in spatial],
        "affine": affine.tolist(),
        "spatial_shape": list(spatial),
    }
    write_json(cache_dir / "store.json", record)
    _remove_stale(cache_dir, keep=set(names.values()))


def _progress(enabled: bool):
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _target_grid(cohort: "Cohort", config: PreprocessConfig) -> tuple[tuple[int, ...], np.ndarray, Source]:
    """The 3D grid stage 1 resamples onto (a 2D cohort's has one slice) and how to read the files."""
    spec = cohort.spec
    reference_shape, reference_affine, _ = cohort.reference_grid()
    two_d = len(reference_shape) == 2
    source = Source(spec.kind, spec.grid.matrix() if spec.grid is not None else (None if spec.kind == "nifti" else np.eye(4)),
                    two_d)
    if config.reference is not None:
        reference = nib.load(str(config.reference))
        shape, affine = reference.shape[:3], reference.affine
        if two_d:
            shape = (*reference.shape[:2], 1)
    else:
        shape, affine = (*reference_shape, 1) if two_d else reference_shape, reference_affine
    shape, affine = ras_grid(shape, affine)
    if two_d and shape[2] != 1:
        raise ConfigError(
            f"{cohort.source}: the 2D images' slice axis is not the third axis after reorientation to RAS "
            f"(grid {tuple(shape)}); give the images an affine whose third column is the slice normal"
        )
    if config.voxel_size is not None:
        # In 2D only the in-plane axes are resampled; the slice keeps its thickness.
        slice_thickness = float(np.linalg.norm(np.asarray(affine)[:3, 2]))
        sizes = (config.voxel_size, config.voxel_size, slice_thickness if two_d else config.voxel_size)
        shape, affine = resampled_grid(shape, affine, sizes)
    return tuple(int(s) for s in shape), np.asarray(affine, float), source


def _final_mask(
    mean: np.ndarray, config: PreprocessConfig, shape, affine, two_d: bool = False
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Brain mask on the full grid (``mean``: the cohort's mean resampled image) and the crop
    (slices) that the stored grid keeps."""
    if config.mask == "none":
        mask = np.ones(shape, dtype=bool)
    elif config.mask == "auto":
        mask = mean > auto_mask_threshold(mean, config.mask_threshold)
    else:
        mask = _resample_image(str(config.mask), shape, affine, mode="nearest", source=Source(two_d=two_d)) > 0.5
    if not mask.any():
        raise CohortError(f"the brain mask ({config.mask}) is empty on the target grid {tuple(shape)}")
    if not config.crop_to_mask or config.mask == "none":
        return mask, tuple(slice(0, n) for n in shape)
    nonzero = np.nonzero(mask)
    crop = tuple(
        slice(max(0, int(axis.min()) - config.margin), min(n, int(axis.max()) + 1 + config.margin))
        for axis, n in zip(nonzero, shape)
    )
    return mask, crop


def _cohort_statistics(resampled: RowFile, crop: tuple[slice, ...], mask: np.ndarray) -> tuple[float, float]:
    """Mean and SD of every image's voxels inside ``mask`` together (``normalise: global``), in float64."""
    count, total, squares = 0, 0.0, 0.0
    for index in range(resampled.n_rows):
        inside = resampled.read(index)[crop][mask].astype(np.float64)
        count += inside.size
        total += inside.sum()
        squares += np.square(inside).sum()
    mean = total / max(count, 1)
    return mean, float(np.sqrt(max(squares / max(count, 1) - mean**2, 0.0)))


def _normalise(volume: np.ndarray, mask: np.ndarray, config: PreprocessConfig, entry: pd.Series,
               cohort_stats: tuple[float, float] | None = None) -> np.ndarray:
    """Intensity normalisation with statistics taken inside ``mask`` (this image's, or the cohort's
    ``cohort_stats`` for ``global``); 0 outside it."""
    volume = volume.astype(np.float32, copy=True)
    inside = volume[mask].astype(np.float64)
    if config.normalise == "global":
        mean, std = cohort_stats
        if not np.isfinite(std) or std == 0:
            raise CohortError("every image is the same constant inside the brain mask: nothing to normalise")
        volume = (volume - mean) / std
    elif config.normalise == "zscore":
        std = inside.std()
        if not np.isfinite(std) or std == 0:
            raise CohortError(f"{entry['_label']}: image {entry['source']} is constant inside the brain mask")
        volume = (volume - inside.mean()) / std
    elif config.normalise == "minmax":
        low, high = inside.min(), inside.max()
        if high == low:
            raise CohortError(f"{entry['_label']}: image {entry['source']} is constant inside the brain mask")
        volume = (volume - low) / (high - low)
    volume[~mask] = 0
    return volume.astype(config.dtype)
