"""How images become the stored array: :class:`PreprocessConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator


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
        mean's 99th percentile (after resampling) and the background's noise floor
        (:func:`auto_mask_threshold`); a path: a mask image (resampled with nearest neighbour,
        > 0.5 is brain); ``none``: every voxel.
    mask_threshold : float
        ``auto`` mask: fraction of the cohort mean's robust maximum below which a voxel is
        background. A threshold rather than ``> 0`` because resampled and modulated images carry
        tiny positive values (1e-13 and up) far outside the head, which would make the mask the
        whole field of view and put the background into every z-score.
    normalise : "zscore", "global", "minmax" or "none"
        Intensity normalisation inside the mask; voxels outside the mask are 0. ``zscore``: each
        image to mean 0, SD 1 inside the mask, which erases global differences between subjects
        (a global grey-matter loss with age, a site's intensity scale); ``global``: one mean and
        SD over every image's in-mask voxels, the same affine map for all, which keeps them;
        ``minmax``: each image to [0, 1]; ``none``: the resampled intensities.
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
    normalise: Literal["zscore", "global", "minmax", "none"] = "zscore"
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


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's (1979) threshold of ``values``: the cut that maximises the between-class variance
    w0 w1 (mu0 - mu1)^2 of a ``bins``-bin histogram (the upper edge of the last background bin)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        return float(values.max()) if values.size else 0.0
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(counts)[:-1]
    weight1 = values.size - weight0
    sum0 = np.cumsum(counts * centres)[:-1]
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (np.sum(counts * centres) - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[1 + int(np.argmax(between))])


def auto_mask_threshold(mean: np.ndarray, fraction: float) -> float:
    """The ``auto`` mask's cut on the cohort mean image: above ``fraction`` of its robust maximum
    (the 99th percentile of its positive values) and above the background's noise floor.

    Averaging subjects shrinks the noise's spread but not its mean: magnitude (Rician) noise
    outside the head averages to about 1.25 sigma, which can exceed the fraction of the maximum
    and make the mask the whole field of view. The floor is the background peak (the most
    common value below the mean image's Otsu threshold, where the voxels outside the head pile
    up) plus 5 SDs of the values below that peak, a side of the peak no tissue reaches. On a
    noise-free image the background is 0 (or resampling's 1e-13) with nothing below it, so the
    floor is 0 and the fraction alone decides, as before; so does an image without background (a
    floor at or above the Otsu threshold is tissue, not noise).
    """
    positive = mean[mean > 0]
    robust_max = float(np.percentile(positive, 99)) if positive.size else 0.0
    otsu = otsu_threshold(mean)
    below = mean[mean <= otsu]
    if below.size == 0:
        return fraction * robust_max
    counts, edges = np.histogram(below, bins=256)
    peak = int(np.argmax(counts))
    mode = (edges[peak] + edges[peak + 1]) / 2
    lower = below[below < edges[peak]]
    spread = float(np.sqrt(np.mean((lower - mode) ** 2))) if lower.size else 0.0
    floor = mode + 5.0 * spread if mode > 0 else 0.0
    if floor >= otsu:
        # No background peak below the tissue: an image that fills its frame (a photograph, a
        # tight crop) has no noise floor to clear, and the "floor" would cut away everything.
        floor = 0.0
    return max(fraction * robust_max, floor)
