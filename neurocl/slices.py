"""2D cohorts from 3D ones: an axial slab projection of a synthetic cohort through its subtype regions.

The SepCLR paper's medical experiments are 2D (chest X-rays, fundus photographs); a 2D cohort
with known ground truth checks neurocl's 2D path the way the 3D synthetic cohort checks the 3D one.
No single plane crosses every subtype region of the synthetic cohorts (measured at 4 and 8 mm,
in each of the three orientations: the smallest region's largest area is 0), so
:func:`slice_cohort` projects instead, as a radiograph does: the mean over the axial slab from the
lowest to the highest slice that holds any subtype region. Every subject's projection is written
as a PNG or a 2D NIfTI, with the same participants.tsv, ground_truth.tsv, the projected subtype
masks (voxels of the region in any slice of the slab) and a cohort.yaml whose grid is the slab's
first slice.

PNG grey levels are ``round(255 * value / max)`` with ``max`` the largest value of all the
subjects' slices, one scale for everyone so that intensity differences between subjects (site scale, atrophy) survive.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import yaml
from PIL import Image

from neurocl import io
from neurocl.cohort import Cohort
from neurocl.errors import CohortError, ConfigError
from neurocl.synthdir import SynthDir


def _axial(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The volume in RAS+ orientation and its affine (axis 2 is then inferior -> superior)."""
    image = nib.as_closest_canonical(nib.load(path))
    return np.asarray(image.get_fdata(dtype=np.float32)), image.affine


def subtype_slab(masks: list[np.ndarray]) -> slice:
    """The axial slices (axis 2) from the lowest to the highest that holds a voxel of any region."""
    occupied = np.flatnonzero(np.any(np.stack(masks), axis=(0, 1, 2)))
    if occupied.size == 0:
        raise ConfigError("the subtype masks are empty: no slab to project")
    return slice(int(occupied[0]), int(occupied[-1]) + 1)


def slice_cohort(source_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 image_format: Literal["png", "nifti"] = "png") -> Path:
    """Write the 2D cohort of the synthetic cohort in ``source_dir`` to ``out_dir``; return its cohort.yaml."""

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    source, written = SynthDir(source_dir), SynthDir(out_dir)
    if image_format not in ("png", "nifti"):
        raise ConfigError(f"image_format {image_format!r}: use png or nifti")
    mask_paths = source.subtype_masks()
    if not mask_paths:
        pattern = source.subtype_mask("*").relative_to(source_dir)
        raise ConfigError(f"{source_dir} has no {pattern}: not a synthetic cohort")
    masks = [_axial(path)[0] > 0.5 for path in mask_paths]
    slab = subtype_slab(masks)
    cohort = Cohort.from_yaml(source.cohort_yaml)
    slices, affine = [], None
    for path in cohort.image_paths:
        volume, affine = _axial(path)
        slices.append(volume[:, :, slab].mean(axis=2))
    # The projection's grid: the volume's affine at the slab's first slice, its third column the
    # slab's thickness along the slice normal.
    slice_affine = affine.copy()
    slice_affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, slab.start]) + affine[:3, 3]
    slice_affine[:3, 2] = affine[:3, 2] * (slab.stop - slab.start)
    voxel = [float(v) for v in np.linalg.norm(affine[:3, :2], axis=0)]
    scale = 255.0 / max(float(np.max(slices)), 1e-12)
    suffix = ".png" if image_format == "png" else ".nii.gz"
    for pid, image in zip(cohort.table["participant_id"], slices):
        target = out_dir / "images" / f"{pid}{suffix}"
        if image_format == "png":
            # Picture rows are the slice's first axis, as neurocl.images reads them back (the
            # picture looks rotated in a viewer; the grid's voxel sizes follow the same order).
            with io.atomic_path(target) as tmp:
                Image.fromarray(np.round(image * scale).clip(0, 255).astype(np.uint8)).save(tmp, format="PNG")
        else:
            io.save_nifti(nib.Nifti1Image(image, slice_affine), target)
    for k, mask in enumerate(masks, start=1):
        io.save_nifti(nib.Nifti1Image(mask[:, :, slab].any(axis=2).astype(np.uint8), slice_affine),
                      written.subtype_mask(k))
    shutil.copyfile(source.participants, written.participants)
    shutil.copyfile(source.ground_truth, written.ground_truth)
    spec = io.load_yaml(source.cohort_yaml, CohortError, "cohort spec")
    spec["name"] = f"{spec['name']}-2d-slab{slab.start}-{slab.stop - 1}"
    spec["images"] = "images/{participant_id}" + suffix
    if image_format == "png":
        spec["grid"] = {"voxel_size": voxel}
    return io.write_text(written.cohort_yaml, yaml.safe_dump(spec, sort_keys=False))
