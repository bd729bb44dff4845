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

The package, one job a module:

* :mod:`~neurocl.store.preprocess`: :class:`PreprocessConfig` and stage 2 (mask, crop, normalise);
* :mod:`~neurocl.store.grids`: target grids (RAS reorientation, resampling to a voxel size);
* :mod:`~neurocl.store.resample`: stage 1, one image loaded and resampled with MONAI, in worker processes;
* :mod:`~neurocl.store.rowfile`: :class:`RowFile`, an ``.npy`` written and read a row at a time;
* :mod:`~neurocl.store.cache`: the cache folder (lock, manifest entries, what an earlier build lets reuse);
* :mod:`~neurocl.store.build`: a build from a cohort or an array, committed atomically;
* :mod:`~neurocl.store.volumes`: :class:`VolumeStore`, the built store opened for reading and batches.
"""

from neurocl.store.cache import LOCK_NAME, STORE_FORMAT, sha256_file, store_lock
from neurocl.store.grids import ras_grid, resampled_grid
from neurocl.store.preprocess import PreprocessConfig
from neurocl.store.resample import PARALLEL_MIN_IMAGES, Source
from neurocl.store.rowfile import RowFile
from neurocl.store.volumes import VolumeStore, fits_in_budget

__all__ = [
    "LOCK_NAME", "PARALLEL_MIN_IMAGES", "STORE_FORMAT", "PreprocessConfig", "RowFile", "Source", "VolumeStore",
    "fits_in_budget", "ras_grid", "resampled_grid", "sha256_file", "store_lock",
]
