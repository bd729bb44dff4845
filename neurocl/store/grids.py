"""Target grids: an image's grid reoriented to RAS, and a grid of another voxel size over the same field of view."""

from __future__ import annotations

import json
from typing import Sequence

import nibabel.orientations as nio
import numpy as np


def ras_grid(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of the same grid with its axes reordered/flipped to RAS+.

    This is the grid MONAI's ``Orientation(axcodes="RAS")`` produces, so a voxel keeps its
    world coordinate: only array axes are permuted and flipped.
    """
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
