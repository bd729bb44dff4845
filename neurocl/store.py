"""Preprocess a cohort once into one memory-mappable array: the :class:`VolumeStore`.

Every image goes through the same MONAI transforms (load with nibabel, reorient to
RAS, resample onto one target grid; ``.npy`` arrays, pictures and 2D images are read by
:mod:`neurocl.images` and resampled the same way, a 2D image as a one-slice volume), then the cohort is masked, cropped to the mask
and intensity-normalised. The result is one contiguous ``(N, 1, *spatial)`` array on
disk (``float16`` by default) that training reads with no per-sample CPU work: it is
moved to the GPU once when it fits (:meth:`VolumeStore.to`), otherwise batches are
staged through pinned memory with the next batch prefetched.

Cache layout (``cache_dir``, chosen by the caller; never inside a cohort's folders)::

    store.json                 the commit record: names the files below, config, grids
    .store.lock                held (an OS file lock) by the one process building here
    resampled-<token>.npy      (N, *grid) images on the target grid (stage 1), in the store's dtype
    scales-<token>.npy         (N,) each float16 stage-1 row's scale (its peak |value|)
    volumes-<token>.npy        (N, 1, *spatial) masked, cropped, normalised (stage 2)
    mask-<token>.npy           (*spatial) bool brain mask on the stored grid
    manifest-<token>.tsv       index, participant_id, [session_id], source, size, mtime,
                               sha256, params (one row per image)

Stage 1 (load + resample, the expensive part) is cached per image and recomputed only
for images whose content (sha256 of the file bytes) or resampling parameters changed.
Stage 2 depends on the whole cohort (the automatic mask is the cohort mean) and is
recomputed from stage 1 whenever anything changed. A build writes new token-named
files and commits them by replacing ``store.json`` atomically, so an interrupted build
leaves the previous cache intact.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from neurocl.cohort import key_columns
from neurocl.errors import CohortError, ConfigError, StoreError
from neurocl.images import ImageKind, as_volume, read_voxels
from neurocl.io import atomic_path, preallocate, read_tsv, write_json, write_tsv

if TYPE_CHECKING:
    import nibabel as nib
    import torch

    from neurocl.cohort import Cohort

STORE_FORMAT = 1
PARALLEL_MIN_IMAGES = 64  # below this many images to preprocess, worker start-up costs more than it saves


class PreprocessConfig(BaseModel):
    """How images become the stored array.

    Parameters
    ----------
    voxel_size : float or None
        Isotropic voxel size in mm of the stored grid. ``None`` keeps the reference grid's voxels.
    reference : Path or None
        Image whose grid (shape, affine) is the target. ``None``: the cohort's first readable image.
    mask : "auto", "none" or Path
        Brain mask. ``auto``: voxels whose cohort mean exceeds ``mask_threshold`` times the cohort
        mean's 99th percentile (after resampling); a path: a mask image (resampled with nearest
        neighbour, > 0.5 is brain); ``none``: every voxel.
    mask_threshold : float
        ``auto`` mask: fraction of the cohort mean's robust maximum below which a voxel is
        background. A threshold rather than ``> 0`` because resampled and modulated images carry
        tiny positive values (1e-13 and up) far outside the head, which would make the mask the
        whole field of view and put the background into every z-score.
    normalise : "zscore", "minmax" or "none"
        Per-image intensity normalisation computed inside the mask; voxels outside the mask are 0.
    dtype : "float16" or "float32"
        Storage type of the final array (float16 halves disk and GPU memory).
    crop_to_mask : bool
        Crop the grid to the mask's bounding box plus ``margin`` voxels (the affine follows).
    margin : int
        Voxels kept around the mask's bounding box when cropping.
    """

    model_config = ConfigDict(extra="forbid")

    voxel_size: float | None = Field(default=None, gt=0, le=20)
    reference: Path | None = None
    mask: Literal["auto", "none"] | Path = "auto"
    mask_threshold: float = Field(default=0.01, ge=0.0, lt=1.0)
    normalise: Literal["zscore", "minmax", "none"] = "zscore"
    dtype: Literal["float16", "float32"] = "float16"
    crop_to_mask: bool = True
    margin: int = Field(default=2, ge=0)

    @field_validator("reference")
    @classmethod
    def _reference_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"reference image {value} does not exist")
        return value

    @field_validator("mask")
    @classmethod
    def _mask_exists(cls, value):
        if isinstance(value, Path) and not value.is_file():
            raise ValueError(f"mask image {value} does not exist")
        return value


# ---------------------------------------------------------------- grids


def ras_grid(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of the same grid with its axes reordered/flipped to RAS+.

    This is the grid MONAI's ``Orientation(axcodes="RAS")`` produces, so a voxel keeps its
    world coordinate: only array axes are permuted and flipped.
    """
    import nibabel.orientations as nio

    shape = tuple(int(s) for s in shape[:3])
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))
    new_affine = np.asarray(affine, float) @ nio.inv_ornt_aff(transform, shape)
    new_shape = tuple(shape[int(axis)] for axis in np.argsort(transform[:, 0]))
    return new_shape, new_affine


def resampled_grid(
    shape: Sequence[int], affine: np.ndarray, voxel_size: float | Sequence[float]
) -> tuple[tuple[int, ...], np.ndarray]:
    """A grid of ``voxel_size`` mm (one value: isotropic; or one per axis) covering the same field
    of view as ``(shape, affine)``.

    The axis directions are kept; the outer corner of voxel 0 stays at the same world position,
    and the new grid extends far enough to cover the old field of view.
    """
    affine = np.asarray(affine, float)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    directions = affine[:3, :3] / zooms
    sizes = np.broadcast_to(np.asarray(voxel_size, float), (3,))
    new_shape = tuple(int(np.ceil(n * z / v - 1e-6)) for n, z, v in zip(shape, zooms, sizes))
    corner = affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    new_affine = np.eye(4)
    new_affine[:3, :3] = directions * sizes
    new_affine[:3, 3] = corner[:3] + new_affine[:3, :3] @ np.full(3, 0.5)
    return new_shape, new_affine


def _grid_params(shape: Sequence[int], affine: np.ndarray, source_affine: np.ndarray | None = None) -> str:
    """Stage-1 parameters of an entry, as the canonical JSON string kept in the manifest.

    ``source_affine`` is the spec's grid of array/picture images: their files do not carry it,
    so a changed spec must change the parameters (a NIfTI's header is in its sha256).
    """
    params = {
        "orientation": "RAS",
        "interpolation": "bilinear",
        "shape": [int(s) for s in shape],
        "affine": np.round(np.asarray(affine, float), 6).tolist(),
    }
    if source_affine is not None:
        params["source_affine"] = np.round(np.asarray(source_affine, float), 6).tolist()
    return json.dumps(params, separators=(",", ":"))


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- stage 1: MONAI load + resample


class Source(NamedTuple):
    """How stage 1 reads a cohort's files: their kind, the spec's affine for arrays and pictures
    (``None`` for NIfTI) and whether the cohort is 2D (read as one-slice volumes)."""

    kind: ImageKind = "nifti"
    affine: np.ndarray | None = None
    two_d: bool = False


def _load_volume(path: str, source: Source):
    """One image as a channel-first MetaTensor with its affine: MONAI's LoadImage for 3D NIfTI,
    :mod:`neurocl.images` otherwise (a 2D image becomes a one-slice volume)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import EnsureChannelFirst, LoadImage

    if source.kind == "nifti" and not source.two_d:
        image = EnsureChannelFirst()(LoadImage(reader="NibabelReader", image_only=True, dtype=np.float32)(path))
        if image.shape[0] != 1 or image.ndim != 4:
            raise ValueError(f"expected a 3D image, got shape {tuple(image.shape[1:]) or tuple(image.shape)}")
        return image
    data = read_voxels(Path(path), source.kind)
    if data.ndim != (2 if source.two_d else 3):
        raise ValueError(f"expected a {'2D' if source.two_d else '3D'} image, got shape {data.shape}")
    if source.kind == "nifti":
        import nibabel as nib

        affine = np.asarray(nib.load(path).affine, float)
    else:
        affine = source.affine
    volume = torch.from_numpy(np.ascontiguousarray(as_volume(data), dtype=np.float32))[None]
    return MetaTensor(volume, affine=torch.as_tensor(affine, dtype=torch.float64))


def _resample_image(
    path: str, shape: Sequence[int], affine: np.ndarray, mode: str = "bilinear", source: Source = Source()
) -> np.ndarray:
    """Load one image, reorient to RAS and resample onto ``(shape, affine)`` with MONAI.

    Returns a float32 array of ``shape``; multi-volume (4D) images are refused since a store
    holds one channel per image.
    """
    import torch
    from monai.transforms import Orientation, SpatialResample

    image = _load_volume(path, source)
    # The labels are MONAI's default, given explicitly to silence its FutureWarning about that default.
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    resampler = SpatialResample(mode=mode, padding_mode="zeros", dtype=np.float32)
    out = resampler(image, dst_affine=torch.as_tensor(affine, dtype=torch.float64), spatial_size=tuple(shape))
    return np.asarray(out.detach().cpu().numpy()[0], dtype=np.float32)


def _start_method() -> str:
    """``fork`` on Linux, as torch's DataLoader does: a worker starts in milliseconds instead of
    spending seconds re-importing torch and MONAI. ``spawn`` once CUDA is initialised (a forked
    child cannot use it and inherits its state) and on other systems."""
    import sys

    import torch

    if sys.platform.startswith("linux") and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def _single_threaded() -> None:
    """Worker-process start: one thread each, so that N workers do not oversubscribe N cores."""
    import torch

    torch.set_num_threads(1)


def _preprocess_entry(task: tuple[int, str, str, tuple[int, ...], np.ndarray, Source]) -> tuple[int, np.ndarray]:
    """Worker-process body: resample one image; errors come back as a message naming the image."""
    index, label, path, shape, affine, source = task
    try:
        return index, _resample_image(path, shape, affine, source=source)
    except Exception as error:  # any reader/transform failure is reported with the image it concerns
        raise CohortError(f"{label}: cannot preprocess image {path}: {error}") from None


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


# ---------------------------------------------------------------- the store


class VolumeStore:
    """The preprocessed cohort: one ``(N, 1, *spatial)`` array, its grid and its manifest.

    Build with :meth:`build` (reuses an existing cache) or open a built one with :meth:`open`.

    Attributes
    ----------
    volumes : np.memmap
        ``(N, 1, *spatial)`` images in the configured dtype, row ``i`` = manifest index ``i``.
    affine : np.ndarray
        ``(4, 4)`` voxel-to-world (RAS mm) affine of the stored (resampled, cropped) grid.
    mask : np.ndarray
        ``(*spatial)`` bool brain mask on the stored grid.
    manifest : pandas.DataFrame
        ``index, participant_id, [session_id], source, size, mtime, sha256, params``.
    config : PreprocessConfig
    rebuilt : list[int]
        Store indices whose stage 1 was recomputed by the last :meth:`build` (empty after
        :meth:`open` or a build that reused everything).
    device : torch.device
        Where :meth:`batch` returns tensors (``cpu`` until :meth:`to`).
    """

    def __init__(self, cache_dir: str | os.PathLike):
        import torch

        self.cache_dir = Path(cache_dir)
        record_path = self.cache_dir / "store.json"
        if not record_path.is_file():
            raise ConfigError(f"{self.cache_dir}: no preprocessed store here (store.json missing); build one first")
        record = json.loads(record_path.read_text())
        if record.get("format") != STORE_FORMAT:
            raise ConfigError(f"{record_path}: store format {record.get('format')!r}, expected {STORE_FORMAT}")
        self.record = record
        self.config = PreprocessConfig.model_validate(record["config"])
        self.volumes = np.load(self.cache_dir / record["volumes"], mmap_mode="r")
        self.mask = np.load(self.cache_dir / record["mask"])
        self.affine = np.asarray(record["affine"], float)
        self.manifest = read_tsv(self.cache_dir / record["manifest"])
        self.rebuilt: list[int] = []
        self.device = torch.device("cpu")
        self._resident: torch.Tensor | None = None

    # ------------------------------------------------------------ construction

    @classmethod
    def open(cls, cache_dir: str | os.PathLike) -> "VolumeStore":
        """Open a store built earlier in ``cache_dir``."""
        return cls(cache_dir)

    @classmethod
    def build(
        cls,
        cohort: "Cohort",
        cache_dir: str | os.PathLike,
        config: PreprocessConfig | None = None,
        workers: int | None = None,
        progress: bool = True,
    ) -> "VolumeStore":
        """Preprocess ``cohort`` into ``cache_dir``, reusing whatever an earlier build there still holds.

        Parameters
        ----------
        cohort : Cohort
            The images, one store entry per cohort row (same order).
        cache_dir : path
            Where the cache lives (a run directory's ``store/`` or a shared cache). Refused when it
            lies inside the cohort's folders, which are input only.
        config : PreprocessConfig
        workers : int or None
            Worker processes for stage 1. ``None``: one per core (at most 16) when at least
            ``PARALLEL_MIN_IMAGES`` images need preprocessing, else this process (starting
            workers costs more than a few small images take). ``1`` works in this process.
        progress : bool
            Show a progress bar.
        """
        config = config or PreprocessConfig()
        cache_dir = Path(cache_dir).resolve()
        _refuse_input_folder(cache_dir, cohort)
        with store_lock(cache_dir, progress):
            return cls._build(cohort, cache_dir, config, workers, progress)

    @classmethod
    def _build(cls, cohort: "Cohort", cache_dir: Path, config: PreprocessConfig, workers: int | None,
               progress: bool) -> "VolumeStore":
        """The body of :meth:`build`, run while this process holds the store's lock."""
        shape, affine, source = _target_grid(cohort, config)
        previous = _previous_build(cache_dir)
        entries = _entries(cohort, _grid_params(shape, affine, source.affine), known=_known_hashes(previous))
        reuse = _reusable(entries, previous)
        same_final = previous is not None and previous["record"]["config"] == config.model_dump(mode="json")
        if previous is not None and previous["resampled"].dtype != np.dtype(config.dtype):
            reuse = {}  # another stage-1 precision: recompute rather than mix precisions
        if previous is not None and same_final and len(reuse) == len(entries) and _same_order(previous, entries):
            previous["resampled"].close()
            store = cls(cache_dir)
            store.manifest = _with_index(entries)  # sources may have moved; content is identical
            return store

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
                            task = bar.add_task("normalising", total=len(entries))
                            for index in range(len(entries)):
                                volume = _normalise(resampled.read(index)[spatial_crop], cropped_mask, config,
                                                    entries.iloc[index])
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
        store = cls(cache_dir)
        store.rebuilt = rebuilt
        return store

    @classmethod
    def from_array(
        cls,
        volumes: np.ndarray,
        cache_dir: str | os.PathLike,
        affine: np.ndarray | None = None,
        dtype: Literal["float16", "float32"] = "float16",
    ) -> "VolumeStore":
        """A store of volumes that are already preprocessed (``(N, 1, *spatial)``), e.g. synthetic
        benchmark data or arrays made by another pipeline; no mask (every voxel is kept).

        The manifest names each entry ``array[i]`` with the sha256 of its bytes; ``affine``
        defaults to 1 mm voxels at the origin. Written and committed like :meth:`build`.
        """
        volumes = np.asarray(volumes)
        if volumes.ndim < 4 or volumes.shape[1] != 1:
            raise ConfigError(f"from_array: expected (N, 1, *spatial) volumes, got shape {volumes.shape}")
        cache_dir = Path(cache_dir).resolve()
        with store_lock(cache_dir, progress=False):
            return cls._from_array(volumes, cache_dir, affine, dtype)

    @classmethod
    def _from_array(cls, volumes: np.ndarray, cache_dir: Path, affine: np.ndarray | None, dtype: str) -> "VolumeStore":
        """The body of :meth:`from_array`, run while this process holds the store's lock."""
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
        return cls(cache_dir)

    # ------------------------------------------------------------ description

    def __len__(self) -> int:
        return int(self.volumes.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.volumes.shape[2:])

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole store once on a device in float16."""
        return int(np.prod(self.volumes.shape)) * 2

    def verify(self) -> None:
        """Read every stored volume once (one at a time) and check it is whole and finite.

        Raises
        ------
        StoreError
            Naming the first bad row (its participant) and the store folder.
        """
        if len(self.manifest) != len(self):
            raise StoreError(f"{self.cache_dir}: the manifest lists {len(self.manifest)} images, the store holds {len(self)}")
        rows = RowFile.open(self.cache_dir / self.record["volumes"])
        try:
            for index in range(len(self)):
                if not np.isfinite(rows.read(index)).all():
                    who = self.manifest["participant_id"].iloc[index]
                    raise StoreError(f"{self.cache_dir}: stored volume {index} ({who}) holds non-finite values; "
                                     "rebuild the store (delete the folder)")
        finally:
            rows.close()

    def __repr__(self) -> str:
        return (f"VolumeStore({str(self.cache_dir)!r}, n={len(self)}, spatial_shape={self.spatial_shape}, "
                f"dtype={self.volumes.dtype}, device={self.device}, resident={self.resident})")

    @property
    def resident(self) -> bool:
        """Whether the whole store sits on :attr:`device` (otherwise batches are read and staged)."""
        return self._resident is not None

    @property
    def resident_volumes(self) -> "torch.Tensor | None":
        """The float16 ``(N, 1, *spatial)`` copy on :attr:`device`, or None when batches are read from the memory map."""
        return self._resident

    # ------------------------------------------------------------ residency and batches

    def to(self, device: "str | torch.device", memory_budget_gb: float | None = None) -> "VolumeStore":
        """Serve batches on ``device``.

        On a GPU the whole store is copied once, in float16, when it fits in ``memory_budget_gb``
        (default: half of the device's free memory); otherwise each batch is read from the memory
        map into pinned memory and copied asynchronously. On the CPU batches are read from the
        memory map (the operating system's page cache keeps hot data in RAM).
        """
        import torch

        device = torch.device(device)
        self.device = device
        self._resident = None
        if device.type == "cpu":
            return self
        if memory_budget_gb is None:
            free, _ = torch.cuda.mem_get_info(device) if device.type == "cuda" else (self.nbytes, None)
            budget = free // 2
        else:
            budget = memory_budget_gb * 2**30
        if fits_in_budget(self.nbytes, budget):
            resident = torch.empty(self.volumes.shape, dtype=torch.float16, device=device)
            chunk = max(1, (256 << 20) // max(1, self.nbytes // len(self)))  # ~256 MiB per host->device copy
            for start in range(0, len(self), chunk):
                part = np.asarray(self.volumes[start:start + chunk], dtype=np.float16)
                resident[start:start + chunk].copy_(torch.from_numpy(part))
            self._resident = resident
        return self

    def batch(self, indices: "Sequence[int] | np.ndarray | torch.Tensor") -> "torch.Tensor":
        """Volumes ``indices`` as a float32 ``(B, 1, *spatial)`` tensor on :attr:`device`."""
        import torch

        index_array = self._check_indices(indices)
        if self._resident is not None:
            return self._resident[torch.as_tensor(index_array, device=self.device)].float()
        host = torch.from_numpy(self._read(index_array))
        if self.device.type == "cpu":
            return host.float()
        return host.pin_memory().to(self.device, non_blocking=True).float()

    def batches(
        self, indices: "Sequence[int] | np.ndarray", batch_size: int
    ) -> Iterator[tuple[np.ndarray, "torch.Tensor"]]:
        """Yield ``(batch_indices, volumes)`` over ``indices`` in order; the next batch is loaded
        in a background thread while the caller works on the current one."""
        index_array = self._check_indices(indices)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        chunks = [index_array[start:start + batch_size] for start in range(0, len(index_array), batch_size)]
        if not chunks:
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.batch, chunks[0])
            for number, chunk in enumerate(chunks):
                current = pending.result()
                if number + 1 < len(chunks):
                    pending = pool.submit(self.batch, chunks[number + 1])
                yield chunk, current

    def _read(self, index_array: np.ndarray) -> np.ndarray:
        # Reading rows in ascending order keeps memory-map access sequential on disk.
        order = np.argsort(index_array, kind="stable")
        rows = np.empty((len(index_array), *self.volumes.shape[1:]), dtype=self.volumes.dtype)
        rows[order] = self.volumes[index_array[order]]
        return rows

    def _check_indices(self, indices) -> np.ndarray:
        import torch

        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        index_array = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = index_array[(index_array < 0) | (index_array >= len(self))]
        if bad.size:
            raise ConfigError(f"store index {int(bad[0])} out of range: the store holds {len(self)} volumes")
        return index_array

    # ------------------------------------------------------------ mapping back

    def rows_for(self, cohort: "Cohort") -> np.ndarray:
        """Store index of each row of ``cohort`` (matched on participant_id and session_id)."""
        keys = key_columns(self.manifest)
        cohort_keys = key_columns(cohort.table)
        if keys != cohort_keys:
            raise CohortError(f"cohort keys {cohort_keys} differ from the store's {keys} ({self.cache_dir})")
        lookup = {tuple(row): int(index) for index, *row in self.manifest[["index", *keys]].itertuples(index=False)}
        rows = []
        missing = []
        for row in cohort.table[keys].itertuples(index=False):
            key = tuple(row)
            if key in lookup:
                rows.append(lookup[key])
            else:
                missing.append("/".join(str(part) for part in key))
        if missing:
            raise CohortError(
                f"{len(missing)} cohort image(s) are not in the store {self.cache_dir}: {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else "")
            )
        return np.asarray(rows, dtype=np.int64)

    def to_nifti(self, volume) -> "nib.Nifti1Image":
        """A ``(*spatial)`` array (or tensor) on the stored grid as a NIfTI image with the store's affine."""
        import nibabel as nib

        if hasattr(volume, "detach"):
            volume = volume.detach().float().cpu().numpy()
        volume = np.asarray(volume)
        if volume.shape != self.spatial_shape:
            raise ConfigError(f"to_nifti: volume shape {volume.shape} differs from the store's {self.spatial_shape}")
        if volume.dtype == np.float16 or volume.dtype == np.float64:
            volume = volume.astype(np.float32)
        if volume.dtype == bool:
            volume = volume.astype(np.uint8)
        image = nib.Nifti1Image(volume, self.affine)
        image.set_qform(self.affine, code=1)
        image.set_sform(self.affine, code=1)
        return image


LOCK_NAME = ".store.lock"


@contextlib.contextmanager
def store_lock(cache_dir: Path, progress: bool = True) -> Iterator[None]:
    """Hold the store folder's lock (an OS file lock: released by the kernel if the process dies).

    Two runs sharing one store would otherwise interleave their builds, one removing the
    other's temporary files as stale. The second run waits, then finds the first one's build
    and reuses it. The folder is created here; one that cannot be (read-only, a file in the
    way) is a one-line error naming it.
    """
    from filelock import FileLock, Timeout

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cache_dir / LOCK_NAME))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if progress:
                _stderr().print(f"waiting for another process building the store in {cache_dir} ...", highlight=False)
            lock.acquire()
    except FileExistsError:
        raise StoreError(f"{cache_dir}: cannot hold the store: a file (not a folder) is in the way") from None
    except OSError as error:
        raise StoreError(f"{cache_dir}: cannot write the store here ({error.strerror or error})") from None
    try:
        yield
    finally:
        lock.release()


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


def _new_memmap(path: Path, dtype, shape: Sequence[int]) -> np.memmap:
    """A ``.npy`` memory map whose disk blocks are reserved before any write (see :func:`preallocate`)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    try:
        preallocate(path, os.path.getsize(path))
    except BaseException:
        del array
        raise
    return array


def fits_in_budget(nbytes: int, budget_bytes: float) -> bool:
    """Whether a store of ``nbytes`` (float16) goes to the device whole under ``budget_bytes``."""
    return nbytes <= budget_bytes


# ---------------------------------------------------------------- build helpers


def _refuse_input_folder(cache_dir: Path, cohort: "Cohort") -> None:
    """Refuse a cache inside the folder that holds the cohort's images (inputs are never written)."""
    root = cohort.input_folder()
    if root is not None and (cache_dir == root or root in cache_dir.parents):
        raise ConfigError(f"cache_dir {cache_dir} lies inside the cohort's input folder {root}; choose another")


def _target_grid(cohort: "Cohort", config: PreprocessConfig) -> tuple[tuple[int, ...], np.ndarray, Source]:
    """The 3D grid stage 1 resamples onto (a 2D cohort's has one slice) and how to read the files."""
    import nibabel as nib

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


def _known_hashes(previous: dict | None) -> dict[tuple[str, int, float], str]:
    """(source, size, mtime) -> sha256 of the files the previous build hashed."""
    if previous is None:
        return {}
    old = previous["manifest"]
    return {(str(row.source), int(row.size), float(row.mtime)): str(row.sha256)
            for row in old.itertuples(index=False) if isinstance(row.sha256, str)}


def _entries(cohort: "Cohort", params: str, known: dict | None = None) -> pd.DataFrame:
    """One manifest row per cohort row: keys, source, size, mtime, sha256, params.

    A file whose path, size and modification time match the previous build's keeps that build's
    hash (as make and rsync decide): a training job that opens a store prepared beforehand reads
    no image again. Any other file is hashed.
    """
    known = known or {}
    table = cohort.table
    keys = key_columns(table)
    rows = []
    for position, (_, row) in enumerate(table.iterrows()):
        source = Path(row["image"])
        label = f"row {row['row']} ({row['participant_id']})" if "row" in table.columns else str(row["participant_id"])
        if not source.is_file():
            raise CohortError(f"{label}: image {source} does not exist")
        status = source.stat()
        rows.append({
            **{key: row[key] for key in keys},
            "source": str(source),
            "size": int(status.st_size),
            "mtime": float(status.st_mtime),
            "sha256": known.get((str(source), int(status.st_size), float(status.st_mtime))) or sha256_file(source),
            "params": params,
            "_label": label,
        })
    return pd.DataFrame(rows)


def _with_index(entries: pd.DataFrame) -> pd.DataFrame:
    table = entries.drop(columns=["_label"], errors="ignore").copy()
    table.insert(0, "index", np.arange(len(table)))
    return table


def _previous_build(cache_dir: Path) -> dict | None:
    """The committed build in ``cache_dir`` (record, manifest, stage-1 memmap), or None."""
    record_path = cache_dir / "store.json"
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        if record.get("format") != STORE_FORMAT:
            return None
        return {
            "record": record,
            "manifest": read_tsv(cache_dir / record["manifest"]),
            "resampled": RowFile.open(
                cache_dir / record["resampled"],
                scales=np.load(cache_dir / record["scales"]) if "scales" in record else None,
            ),
        }
    except (OSError, ValueError, KeyError, TypeError, StoreError):
        return None  # an unreadable cache (or one made by from_array) is rebuilt from scratch, never trusted


def _reusable(entries: pd.DataFrame, previous: dict | None) -> dict[int, int]:
    """New index -> old index of entries whose content hash and stage-1 parameters are unchanged."""
    if previous is None:
        return {}
    keys = key_columns(entries)
    old = previous["manifest"]
    if any(key not in old.columns for key in keys):
        return {}
    old_lookup = {
        (tuple(str(v) for v in row[keys]), row["sha256"], row["params"]): int(row["index"]) for _, row in old.iterrows()
    }
    reuse = {}
    for new_index, row in entries.iterrows():
        key = (tuple(str(v) for v in row[keys]), row["sha256"], row["params"])
        if key in old_lookup:
            reuse[int(new_index)] = old_lookup[key]
    return reuse


def _same_order(previous: dict, entries: pd.DataFrame) -> bool:
    keys = key_columns(entries)
    old = previous["manifest"]
    return len(old) == len(entries) and all(
        old[key].astype(str).tolist() == entries[key].astype(str).tolist() for key in keys
    )


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a C-ordered ``.npy`` file."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = reader(handle)
        if fortran_order:
            raise ValueError(f"{path}: Fortran-ordered array")
        return tuple(shape), np.dtype(dtype), handle.tell()


class RowFile:
    """An ``.npy`` file of ``(N, *row_shape)`` rows written and read one row at a time with plain file I/O.

    No memory map: a build's resident memory stays about one row per worker whatever N is
    (a mapped file's pages count as the process's memory until the kernel writes them back),
    and the file is preallocated after a free-space check, so a full disk is a clear error
    naming the folder before any work instead of a SIGBUS at a later page fault.

    With ``scales`` (an ``(N,)`` float64 array the caller keeps) each row is stored divided by its
    largest absolute value, so that a float16 file holds raw scanner intensities (which may exceed
    float16's 65504) with float16's relative precision; :meth:`read` multiplies it back.
    """

    def __init__(self, path: Path, dtype, n_rows: int, row_shape: Sequence[int], create: bool = False,
                 scales: np.ndarray | None = None):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(int(n) for n in row_shape)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.n_rows = int(n_rows)
        self.scales = scales
        if create:
            self._create()
        else:
            shape, dtype, self.offset = _npy_header(self.path)
            if tuple(shape) != (self.n_rows, *self.row_shape) or np.dtype(dtype) != self.dtype:
                raise ValueError(f"{self.path}: holds {shape} {dtype}, expected {(self.n_rows, *self.row_shape)} {self.dtype}")
        self._handle = open(self.path, "r+b" if create else "rb")

    @classmethod
    def open(cls, path: Path, scales: np.ndarray | None = None) -> "RowFile":
        """An existing ``.npy`` file (e.g. a previous build's stage 1) for reading rows."""
        shape, dtype, _ = _npy_header(path)
        return cls(path, dtype, shape[0], shape[1:], scales=scales)

    def _create(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.n_rows, *self.row_shape)}
        total = self.row_bytes * self.n_rows
        free = shutil.disk_usage(self.path.parent).free
        if total > free:
            raise StoreError(f"{self.path.parent}: not enough free disk space for the store: "
                             f"{total / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free")
        with open(self.path, "wb") as handle:
            np.lib.format.write_array_header_2_0(handle, header)
            self.offset = handle.tell()
            try:
                os.posix_fallocate(handle.fileno(), 0, self.offset + total)
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise StoreError(f"{self.path.parent}: disk full while reserving {total / 1e9:.2f} GB "
                                     "for the store") from None
                handle.truncate(self.offset + total)  # a file system without fallocate: sparse file

    def write(self, index: int, row: np.ndarray) -> None:
        if self.scales is not None:
            row = np.asarray(row, dtype=np.float32)
            peak = float(np.abs(row).max()) if row.size else 0.0
            self.scales[index] = peak if np.isfinite(peak) and peak > 0 else 1.0
            row = row / np.float32(self.scales[index])
        data = np.ascontiguousarray(row, dtype=self.dtype)
        assert data.shape == self.row_shape, (data.shape, self.row_shape)
        try:
            os.pwrite(self._handle.fileno(), data.tobytes(), self.offset + index * self.row_bytes)
        except OSError as error:
            raise StoreError(f"{self.path}: cannot write ({error.strerror})") from None

    def read(self, index: int) -> np.ndarray:
        raw = os.pread(self._handle.fileno(), self.row_bytes, self.offset + index * self.row_bytes)
        row = np.frombuffer(raw, dtype=self.dtype).reshape(self.row_shape).astype(np.float32)
        if self.scales is not None:
            row *= np.float32(self.scales[index])
        return row

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()


def _resample_all(entries, todo, shape, affine, keep, workers, bar, source: Source = Source()) -> None:
    """Stage 1 for entries ``todo``, each result handed to ``keep(index, volume)`` as it arrives:
    worker processes when more than one is useful."""
    if not todo:
        return
    task = bar.add_task("preprocessing", total=len(todo))
    jobs = [(i, entries["_label"].iloc[i], entries["source"].iloc[i], shape, affine, source) for i in todo]
    if workers is None:
        workers = min(os.cpu_count() or 1, 16) if len(todo) >= PARALLEL_MIN_IMAGES else 1
    workers = min(workers, len(todo))
    if workers <= 1:
        for job in jobs:
            index, array = _preprocess_entry(job)
            keep(index, array)
            bar.advance(task)
        return
    import monai.transforms  # noqa: F401  imported once here, so that forked workers inherit it

    context = multiprocessing.get_context(_start_method())
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_single_threaded
    ) as pool:
        # With fork, every worker is started at the first submit. The progress bar's refresh
        # thread is paused meanwhile: a lock it held (stderr's) would stay locked in the children.
        bar.stop()
        try:
            pending = {pool.submit(_preprocess_entry, jobs[0])}
        finally:
            bar.start()
        # At most two images per worker in flight: a finished image is written and dropped before
        # the next is submitted, so memory stays bounded whatever the cohort's size (a future
        # keeps its result alive as long as anything refers to it).
        queue = iter(jobs[1:])
        pending |= {pool.submit(_preprocess_entry, job) for job in itertools.islice(queue, 2 * workers - 1)}
        try:
            while pending:
                done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    index, array = future.result()
                    keep(index, array)
                    del array
                    bar.advance(task)
                    pending |= {pool.submit(_preprocess_entry, job) for job in itertools.islice(queue, 1)}
                del done, future
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # a failed image stops the build at once
            raise


def _final_mask(
    mean: np.ndarray, config: PreprocessConfig, shape, affine, two_d: bool = False
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Brain mask on the full grid (``mean``: the cohort's mean resampled image) and the crop
    (slices) that the stored grid keeps."""
    if config.mask == "none":
        mask = np.ones(shape, dtype=bool)
    elif config.mask == "auto":
        positive = mean[mean > 0]
        robust_max = float(np.percentile(positive, 99)) if positive.size else 0.0
        mask = mean > config.mask_threshold * robust_max
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


def _normalise(volume: np.ndarray, mask: np.ndarray, config: PreprocessConfig, entry: pd.Series) -> np.ndarray:
    """Intensity normalisation with statistics taken inside ``mask``; 0 outside it."""
    volume = volume.astype(np.float32, copy=True)
    inside = volume[mask].astype(np.float64)
    if config.normalise == "zscore":
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


def _remove_stale(cache_dir: Path, keep: set[str]) -> None:
    """Delete files of earlier builds (and temporaries of interrupted ones) that the record no longer names.

    Called with the store's lock held: every builder takes that lock, so a temporary file that is
    not ours belongs to a build that was killed, never to one still running.
    """
    prefixes = tuple(f"{dot}{kind}-" for dot in ("", ".") for kind in ("resampled", "scales", "volumes", "mask", "manifest"))
    for path in cache_dir.iterdir():
        if path.name.startswith(prefixes) and path.name not in keep:
            try:
                path.unlink()
            except OSError:
                pass  # a file another process still maps is removed by the next build
