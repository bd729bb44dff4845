"""Reading one image of a cohort, whatever its file kind: NIfTI, NumPy array or picture.

Three kinds, chosen by the cohort spec's ``images`` template suffix:

* ``nifti`` (anything nibabel reads: ``.nii``, ``.nii.gz``, ...): the header carries the grid.
* ``array`` (``.npy``, e.g. the OpenBHB layout of one preprocessed array per subject): the
  file holds only voxels, so the grid's affine is given once in the spec (``grid:``), since
  every array of a fixed-grid cohort shares it.
* ``picture`` (``.png``, ``.jpg``, ``.jpeg``; chest X-rays, fundus photographs): read with
  Pillow as one grey-level channel; the pixel spacing is 1 unless ``grid:`` says otherwise.

An image is 2D or 3D. Singleton axes at either end are dropped first (OpenBHB arrays are
``(1, X, Y, Z)``; a NIfTI slice may be ``(X, Y, 1)``), so ``(X, Y, 1)`` is a 2D image. A 2D
image's affine is still 4x4 (the third column is the slice axis), as a 2D NIfTI header holds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import nibabel as nib
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

ImageKind = Literal["nifti", "array", "picture"]
# Deflate's largest compression ratio: a gzip file of n bytes holds at most ~1032 n bytes.
GZIP_MAX_RATIO = 1032
ARRAY_SUFFIXES = (".npy",)
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


class GridSpec(BaseModel):
    """The voxel grid of array and picture cohorts (their files carry none).

    Give ``affine`` (4x4 voxel-to-world matrix in mm, e.g. the MNI template's) or ``voxel_size``
    (one value, or one per axis; the origin is then 0). A 2D grid uses a 4x4 affine too.
    """

    model_config = ConfigDict(extra="forbid")

    affine: list[list[float]] | None = None
    voxel_size: float | list[float] | None = Field(default=None)

    @model_validator(mode="after")
    def _one_of(self) -> "GridSpec":
        if (self.affine is None) == (self.voxel_size is None):
            raise ValueError("give exactly one of affine (4x4) or voxel_size")
        if self.affine is not None:
            matrix = np.asarray(self.affine, dtype=float)
            if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
                raise ValueError(f"affine must be a 4x4 matrix of finite numbers, got shape {matrix.shape}")
            if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
                raise ValueError("affine is singular (its 3x3 part has determinant 0)")
        else:
            sizes = np.atleast_1d(np.asarray(self.voxel_size, dtype=float))
            if sizes.size not in (1, 2, 3) or np.any(sizes <= 0) or not np.all(np.isfinite(sizes)):
                raise ValueError(f"voxel_size must be 1 to 3 positive numbers, got {self.voxel_size}")
        return self

    def matrix(self) -> np.ndarray:
        """The 4x4 affine this spec describes."""
        if self.affine is not None:
            return np.asarray(self.affine, dtype=float)
        sizes = np.atleast_1d(np.asarray(self.voxel_size, dtype=float))
        diagonal = np.ones(3)
        diagonal[: sizes.size] = sizes
        if sizes.size == 1:
            diagonal[:] = sizes[0]
        return np.diag([*diagonal, 1.0])


class Grid(NamedTuple):
    """An image's grid: shape (2 or 3 axes), 4x4 affine and voxel sizes (one per axis)."""

    shape: tuple[int, ...]
    affine: np.ndarray
    zooms: tuple[float, ...]


def image_kind(template: str) -> ImageKind:
    """The kind of the files an ``images`` template names, from its suffix."""
    name = template.lower()
    if name.endswith(ARRAY_SUFFIXES):
        return "array"
    if name.endswith(PICTURE_SUFFIXES):
        return "picture"
    return "nifti"


def squeeze_ends(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` without singleton axes at either end, keeping at least 2 axes."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _zooms(affine: np.ndarray, n_axes: int) -> tuple[float, ...]:
    return tuple(float(z) for z in np.linalg.norm(affine[:3, :n_axes], axis=0))


def read_grid(path: Path, kind: ImageKind, grid: GridSpec | None = None) -> Grid | str:
    """The image's grid from its header, or the problem that prevents reading it (a message)."""
    if not path.is_file():
        return f"image not found: {path}"
    try:
        if kind == "nifti":
            image = nib.load(path)
            raw_shape, affine = image.shape, np.asarray(image.affine, dtype=float)
            header_zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
            forged = _nifti_size_problem(image)
            if forged:
                return forged
        elif kind == "array":
            raw_shape = np.load(path, mmap_mode="r").shape
            affine = grid.matrix() if grid is not None else np.eye(4)
            header_zooms = None
        else:
            with Image.open(path) as picture:
                width, height = picture.size
            raw_shape = (height, width)  # rows first, as numpy.asarray(picture) holds them
            affine = grid.matrix() if grid is not None else np.eye(4)
            header_zooms = None
    except Exception as error:  # readers raise many types for unreadable files; all are reported
        return f"unreadable image {path.name}: {type(error).__name__}: {error}"
    shape = squeeze_ends(raw_shape) if kind != "nifti" else _squeeze_nifti(raw_shape)
    if len(shape) not in (2, 3):
        return f"image is {len(shape)}D with shape {tuple(raw_shape)}, expected 2D or 3D"
    zooms = header_zooms[: len(shape)] if header_zooms is not None else _zooms(affine, len(shape))
    return Grid(shape, affine, tuple(zooms))


def _nifti_size_problem(image) -> str | None:
    """Whether the header's claimed voxel data can be in the file at all (None if it can).

    Checked before any voxel is read: a forged 1 KB header that claims 1000^3 float32 voxels
    would otherwise make the reader allocate 4 GB. Uncompressed data must fit in the file;
    gzip data cannot expand more than deflate's maximum ratio (1032:1) allows. Other
    compressions (bz2, zstd) have no useful bound, so only the reference-grid check guards them.
    """
    header = image.header
    data_file = image.file_map["image"].filename
    try:
        size = os.path.getsize(data_file)
        offset = int(header.get_data_offset()) if str(data_file).endswith((".nii", ".nii.gz")) else 0
        claimed = offset + int(np.prod(image.shape, dtype=object)) * header.get_data_dtype().itemsize
    except (OSError, TypeError, ValueError):
        return None  # the reader itself reports what it cannot open
    name = Path(data_file).name
    if str(data_file).endswith(".gz"):
        if claimed > size * GZIP_MAX_RATIO:
            return (f"header of {name} claims {tuple(image.shape)} {header.get_data_dtype()} voxels "
                    f"({claimed:,} bytes), more than a {size:,}-byte gzip file can hold; forged or corrupt header")
    elif not str(data_file).endswith((".bz2", ".zst")) and claimed > size:
        return (f"header of {name} claims {tuple(image.shape)} {header.get_data_dtype()} voxels "
                f"({claimed:,} bytes) but the file holds {size:,} bytes; truncated file or forged header")
    return None


def _squeeze_nifti(shape: Sequence[int]) -> tuple[int, ...]:
    # NIfTI's first three axes are spatial by definition: only trailing singletons go.
    shape = tuple(int(n) for n in shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def read_voxels(path: Path, kind: ImageKind) -> np.ndarray:
    """The image's voxels with end singleton axes dropped (float32 for pictures: grey levels).

    Pictures in colour are converted to one grey-level channel with Pillow's ``L`` mode
    (ITU-R 601-2 luma), since a store holds one channel per image.
    """
    if kind == "nifti":
        data = np.asanyarray(nib.load(path).dataobj)
        return data.reshape(_squeeze_nifti(data.shape))
    if kind == "array":
        data = np.load(path, allow_pickle=False)
        if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
            raise ValueError(f"array of dtype {data.dtype} is not numeric")
        return data.reshape(squeeze_ends(data.shape))

    with Image.open(path) as picture:
        picture.load()
        grey = picture if picture.mode in ("L", "I", "F", "I;16") else picture.convert("L")
        return np.asarray(grey, dtype=np.float32)


def as_volume(data: np.ndarray) -> np.ndarray:
    """A 2D image as a 3D one with a trailing singleton axis (stage 1 resamples in 3D)."""
    return data[..., None] if data.ndim == 2 else data
