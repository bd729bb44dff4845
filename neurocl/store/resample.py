"""Stage 1 of a build: each image loaded, reoriented to RAS and resampled onto the target grid with
MONAI, in worker processes when there are many."""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import os
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

import nibabel as nib
import numpy as np
import torch

from neurocl.errors import CohortError
from neurocl.images import ImageKind, as_volume, read_voxels

PARALLEL_MIN_IMAGES = 64  # below this many images to preprocess, worker start-up costs more than it saves


class Source(NamedTuple):
    """How stage 1 reads a cohort's files: their kind, the spec's affine for arrays and pictures
    (``None`` for NIfTI) and whether the cohort is 2D (read as one-slice volumes)."""

    kind: ImageKind = "nifti"
    affine: np.ndarray | None = None
    two_d: bool = False


def _load_volume(path: str, source: Source):
    """One image as a channel-first MetaTensor with its affine: MONAI's LoadImage for 3D NIfTI,
    :mod:`neurocl.images` otherwise (a 2D image becomes a one-slice volume)."""
    # MONAI is imported where an image is read: it costs seconds, and a store that is only opened never needs it.
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
    from monai.transforms import Orientation, SpatialResample  # seconds to import: see _load_volume

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
    if sys.platform.startswith("linux") and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def _single_threaded() -> None:
    """Worker-process start: one thread each, so that N workers do not oversubscribe N cores."""
    torch.set_num_threads(1)


def _preprocess_entry(task: tuple[int, str, str, tuple[int, ...], np.ndarray, Source]) -> tuple[int, np.ndarray]:
    """Worker-process body: resample one image; errors come back as a message naming the image."""
    index, label, path, shape, affine, source = task
    try:
        return index, _resample_image(path, shape, affine, source=source)
    except Exception as error:  # any reader/transform failure is reported with the image it concerns
        raise CohortError(f"{label}: cannot preprocess image {path}: {error}") from None


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
