"""A contrastive-analysis cohort of real images: natural photographs, some with a real handwritten digit.

The setting of the contrastive-analysis literature (Abid et al., 2018, cPCA: MNIST digits on
ImageNet grass; Louiset et al., 2024, SepCLR): *background* images hold only natural texture,
*target* images hold the same texture with a salient pattern blended in. Nothing here is drawn
by neurocl: both the texture and the pattern are real images that scikit-learn ships
(``sklearn.datasets.load_sample_images``: two photographs, ``china.jpg`` and ``flower.jpg``;
``sklearn.datasets.load_digits``: 1797 real 8x8 handwritten digits of the UCI optical digits set).

Every subject is one image, with known factors:

shared by everyone (what a common space should hold)
    * ``photo``: which photograph the patch is cut from (categorical);
    * ``crop_row``: where, vertically, in the photograph (0 top, 1 bottom; the content changes);
    * ``gamma``: a contrast curve ``v -> v ** gamma``, ``gamma ~ exp(U(log 0.5, log 2))``
      (non-linear, so per-image z-scoring does not remove it, unlike a brightness scale).

target only (what a salient space should hold)
    * ``digit``: the class of the blended digit (0 or 1 by default);
    * ``strength``: the blend weight ``s ~ U(0.3, 1)``.

A patch is a ``patch`` x ``patch`` grey-level crop (mean of the RGB channels, /255) at a random
place of a random photograph (redrawn where the crop is nearly flat: grey-level SD < 0.05),
downsampled 2x; a target image is then
``x = (1 - s m) x + s m``, ``m`` the digit (values /16) upscaled to half the patch and placed at the
centre with a jitter of up to 2 pixels. Pixel values lie in [0.02, 1] (a floor keeps the images'
automatic mask whole).

neurocl trains 3D encoders on volumes, so each image is written as a thin NIfTI volume of
``depth`` identical slices (1 mm voxels), with the usual ``participants.tsv``, ``cohort.yaml`` and
``ground_truth.tsv``: it goes through the same cohort, store and pipeline as an MRI cohort.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage
from sklearn.datasets import load_digits, load_sample_images

from neurocl import io
from neurocl.errors import ConfigError
from neurocl.synthdir import SynthDir

PHOTOS = ("china", "flower")
FLOOR = 0.02
MIN_CROP_SD = 0.05  # grey-level SD below which a crop is redrawn (flat black background)


class NaturalConfig(BaseModel):
    """Options of the natural-image contrastive cohort."""

    model_config = ConfigDict(extra="forbid")

    n_subjects: int = Field(200, ge=8, le=20000, description="images (subjects)")
    target_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="fraction with a digit blended in")
    digits: list[int] = Field([0, 1], min_length=2, description="digit classes of the target images")
    patch: int = Field(64, ge=16, le=400, description="crop size in photograph pixels (the image is half that)")
    depth: int = Field(4, ge=1, le=16, description="identical slices of the thin volume")
    strength: tuple[float, float] = Field((0.3, 1.0), description="range of the digit's blend weight")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "NaturalConfig":
        if any(d < 0 or d > 9 for d in self.digits) or len(set(self.digits)) != len(self.digits):
            raise ValueError(f"digits must be distinct classes 0-9, got {self.digits}")
        if self.patch % 2:
            raise ValueError(f"patch must be even (the image is half of it), got {self.patch}")
        low, high = self.strength
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"strength must be 0 < low <= high <= 1, got {self.strength}")
        n_targets = round(self.target_fraction * self.n_subjects)
        if not len(self.digits) <= n_targets <= self.n_subjects - 1:
            raise ValueError(f"{n_targets} target images for {len(self.digits)} digit classes and {self.n_subjects} images")
        return self


def _photographs() -> list[np.ndarray]:
    """The two photographs scikit-learn ships, as grey levels in [0, 1] (float32, 427 x 640)."""
    images = load_sample_images()
    names = [Path(name).stem for name in images.filenames]
    if tuple(names) != PHOTOS:
        raise ConfigError(f"scikit-learn's sample images are {names}, expected {list(PHOTOS)}")
    return [image.astype(np.float32).mean(axis=2) / 255.0 for image in images.images]


def _upscale(digit: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 digit (0-16) bilinearly upscaled to ``size`` x ``size`` pixels in [0, 1]."""
    return np.clip(ndimage.zoom(digit / 16.0, size / 8.0, order=1), 0.0, 1.0).astype(np.float32)


def draw_factors(config: NaturalConfig) -> pd.DataFrame:
    """Every factor of every image (the ground truth), from ``config.seed``."""
    rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(1)[0])
    n = config.n_subjects
    n_targets = round(config.target_fraction * n)
    is_target = rng.permutation(np.arange(n) < n_targets)
    photos = _photographs()
    height, width = photos[0].shape
    photo = rng.integers(0, len(PHOTOS), n)
    top = rng.integers(0, height - config.patch + 1, n)
    left = rng.integers(0, width - config.patch + 1, n)
    # Parts of the photographs are flat black (the flower's background): such a crop holds no
    # texture (a constant image, which the cohort check refuses), so it is drawn again.
    for i in range(n):
        while photos[photo[i]][top[i] : top[i] + config.patch, left[i] : left[i] + config.patch].std() < MIN_CROP_SD:
            top[i] = rng.integers(0, height - config.patch + 1)
            left[i] = rng.integers(0, width - config.patch + 1)
    gamma = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
    digits = load_digits()
    digit = np.full(n, -1)
    digit[is_target] = rng.permutation(np.arange(n_targets) % len(config.digits))
    digit[is_target] = np.asarray(config.digits)[digit[is_target]]
    # A different real digit image for every target (drawn without replacement within its class while they last).
    sample = np.full(n, -1)
    for value in config.digits:
        rows = np.flatnonzero(digit == value)
        pool = np.flatnonzero(digits.target == value)
        sample[rows] = rng.choice(pool, size=len(rows), replace=len(rows) > len(pool))
    strength = np.where(is_target, rng.uniform(*config.strength, n), 0.0)
    jitter = rng.integers(-2, 3, size=(n, 2))
    width_digits = max(4, len(str(n)))
    return pd.DataFrame(
        {
            "participant_id": [f"sub-{i + 1:0{width_digits}d}" for i in range(n)],
            "group": np.where(is_target, "target", "background"),
            "kind": np.where(is_target, "digit", "plain"),
            "photo": np.asarray(PHOTOS)[photo],
            "crop_row": top / (height - config.patch),
            "crop_col": left / (width - config.patch),
            "gamma": gamma,
            "digit": np.where(is_target, digit, -1),
            "strength": strength,
            "digit_sample": sample,
            "jitter_row": np.where(is_target, jitter[:, 0], 0),
            "jitter_col": np.where(is_target, jitter[:, 1], 0),
            "top_px": top,
            "left_px": left,
        }
    )


def render(factors: pd.Series, config: NaturalConfig, photos: list[np.ndarray], digit_images: np.ndarray) -> np.ndarray:
    """One image (float32, half-patch square, values in [FLOOR, 1]) from its factors."""
    half = config.patch // 2
    crop = photos[PHOTOS.index(factors.photo)][factors.top_px : factors.top_px + config.patch,
                                               factors.left_px : factors.left_px + config.patch]
    image = crop.reshape(half, 2, half, 2).mean(axis=(1, 3))  # 2x2 box downsampling
    image = np.clip(image, 0.0, 1.0) ** factors.gamma
    if factors.group == "target":
        size = half // 2
        mask = np.zeros_like(image)
        row = (half - size) // 2 + factors.jitter_row
        col = (half - size) // 2 + factors.jitter_col
        mask[row : row + size, col : col + size] = _upscale(digit_images[factors.digit_sample], size)
        image = (1.0 - factors.strength * mask) * image + factors.strength * mask
    return np.clip(image, FLOOR, 1.0).astype(np.float32)


def make_natural_cohort(out_dir: str | Path, config: NaturalConfig | None = None) -> Path:
    """Write the cohort to ``out_dir`` (new or empty); return its ``cohort.yaml`` (written last).

    Files: ``participants.tsv`` (participant_id, kind, photo, crop_row, gamma, digit, strength;
    digit and strength ``n/a`` for background images), ``ground_truth.tsv`` (every factor,
    including the digit's index in ``load_digits`` and the crop's pixel position), one thin NIfTI volume per image
    (``images/sub-XXXX.nii.gz``), ``dataset_description.json`` (the options) and ``cohort.yaml``.
    """
    config = config or NaturalConfig()
    out_dir = Path(out_dir)
    files = SynthDir(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"output folder {out_dir} is not new or empty; give a new or empty folder")
    factors = draw_factors(config)
    photos = _photographs()
    digit_images = load_digits().images
    affine = np.eye(4)
    for row in factors.itertuples(index=False):
        image = render(row, config, photos, digit_images)
        volume = np.repeat(image[:, :, None], config.depth, axis=2)
        nifti = nib.Nifti1Image(volume, affine)
        nifti.header.set_xyzt_units("mm")
        io.save_nifti(nifti, out_dir / "images" / f"{row.participant_id}.nii.gz")
    truth = factors
    io.write_tsv(files.ground_truth, truth)
    is_target = truth.group == "target"
    participants = pd.DataFrame(
        {
            "participant_id": truth.participant_id,
            "kind": truth.kind,
            "photo": truth.photo,
            "crop_row": truth.crop_row.round(3),
            "gamma": truth.gamma.round(3),
            "digit": truth.digit.astype(str).where(is_target),
            "strength": truth.strength.round(3).where(is_target),
        }
    )
    io.write_tsv(files.participants, participants)
    io.write_json(files.description,
                  {"Name": f"neurocl natural-image contrastive cohort (seed {config.seed})",
                   "Sources": ["sklearn.datasets.load_sample_images", "sklearn.datasets.load_digits"],
                   "NaturalConfig": config.model_dump(mode="json")})
    spec = {
        "name": f"natural-digits-seed{config.seed}",
        "participants": SynthDir.PARTICIPANTS,
        "root": ".",
        "images": "images/{participant_id}.nii.gz",
        "group": {"column": "kind", "background": ["plain"], "target": ["digit"]},
        "attributes": {"photo": "categorical", "crop_row": "continuous", "gamma": "continuous",
                       "digit": "categorical", "strength": "continuous"},
    }
    return io.write_text(files.cohort_yaml, yaml.safe_dump(spec, sort_keys=False))
