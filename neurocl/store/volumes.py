"""The built store opened for reading: :class:`VolumeStore` (its array, grid, mask and manifest),
residency on a device and batches, and the map from cohort rows to store rows."""

from __future__ import annotations

import concurrent.futures
import json
import os
from pathlib import Path
from typing import Iterator, Literal, Sequence

import nibabel as nib
import numpy as np
import torch

from neurocl.cohort import Cohort, key_columns
from neurocl.errors import CohortError, ConfigError, StoreError
from neurocl.io import read_tsv
from neurocl.store.build import build_cohort, write_array
from neurocl.store.cache import STORE_FORMAT, _refuse_input_folder, store_lock
from neurocl.store.preprocess import PreprocessConfig
from neurocl.store.rowfile import RowFile


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
            rebuilt, manifest = build_cohort(cohort, cache_dir, config, workers, progress)
        store = cls(cache_dir)
        store.rebuilt = rebuilt
        if manifest is not None:
            store.manifest = manifest
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
            write_array(volumes, cache_dir, affine, dtype)
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


def fits_in_budget(nbytes: int, budget_bytes: float) -> bool:
    """Whether a store of ``nbytes`` (float16) goes to the device whole under ``budget_bytes``."""
    return nbytes <= budget_bytes
