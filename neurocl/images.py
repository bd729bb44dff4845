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

Voxels must be real numbers: integers, floats or booleans. Complex voxels (whose imaginary part a
cast to float would drop), text, Python objects, records (NIfTI RGB) and dates are refused by
name from the header, before any voxel is read. So is a NIfTI scaling that is not a number
(``scl_slope = inf``): readers then ignore the scaling and the voxels come back unscaled, a
thousand times too bright for a typical int16 image. ``scl_slope = nan`` alone means "no
scaling" (nibabel writes it for every unscaled image) and is accepted.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import nibabel as nib
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from neurocl.errors import CohortError

ImageKind = Literal["nifti", "array", "picture"]
# Deflate's largest compression ratio: a gzip file of n bytes holds at most ~1032 n bytes.
GZIP_MAX_RATIO = 1032
ARRAY_SUFFIXES = (".npy",)
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
# NumPy dtype kinds a voxel may have: boolean, signed and unsigned integers, floats.
VOXEL_KINDS = "biuf"
# What the refused kinds hold, for messages.
REFUSED_KINDS = {"c": "complex numbers: reading them as real would drop the imaginary part; save the magnitude or the real part",
                 "O": "Python objects", "U": "text", "S": "bytes", "V": "records, such as RGB colour",
                 "M": "dates", "m": "time spans"}


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
    missing = not_a_file(path, "image")
    if missing:
        return missing
    try:
        if kind == "nifti":
            image = nib.load(path)
            raw_shape, affine = image.shape, np.asarray(image.affine, dtype=float)
            header_zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
            refused = (_nifti_size_problem(image) or dtype_problem(image.header.get_data_dtype(), path.name)
                       or _scaling_problem(image, path.name))
            if refused:
                return refused
        elif kind == "array":
            refused = dtype_problem(_npy_dtype(path), path.name)
            if refused:
                return refused
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


def not_a_file(path: Path, what: str) -> str | None:
    """None when ``path`` is a regular file (symlinks followed), else what it is instead, for a message.

    "not found" alone would send a user looking for a file that is there: a folder, a symbolic
    link loop or a dangling link needs another fix. A pipe or device is refused too, since reading
    one could block forever.
    """
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"{what} is a symbolic link loop: {path}"
        if path.is_symlink():
            return f"{what} is a broken symbolic link: {path} -> {os.readlink(path)} (no such file)"
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"{what} not found: {path}"
        return f"{what} cannot be read: {path} ({error.strerror or error})"
    if stat.S_ISDIR(mode):
        return f"{what} is a folder, not a file: {path}"
    if not stat.S_ISREG(mode):
        return f"{what} is not a regular file (a pipe, socket or device): {path}"
    return None


def dtype_problem(dtype: np.dtype, name: str) -> str | None:
    """None when voxels of ``dtype`` are real numbers (:data:`VOXEL_KINDS`), else the refusal, naming both."""
    dtype = np.dtype(dtype)
    if dtype.kind in VOXEL_KINDS and dtype.fields is None:
        return None
    held = REFUSED_KINDS.get("V" if dtype.fields is not None else dtype.kind, "not real numbers")
    return f"{name} holds {dtype} voxels ({held}); neurocl reads integer, float or bool voxels only"


def _npy_dtype(path: Path) -> np.dtype:
    """The data type an ``.npy`` file's header declares, read without its data (an object array cannot be mapped)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read_header(handle)[2]


def _scaling_problem(image, name: str) -> str | None:
    """A NIfTI scaling (``scl_slope``, ``scl_inter``) that readers would silently ignore, or None.

    nibabel, like the NIfTI reference library, reads the voxels unscaled when the slope is 0 or
    not finite. 0 and NaN are the two spellings of "no scaling"; an infinite slope, or a NaN slope
    beside a real intercept, is a damaged header whose voxels would be read at the wrong scale. (A
    real slope beside a non-finite intercept is refused by nibabel itself: an unreadable header.)
    The header is read again as the file holds it: a loaded image's header has its scaling reset.
    """
    try:
        with image.file_map["header" if "header" in image.file_map else "image"].get_prepare_fileobj("rb") as handle:
            header = image.header_class.from_fileobj(handle)
    except Exception:  # formats whose headers cannot be re-read alone carry no NIfTI scaling
        return None
    if "scl_slope" not in header.keys():
        return None
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"]) if "scl_inter" in header.keys() else 0.0
    if np.isinf(slope):
        return (f"header of {name} has scl_slope = {slope}: not a finite scaling, so the voxels would be read "
                "unscaled; fix the header's scl_slope")
    if np.isnan(slope) and np.isfinite(inter) and inter != 0:
        return (f"header of {name} has scl_slope = nan beside scl_inter = {inter:g}: the scaling would be ignored "
                "and the voxels read unscaled; fix the header's scl_slope")
    return None


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
        image = nib.load(path)
        refused = dtype_problem(image.header.get_data_dtype(), path.name) or _scaling_problem(image, path.name)
        if refused:
            raise CohortError(f"{path}: {refused}")
        data = np.asanyarray(image.dataobj)
        return data.reshape(_squeeze_nifti(data.shape))
    if kind == "array":
        refused = dtype_problem(_npy_dtype(path), path.name)
        if refused:
            raise CohortError(f"{path}: {refused}")
        data = np.load(path, allow_pickle=False)
        return data.reshape(squeeze_ends(data.shape))

    with Image.open(path) as picture:
        picture.load()
        grey = picture if picture.mode in ("L", "I", "F", "I;16") else picture.convert("L")
        return np.asarray(grey, dtype=np.float32)


def as_volume(data: np.ndarray) -> np.ndarray:
    """A 2D image as a 3D one with a trailing singleton axis (stage 1 resamples in 3D)."""
    return data[..., None] if data.ndim == 2 else data
