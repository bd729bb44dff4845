"""Synthetic grey-matter cohorts with known ground truth, built offline.

Every subject's grey-matter (GM) map is nilearn's packaged MNI152 GM template
(ICBM 2009a, 1 mm), resampled to the requested voxel size and transformed by
latent factors whose values are written to ``ground_truth.tsv``:

Common to all subjects (what a contrastive "common" space should capture)
    * age ``a ~ U(20, 80)`` years: GM loss ``l_age = age_effect * 0.03 * (a - 20) / 10``
      (3 % per decade), global, or with ``age_pattern="gradient"`` weighted by
      ``2 r(x)`` (``r`` 0 at the brain's back, 1 at its front: an anterior-posterior gradient), and a
      ventricle-like enlargement, a radial warp about the ventricles
      ``y = c_v + (x - c_v) * (1 - e * exp(-||(x - c_v) / rho||^2 / 2))`` with
      ``e = age_effect * 0.005 * (a - 20)`` (0.3 at 80 years);
    * sex: head size, an isotropic scaling
      ``s = exp(±0.025 * sex_effect + 0.015 * head_size_noise * N(0, 1))`` (+ for M, - for F;
      about 5 % between sexes);
    * site ``k``: intensity scale, extra Gaussian smoothing and noise level;
    * an individual smooth deformation: displacements ``N(0, d^2)`` mm per axis on a
      20 mm control grid, cubic-spline interpolated, ``d = deformation * U(1, 3)`` mm.

Specific to patients (what a "salient" space should capture)
    * subtype ``k in 1..K``: ``lesion_regions`` distinct anatomical regions of GM loss per
      subtype (``subtypes=0``: no subtypes, every patient has subtype 1's regions);
    * severity ``v = 2 + 8 * Beta(2, 2)`` on a 0-10 clinical scale (``subtypes=0``:
      ``v ~ U(0, 10)``, a continuum down to control-like patients): the local loss is
      ``l_sub(x) = subtype_effect * 0.4 * v / 10 * w_k(x)`` (8 % to 40 % at the region's core),
      ``w_k`` flat-topped raised-cosine blobs around the regions' centres (radii scaled by
      ``lesion_size``);
    * optionally drawn per subject (``lesion_jitter``, ``lesion_pattern="foci"``,
      ``atrophy="shrink"``, ``lesion_course="age"``; :func:`_lesion_latents`): each lesion's centre,
      which pool regions a patient's foci hit, a contraction of the anatomy instead of a loss, and a
      loss that grows with age in one subtype only, built so that the subtypes' mean images are equal.

The image of a subject is, with ``phi`` the composed warp (deformation, head scale,
ventricles) and ``T`` the template::

    G(x) = clip(scale_k * (S_k * [T * (1 - l_age) * (1 - l_sub)])(phi(x)) + n(x), 0, 1)

or, with ``lesion_space="subject"``, the loss planted after the warp, at fixed image
coordinates (it does not follow the subject's anatomy)::

    G(x) = clip(scale_k * (S_k * [(T * (1 - l_age))(phi(x)) * (1 - l_sub(x))]) + n(x), 0, 1)

where ``S_k`` is the site's Gaussian smoothing and ``n ~ N(0, sigma_k^2)`` noise inside the
brain. See ``docs/synthetic.md`` for the full description.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from neurocl import io
from neurocl.errors import ConfigError
from neurocl.synthdir import SynthDir

# Anatomically placed subtype regions (MNI152 mm), in different lobes and hemispheres,
# each centred in GM-rich tissue (>= 75 % of the voxels within 12 mm have GM >= 0.25 in
# the template, except the cerebellum and precentral, >= 64 %).
REGIONS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("left medial temporal lobe", (-26.0, -18.0, -16.0)),
    ("right dorsolateral prefrontal cortex", (40.0, 36.0, 26.0)),
    ("left superior parietal lobule", (-30.0, -60.0, 50.0)),
    ("right lateral temporal cortex", (58.0, -24.0, -4.0)),
    ("right thalamus", (12.0, -18.0, 8.0)),
    ("left anterior cingulate cortex", (-6.0, 36.0, 20.0)),
    ("right cerebellum", (26.0, -66.0, -36.0)),
    ("left precentral gyrus", (-38.0, -18.0, 56.0)),
)
REGION_CORE_MM = 8.0  # full effect within this distance of the centre
REGION_RADIUS_MM = 16.0  # effect tapers to zero here; regions never overlap (centres >= 32 mm apart)
REGION_MASK_WEIGHT = 0.5  # the mask holds GM voxels where the planted loss is >= half its peak
MASK_GM_THRESHOLD = 0.25  # "GM voxel" in the template at the output resolution
MAX_SUBTYPE_LOSS = 0.4
MAX_SUBTYPE_SHRINK = 0.4  # atrophy=shrink: the core's linear size / (1 + 0.4) at severity 10 (about -64 % volume)
SHRINK_WIDTH_MM = 16.0  # atrophy=shrink: the contraction's Gaussian width (times lesion_size)
COURSE_AGE_SPAN = 30.0  # lesion_course=age: the progressive loss is x (age - 20) / 30, 1 on average over U(20, 80)
AGE_LOSS_PER_DECADE = 0.03
VENTRICLE_EXPANSION_PER_YEAR = 0.005
VENTRICLE_CENTRE_MM = np.array([0.0, -10.0, 16.0])
VENTRICLE_WIDTH_MM = np.array([16.0, 32.0, 18.0])
HEAD_CENTRE_MM = np.array([0.0, -18.0, 5.0])
SEX_HEAD_LOG_SCALE = 0.025
HEAD_LOG_SCALE_SD = 0.015
CONTROL_SPACING_MM = 20.0
CONTROL_ORIGIN_MM = np.array([-100.0, -140.0, -90.0])
CONTROL_SHAPE = (11, 13, 11)  # fixed in world space: a seed deforms a subject alike at every resolution
GRID_MARGIN_MM = 8.0
FWHM_TO_SIGMA = 1.0 / np.sqrt(8.0 * np.log(2.0))


class SynthConfig(BaseModel):
    """Options of a synthetic cohort; every effect size is a multiplier of the documented default (1)."""

    model_config = ConfigDict(extra="forbid")

    n_subjects: int = Field(200, ge=4, le=99999, description="number of subjects")
    patient_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of patients (target group)")
    subtypes: int = Field(
        2, ge=0, le=len(REGIONS),
        description="patient subtypes, each with its own regions of GM loss; 0: no subtypes, one pattern "
        "shared by all patients with a continuous severity U(0, 10)",
    )
    lesion_regions: int = Field(1, ge=1, le=len(REGIONS), description="regions of GM loss per subtype")
    lesion_size: float = Field(
        1.0, ge=0.25, le=1.0, description="multiplier of a region's radii (full loss within 8 mm, none beyond 16 mm)"
    )
    lesion_space: Literal["template", "subject"] = Field(
        "template",
        description="where the loss is planted: template (before the warp, it follows the anatomy) or subject "
        "(after the warp, at fixed image coordinates)",
    )
    lesion_pattern: Literal["regions", "foci"] = Field(
        "regions",
        description="regions: each subtype has its own lesion_regions regions; foci: subtype k is k foci, each at "
        "1/k of the loss, in k distinct regions drawn per patient from a pool of lesion_pool regions shared by "
        "every subtype (the subtypes' mean images are equal: no linear readout of the voxels tells them apart)",
    )
    lesion_pool: int = Field(
        4, ge=1, le=len(REGIONS), description="lesion_pattern foci: the first lesion_pool regions, where foci fall"
    )
    lesion_jitter: float = Field(
        0.0, ge=0.0, le=30.0,
        description="each lesion region's centre moves by U(-j, j) mm per axis, drawn per subject and region "
        "(0: fixed centres); ground_truth.tsv holds every subject's centres",
    )
    atrophy: Literal["loss", "shrink"] = Field(
        "loss",
        description="how a region atrophies: loss (GM intensity falls) or shrink (a warp contracts the anatomy "
        "about the region's centre, its GM values kept)",
    )
    lesion_course: Literal["constant", "age"] = Field(
        "constant",
        description="constant: the loss is set by severity; age (2 subtypes): both subtypes have the same regions "
        "and mean loss, subtype 1's growing with age (x (age - 20) / 30), subtype 2's not: only the age x loss "
        "interaction tells them apart",
    )
    age_pattern: Literal["global", "gradient"] = Field(
        "global", description="age GM loss: global (uniform) or gradient (anterior-posterior, none at the back)"
    )
    sites: int = Field(3, ge=1, le=50, description="acquisition sites")
    resolution: float = Field(4.0, ge=1.0, le=16.0, description="isotropic voxel size in mm")
    confound: float = Field(0.0, ge=0.0, le=1.0, description="site-diagnosis dependence, 0 (none) to 1 (total)")
    age_effect: float = Field(1.0, ge=0.0, le=3.0, description="multiplier of the age effects")
    sex_effect: float = Field(1.0, ge=0.0, le=5.0, description="multiplier of the sex head-size difference")
    head_size_noise: float = Field(
        1.0, ge=0.0, le=5.0, description="multiplier of the individual head-size SD; 0: head size set by sex alone"
    )
    site_effect: float = Field(1.0, ge=0.0, le=5.0, description="multiplier of site scale, smoothing and noise")
    subtype_effect: float = Field(1.0, ge=0.0, le=2.5, description="multiplier of the subtype GM loss")
    deformation: float = Field(1.0, ge=0.0, le=5.0, description="multiplier of the individual deformation")
    seed: int = Field(0, ge=0, description="random seed: same seed, same cohort")

    @model_validator(mode="after")
    def _groups_and_sites_possible(self) -> "SynthConfig":
        n_patients = round(self.patient_fraction * self.n_subjects)
        if not 1 <= n_patients <= self.n_subjects - 1:
            raise ValueError(
                f"patient_fraction={self.patient_fraction} with n_subjects={self.n_subjects} gives "
                f"{n_patients} patients; both groups need at least one subject"
            )
        if n_patients < self.subtypes:
            raise ValueError(f"subtypes={self.subtypes} but only {n_patients} patients; each subtype needs one")
        if self.lesion_pattern == "regions" and self.n_patterns * self.lesion_regions > len(REGIONS):
            raise ValueError(
                f"subtypes={self.subtypes} with lesion_regions={self.lesion_regions} needs "
                f"{self.n_patterns * self.lesion_regions} distinct regions; there are {len(REGIONS)}"
            )
        if self.lesion_pattern == "foci" and not 1 <= self.subtypes <= self.lesion_pool:
            raise ValueError(
                f"lesion_pattern=foci gives subtype k k foci in distinct regions of the pool: it needs "
                f"1 <= subtypes <= lesion_pool (subtypes={self.subtypes}, lesion_pool={self.lesion_pool})"
            )
        if self.lesion_course == "age" and (self.subtypes != 2 or self.lesion_pattern != "regions"):
            raise ValueError(
                f"lesion_course=age contrasts a progressive subtype 1 with a static subtype 2: it needs subtypes=2 "
                f"and lesion_pattern=regions (subtypes={self.subtypes}, lesion_pattern={self.lesion_pattern})"
            )
        if self.atrophy == "shrink" and self.lesion_space == "subject":
            raise ValueError("atrophy=shrink warps the anatomy: it needs lesion_space=template")
        if self.confound > 0 and self.sites < 2:
            raise ValueError(f"confound={self.confound} needs at least 2 sites (sites={self.sites})")
        return self

    @property
    def n_patterns(self) -> int:
        """Distinct lesion patterns: one per subtype, or one shared by all patients when ``subtypes=0``."""
        return max(self.subtypes, 1)

    def pattern_regions(self) -> list[list[tuple[str, tuple[float, float, float]]]]:
        """The regions (name, MNI centre) each pattern can hit: consecutive runs of :data:`REGIONS`, or, for
        foci, the pool for every subtype, and with ``lesion_course=age`` the first run for both subtypes."""
        if self.lesion_pattern == "foci":
            return [list(REGIONS[: self.lesion_pool])] * self.n_patterns
        m = self.lesion_regions
        if self.lesion_course == "age":
            return [list(REGIONS[:m])] * self.n_patterns
        return [list(REGIONS[k * m : (k + 1) * m]) for k in range(self.n_patterns)]

    def lesion_sites(self) -> list[tuple[str, tuple[float, float, float]]]:
        """Every distinct region that a pattern can hit, in :data:`REGIONS` order: ``lesion{r}_*`` of the truth."""
        return list(dict.fromkeys(region for regions in self.pattern_regions() for region in regions))

    @property
    def per_subject_lesions(self) -> bool:
        """Whether each subject's lesions are drawn (position, focus, shape, course) and written per region."""
        return (self.lesion_pattern != "regions" or self.lesion_jitter > 0 or self.atrophy != "loss"
                or self.lesion_course != "constant")

    @classmethod
    def from_options(cls, **options: Any) -> "SynthConfig":
        """Build a config from user options; a bad value raises one ConfigError naming each field and value."""
        try:
            return cls(**options)
        except ValidationError as error:
            problems = []
            for problem in error.errors():
                message = problem["msg"].removeprefix("Value error, ")
                if problem["loc"]:
                    field = problem["loc"][0]
                    message = f"{field}={options.get(field)!r}: {message}"
                problems.append(message)
            raise ConfigError("invalid synthetic cohort options: " + "; ".join(problems)) from None


class Grid(NamedTuple):
    """The output voxel grid and the template resampled onto it."""

    affine: np.ndarray  # (4, 4) voxel -> MNI mm
    shape: tuple[int, int, int]
    gm: np.ndarray  # GM template on the grid, float32 in [0, 1]
    brain: np.ndarray  # brain probability on the grid, float32 in [0, 1]
    world: np.ndarray  # (3, *shape) MNI mm of each voxel centre, float32
    control_basis: tuple[np.ndarray, ...]  # per axis, (n voxels, n control points) spline interpolation


NILEARN_GM_FILE = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
NILEARN_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
NILEARN_BRAIN_THRESHOLD = 0.2


@functools.lru_cache(maxsize=1)
def _templates_1mm() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GM template, brain mask (both float32, 1 mm) and their affine, from nilearn's packaged files.

    Identical to ``nilearn.datasets.load_mni152_gm_template(resolution=1)`` and
    ``load_mni152_brain_mask(resolution=1)`` (GM scaled to a maximum of 1; brain = T1 scaled
    to a maximum of 1, above 0.2), read directly because importing ``nilearn.datasets``
    (which pulls in scikit-learn) costs several seconds, more than generating a small cohort.
    """
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("neurocl synth needs nilearn's packaged MNI152 templates: pip install nilearn")
    data_dir = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    gm_img = nib.load(data_dir / NILEARN_GM_FILE)
    t1_img = nib.load(data_dir / NILEARN_T1_FILE)
    gm = np.asarray(gm_img.dataobj, dtype=np.float32)
    gm /= gm.max()
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    brain = (t1 > NILEARN_BRAIN_THRESHOLD * t1.max()).astype(np.float32)
    for array in (gm, brain):
        array.flags.writeable = False
    return gm, brain, gm_img.affine.copy()


def _grid_world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World (mm) coordinates of every voxel centre, shape (3, *shape)."""
    index = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3].astype(np.float32) @ index + affine[:3, 3:4].astype(np.float32)
    return world.reshape(3, *shape)


def _to_index(inverse_affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Voxel coordinates (3, N) of world points ``world`` (3, ...) under ``inverse_affine``."""
    return inverse_affine[:3, :3] @ world.reshape(3, -1) + inverse_affine[:3, 3:4]


def _sample(volume: np.ndarray, index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear values of ``volume`` at voxel coordinates ``index`` (3, N), zero outside, as ``shape``."""
    from scipy import ndimage

    values = ndimage.map_coordinates(volume, index, order=1, mode="constant", cval=0.0, prefilter=False)
    return values.reshape(shape).astype(np.float32)


def _control_basis(axis_mm: np.ndarray, axis: int) -> np.ndarray:
    """Cubic-spline interpolation matrix (len(axis_mm), control points) along one axis of the control grid.

    The spline is a tensor product, so interpolating the 3D control grid at the voxels of an
    axis-aligned grid is three small matrix products instead of a 3D ``map_coordinates``
    per component (which dominated the generation time).
    """
    from scipy import ndimage

    n_control = CONTROL_SHAPE[axis]
    position = (axis_mm - CONTROL_ORIGIN_MM[axis]) / CONTROL_SPACING_MM
    return np.stack(
        [ndimage.map_coordinates(unit, position[None], order=3, mode="nearest") for unit in np.eye(n_control)], axis=1
    )


@functools.lru_cache(maxsize=4)
def template_grid(resolution: float) -> Grid:
    """The MNI152 GM template and brain mask on an isotropic ``resolution`` mm grid.

    The grid covers the brain's bounding box plus an 8 mm margin, centred on it. The 1 mm
    template is first smoothed with a Gaussian of variance ``(r^2 - 1) / 12`` mm^2 (that of
    an ``r`` mm box minus the 1 mm source box), so each voxel holds a partial-volume GM
    fraction rather than an aliased sample.
    """
    from scipy import ndimage

    gm_1mm, brain_1mm, affine_1mm = _templates_1mm()
    inside = np.argwhere(brain_1mm > 0.5)
    low = affine_1mm[:3, :3] @ inside.min(0) + affine_1mm[:3, 3]
    high = affine_1mm[:3, :3] @ inside.max(0) + affine_1mm[:3, 3]
    shape = tuple(int(n) for n in np.floor((high - low + 2 * GRID_MARGIN_MM) / resolution) + 1)
    centre = (low + high) / 2
    affine = np.diag([resolution, resolution, resolution, 1.0])
    affine[:3, 3] = centre - (np.array(shape) - 1) * resolution / 2
    sigma = np.sqrt(max(resolution**2 - 1.0, 0.0) / 12.0)
    world = _grid_world(affine, shape)
    # Smoothing only the part of the 1 mm volume that the grid (plus the filter's reach) covers halves the cost.
    pad = int(np.ceil(GRID_MARGIN_MM + resolution + 4 * sigma))
    start = np.maximum(inside.min(0) - pad, 0)
    stop = inside.max(0) + pad + 1
    crop = tuple(slice(a, b) for a, b in zip(start, stop))
    crop_affine = affine_1mm.copy()
    crop_affine[:3, 3] = affine_1mm[:3, :3] @ start + affine_1mm[:3, 3]
    index = _to_index(np.linalg.inv(crop_affine), world)
    resampled = []
    for volume in (gm_1mm[crop], brain_1mm[crop]):
        smooth = ndimage.gaussian_filter(volume, sigma) if sigma > 0 else volume
        resampled.append(np.clip(_sample(smooth, index, shape), 0.0, 1.0))
    basis = tuple(
        _control_basis(affine[axis, axis] * np.arange(shape[axis]) + affine[axis, 3], axis) for axis in range(3)
    )
    grid = Grid(affine, shape, resampled[0], resampled[1], world, basis)
    for array in (grid.gm, grid.brain, grid.world, *grid.control_basis):
        array.flags.writeable = False
    return grid


def region_weight(world: np.ndarray, centre: tuple[float, float, float], size: float = 1.0) -> np.ndarray:
    """Flat-topped blob: 1 within ``8 size`` mm of ``centre``, raised-cosine taper to 0 at ``16 size`` mm.

    ``w(d) = 1`` for ``d <= c``, ``(1 + cos(pi (d - c) / c)) / 2`` for ``c < d < 2c``, 0 beyond,
    with ``c = 8 size`` mm.
    """
    distance = np.sqrt(((world - np.asarray(centre, dtype=np.float32).reshape(3, 1, 1, 1)) ** 2).sum(0))
    taper = (distance - size * REGION_CORE_MM) / (size * (REGION_RADIUS_MM - REGION_CORE_MM))
    weight = 0.5 * (1.0 + np.cos(np.pi * np.clip(taper, 0.0, 1.0)))
    return weight.astype(np.float32)


def pattern_weights(grid: Grid, config: SynthConfig) -> list[np.ndarray]:
    """Weight ``w_k`` (grid shape) of each lesion pattern: the sum of its regions' blobs (they never overlap)."""
    return [
        np.sum([region_weight(grid.world, centre, config.lesion_size) for _, centre in regions], axis=0).astype(np.float32)
        for regions in config.pattern_regions()
    ]


def subtype_masks(grid: Grid, config: SynthConfig) -> list[np.ndarray]:
    """Binary masks (bool, grid shape) of where each pattern's loss is planted: GM in the brain with ``w_k >= 0.5``.

    With ``lesion_size`` below 1 at a coarse resolution a mask can hold very few voxels (or
    none: a region smaller than a voxel); ``regions.tsv`` says how many.
    """
    tissue = (grid.gm >= MASK_GM_THRESHOLD) & (grid.brain >= 0.5)
    return [(weight >= REGION_MASK_WEIGHT) & tissue for weight in pattern_weights(grid, config)]


def age_weight(grid: Grid, config: SynthConfig) -> np.ndarray | None:
    """Spatial weight of the age GM loss: None (global) or ``2 r(x)``, ``r`` the brain's posterior-to-anterior ramp.

    ``r(x) = (y - y_back) / (y_front - y_back)`` clipped to [0, 1], with ``y_back``/``y_front`` the
    extreme MNI y (mm) of the template's brain mask; the loss averages about the global one
    but is none at the occipital pole and twice it at the frontal pole, so it survives the
    per-subject intensity normalisation that removes a global loss.
    """
    if config.age_pattern == "global":
        return None
    y = grid.world[1]
    inside = y[grid.brain >= 0.5]
    ramp = np.clip((y - inside.min()) / (inside.max() - inside.min()), 0.0, 1.0)
    return (2.0 * ramp).astype(np.float32)


def _site_parameters(config: SynthConfig, rng: np.random.Generator) -> pd.DataFrame:
    """Per-site intensity scale, smoothing FWHM (mm) and noise SD, spread evenly then shuffled.

    Evenly spread values (rather than independent draws) guarantee that sites really differ
    whatever the seed; the shuffle decouples the three properties.
    """
    spread = np.linspace(0.0, 1.0, config.sites)
    return pd.DataFrame(
        {
            "site": [f"site-{k + 1}" for k in range(config.sites)],
            "site_scale": 1.0 + config.site_effect * 0.05 * (2.0 * rng.permutation(spread) - 1.0 if config.sites > 1 else 0.0),
            "site_smoothing": config.site_effect * 6.0 * rng.permutation(spread),
            "site_noise": 0.01 + config.site_effect * 0.03 * rng.permutation(spread),
        }
    )


def _assign_sites(diagnosis: np.ndarray, config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Site index of each subject; with probability ``confound`` drawn from its group's own sites.

    Sites ``1..floor(S/2)`` are the control sites and the rest the patient sites. With
    ``confound = 0`` every site is equally likely for everyone (site independent of
    diagnosis); with ``confound = 1`` controls and patients never share a site.
    """
    n_control_sites = config.sites // 2
    own_low = np.where(diagnosis == "patient", n_control_sites, 0)
    own_high = np.where(diagnosis == "patient", config.sites, max(n_control_sites, 1))
    own_site = rng.integers(own_low, own_high)
    any_site = rng.integers(0, config.sites, size=len(diagnosis))
    return np.where(rng.random(len(diagnosis)) < config.confound, own_site, any_site)


def draw_latents(config: SynthConfig) -> pd.DataFrame:
    """Every latent factor of every subject (the ground truth), from ``config.seed``."""
    rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(1)[0])
    n = config.n_subjects
    n_patients = round(config.patient_fraction * n)
    diagnosis = rng.permutation(np.array(["patient"] * n_patients + ["control"] * (n - n_patients)))
    is_patient = diagnosis == "patient"
    sites = _site_parameters(config, rng)
    site_index = _assign_sites(diagnosis, config, rng)
    age = rng.uniform(20.0, 80.0, n)
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    head_noise = HEAD_LOG_SCALE_SD * config.head_size_noise * rng.standard_normal(n)
    head_scale = np.exp(np.where(sex == "M", 1.0, -1.0) * SEX_HEAD_LOG_SCALE * config.sex_effect + head_noise)
    # Balanced subtypes (as equal as the count allows) keep every subtype recoverable.
    subtype = np.zeros(n, dtype=int)
    subtype[is_patient] = rng.permutation(np.arange(n_patients) % config.n_patterns + 1)
    if config.subtypes == 0:
        # One pattern and a continuum of severity reaching 0: no gap between mild patients and controls.
        severity = np.where(is_patient, rng.uniform(0.0, 10.0, n), 0.0)
    else:
        severity = np.where(is_patient, 2.0 + 8.0 * rng.beta(2.0, 2.0, n), 0.0)
    deformation = config.deformation * rng.uniform(1.0, 3.0, n)
    width = max(4, len(str(n)))
    latents = pd.DataFrame(
        {
            "participant_id": [f"sub-{i + 1:0{width}d}" for i in range(n)],
            "group": np.where(is_patient, "target", "background"),
            "diagnosis": diagnosis,
            "age": age,
            "sex": sex,
            "site": sites["site"].to_numpy()[site_index],
            "subtype": subtype,
            "severity": severity,
            "head_scale": head_scale,
            "site_scale": sites["site_scale"].to_numpy()[site_index],
            "site_smoothing": sites["site_smoothing"].to_numpy()[site_index],
            "site_noise": sites["site_noise"].to_numpy()[site_index],
            "deformation_amplitude": deformation,
            "age_gm_loss": config.age_effect * AGE_LOSS_PER_DECADE * (age - 20.0) / 10.0,
            "ventricle_expansion": config.age_effect * VENTRICLE_EXPANSION_PER_YEAR * (age - 20.0),
            "subtype_gm_loss": config.subtype_effect * MAX_SUBTYPE_LOSS * severity / 10.0,
        }
    )
    if config.per_subject_lesions:
        latents = _lesion_latents(config, latents, rng)
    return latents


def _lesion_latents(config: SynthConfig, latents: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """``latents`` with each subject's lesion at every site of :meth:`SynthConfig.lesion_sites`.

    Per site ``r``: ``lesion{r}_x_mm``/``_y_mm``/``_z_mm``, the centre (MNI mm, jittered), and
    ``lesion{r}_effect``, the GM loss fraction (``atrophy=loss``) or the contraction magnitude
    (``shrink``) at the core, 0 where the subject has no lesion. ``subtype_gm_loss`` becomes the
    patient's whole loss (with the age factor of ``lesion_course=age``; 0 when it shrinks instead,
    ``subtype_shrinkage`` then holds the magnitude). Drawn after every other factor, so that a cohort
    without these options is the same as before they existed.
    """
    sites = config.lesion_sites()
    site_index = {site: r for r, site in enumerate(sites)}
    subtype = latents.subtype.to_numpy()
    full = MAX_SUBTYPE_SHRINK if config.atrophy == "shrink" else MAX_SUBTYPE_LOSS
    depth = config.subtype_effect * full * latents.severity.to_numpy() / 10.0
    if config.lesion_course == "age":
        depth = np.where(subtype == 1, depth * (latents.age.to_numpy() - 20.0) / COURSE_AGE_SPAN, depth)
    effect = np.zeros((len(latents), len(sites)))
    for i in np.flatnonzero(subtype > 0):
        k = subtype[i]
        if config.lesion_pattern == "foci":
            # k foci share the loss, so every site's expected loss is the same for every subtype.
            effect[i, rng.choice(len(sites), size=k, replace=False)] = depth[i] / k
        else:
            effect[i, [site_index[site] for site in config.pattern_regions()[k - 1]]] = depth[i]
    jitter, shape = config.lesion_jitter, (len(latents), len(sites), 3)
    offset = rng.uniform(-jitter, jitter, size=shape) if jitter > 0 else np.zeros(shape)
    columns = {}
    for r, (_, centre) in enumerate(sites):
        for axis, name in enumerate("xyz"):
            columns[f"lesion{r + 1}_{name}_mm"] = centre[axis] + offset[:, r, axis]
        columns[f"lesion{r + 1}_effect"] = effect[:, r]
    latents = latents.assign(subtype_gm_loss=0.0 if config.atrophy == "shrink" else depth)
    if config.atrophy == "shrink":
        latents["subtype_shrinkage"] = depth
    return pd.concat([latents, pd.DataFrame(columns, index=latents.index)], axis=1)


class LesionPlan(NamedTuple):
    """How a subject's per-site lesions (:func:`_lesion_latents`) are planted."""

    n_sites: int
    size: float  # lesion_size
    atrophy: str  # loss | shrink


def _subject_sites(subject: Any, plan: LesionPlan) -> list[tuple[np.ndarray, float]]:
    """(centre (3,) mm, effect) of each site where the subject has a lesion."""
    sites = []
    for r in range(1, plan.n_sites + 1):
        effect = float(getattr(subject, f"lesion{r}_effect"))
        if effect > 0:
            centre = np.array([getattr(subject, f"lesion{r}_{axis}_mm") for axis in "xyz"], dtype=np.float32)
            sites.append((centre, effect))
    return sites


def _shrink(point: np.ndarray, centre: np.ndarray, magnitude: float, width: float) -> np.ndarray:
    """Radial contraction about ``centre``: a point at distance r shows the template at r (1 + m g(r)).

    ``g(r) = exp(-r^2 / (2 width^2))``: the structure at the centre appears ``1 + m`` times smaller and its
    surroundings move in; monotone (no folding) while ``m < e`` (about 2.72; at most 1 here).
    """
    offset = point - centre.reshape(3, 1, 1, 1)
    falloff = np.exp(-0.5 * (offset**2).sum(0) / width**2)
    return centre.reshape(3, 1, 1, 1) + offset * (1.0 + magnitude * falloff)


def _warp(grid: Grid, subject: Any, rng: np.random.Generator) -> np.ndarray:
    """Template point (3, *shape) that each subject voxel shows: deformation, head size, ventricles."""
    control = rng.normal(0.0, subject.deformation_amplitude, size=(3, *CONTROL_SHAPE))
    displacement = np.einsum("ia,jb,kc,dabc->dijk", *grid.control_basis, control, optimize=True)
    point = grid.world + displacement
    point = HEAD_CENTRE_MM.reshape(3, 1, 1, 1) + (point - HEAD_CENTRE_MM.reshape(3, 1, 1, 1)) / subject.head_scale
    # Radial expansion about the ventricles: a point at distance r shows the template at
    # r (1 - e g(r)); monotone (no folding) because e < 1.
    offset = point - VENTRICLE_CENTRE_MM.reshape(3, 1, 1, 1)
    falloff = np.exp(-0.5 * ((offset / VENTRICLE_WIDTH_MM.reshape(3, 1, 1, 1)) ** 2).sum(0))
    return VENTRICLE_CENTRE_MM.reshape(3, 1, 1, 1) + offset * (1.0 - subject.ventricle_expansion * falloff)


def subject_volume(
    grid: Grid,
    subject: Any,
    region_weights: list[np.ndarray],
    seed: np.random.SeedSequence,
    age_weights: np.ndarray | None = None,
    lesion_space: str = "template",
    plan: LesionPlan | None = None,
) -> np.ndarray:
    """One subject's GM map (float32, grid shape, values in [0, 1]) from its latent factors.

    ``subject`` is a row of :func:`draw_latents` (attribute access, e.g. from ``itertuples``);
    ``seed`` drives its deformation and noise, so a subject does not depend on the others.
    ``region_weights`` are :func:`pattern_weights`, ``age_weights`` :func:`age_weight` (None:
    global loss); ``lesion_space`` "subject" plants the loss after the warp. With ``plan`` the
    lesions are the subject's own ``lesion{r}_*`` sites instead of ``region_weights``.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    if age_weights is None:
        tissue = grid.gm * np.float32(1.0 - subject.age_gm_loss)
    else:
        tissue = grid.gm * np.clip(1.0 - np.float32(subject.age_gm_loss) * age_weights, 0.0, 1.0)
    lesion = None
    sites = [] if plan is None else _subject_sites(subject, plan)
    if plan is not None and plan.atrophy == "loss" and sites:
        loss = np.sum([effect * region_weight(grid.world, centre, plan.size) for centre, effect in sites], axis=0)
        lesion = np.clip(1.0 - loss, 0.0, 1.0).astype(np.float32)
    elif plan is None and subject.subtype > 0:
        lesion = 1.0 - np.float32(subject.subtype_gm_loss) * region_weights[subject.subtype - 1]
        lesion = np.clip(lesion, 0.0, 1.0)
    if lesion is not None and lesion_space == "template":
        tissue = tissue * lesion
    point = _warp(grid, subject, rng)
    if plan is not None and plan.atrophy == "shrink":
        for centre, magnitude in sites:
            point = _shrink(point, centre, magnitude, SHRINK_WIDTH_MM * plan.size)
    index = _to_index(np.linalg.inv(grid.affine), point)
    volume = _sample(tissue, index, grid.shape)
    if lesion is not None and lesion_space == "subject":
        volume = volume * lesion
    brain = _sample(grid.brain, index, grid.shape) >= 0.5
    sigma_voxels = subject.site_smoothing * FWHM_TO_SIGMA / (grid.affine[0, 0])
    if sigma_voxels > 0:
        volume = ndimage.gaussian_filter(volume, sigma_voxels)
    noise = rng.normal(0.0, subject.site_noise, size=volume.shape).astype(np.float32)
    volume = subject.site_scale * volume + noise * brain
    return np.clip(volume, 0.0, 1.0).astype(np.float32)


def _nifti(array: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=4)  # 4 = MNI152 space
    image.set_sform(affine, code=4)
    return image


def _participants(latents: pd.DataFrame) -> pd.DataFrame:
    """What a user would have: the clinical table, age and severity recorded to 0.1."""
    return pd.DataFrame(
        {
            "participant_id": latents.participant_id,
            "diagnosis": latents.diagnosis,
            "age": latents.age.round(1),
            "sex": latents.sex,
            "site": latents.site,
            "severity": latents.severity.round(1).where(latents.diagnosis == "patient"),
        }
    )


def _cohort_yaml(name: str) -> str:
    import yaml

    spec = {
        "name": name,
        "participants": SynthDir.PARTICIPANTS,
        "root": ".",
        "images": SynthDir.IMAGES,
        "group": {"column": "diagnosis", "background": ["control"], "target": ["patient"]},
        "attributes": {"age": "continuous", "sex": "categorical", "site": "categorical", "severity": "continuous"},
        "ground_truth": SynthDir.GROUND_TRUTH,
    }
    return yaml.safe_dump(spec, sort_keys=False)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        kind = "a folder that is not empty" if out_dir.is_dir() else "a file"
        raise ConfigError(f"output folder {out_dir} is {kind}; give a new or empty folder")


# Config JSON -> (grid, pattern weights, age weights, lesion space, lesion plan), filled by the parent before
# forking workers.
_SUBJECT_CONTEXT: dict[str, tuple[Grid, list[np.ndarray], np.ndarray | None, str, LesionPlan | None]] = {}


def _worker_count(workers: int | None, n_jobs: int) -> int:
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    # fork is what lets workers share the template grid; elsewhere generate in-process.
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(workers, n_jobs // 8 or 1))


def _write_subject(job) -> None:
    key, subject, seed, out_dir = job
    grid, region_weights, age_weights, lesion_space, plan = _SUBJECT_CONTEXT[key]
    volume = subject_volume(grid, subject, region_weights, seed, age_weights, lesion_space, plan)
    path = SynthDir(out_dir).image(subject.participant_id)
    io.save_nifti(_nifti(volume, grid.affine), path)


def make_synthetic_cohort(
    out_dir: str | Path, config: SynthConfig | None = None, progress: bool = False, workers: int | None = None
) -> Path:
    """Write a synthetic cohort with known ground truth to ``out_dir``; return its ``cohort.yaml``.

    Parameters
    ----------
    out_dir : path
        New or empty folder.
    config : SynthConfig, optional
        Options (defaults: 200 subjects, 2 subtypes, 3 sites, 4 mm).
    progress : bool
        Show a progress bar over subjects.
    workers : int, optional
        Processes that synthesise subjects in parallel (default: one per CPU core, at most 8).
        Each subject has its own seed, so the cohort is identical whatever the number of workers.

    Returns
    -------
    Path
        ``out_dir/cohort.yaml``, written last so that a folder without it is incomplete.

    Raises
    ------
    ConfigError
        If ``out_dir`` is a file or a non-empty folder.
    """
    config = config or SynthConfig()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    grid = template_grid(config.resolution)
    latents = draw_latents(config)
    key = config.model_dump_json()
    _SUBJECT_CONTEXT.clear()  # one cohort's arrays at a time
    plan = None
    if config.per_subject_lesions:
        plan = LesionPlan(len(config.lesion_sites()), config.lesion_size, config.atrophy)
    _SUBJECT_CONTEXT[key] = (grid, pattern_weights(grid, config), age_weight(grid, config), config.lesion_space, plan)
    subject_seeds = np.random.SeedSequence(config.seed).spawn(config.n_subjects + 1)[1:]
    jobs = [
        (key, SimpleNamespace(**subject), seed, str(out_dir))
        for subject, seed in zip(latents.to_dict("records"), subject_seeds)
    ]
    workers = _worker_count(workers, len(jobs))

    from rich.progress import Progress

    

    from neurocl.logs import progress_console

    with Progress(disable=not progress, transient=False, console=progress_console()) as bar:
        task = bar.add_task("synthesising subjects", total=len(latents))
        if workers == 1:
            for job in jobs:
                _write_subject(job)
                bar.advance(task)
        else:
            # Forked workers inherit the template grid and weights built above instead of rebuilding them.
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for _ in pool.map(_write_subject, jobs, chunksize=4):
                    bar.advance(task)

    folder = SynthDir(out_dir)
    io.save_nifti(_nifti((grid.brain >= 0.5).astype(np.uint8), grid.affine), folder.brain_mask)
    masks = subtype_masks(grid, config)
    for k, mask in enumerate(masks, start=1):
        io.save_nifti(_nifti(mask.astype(np.uint8), grid.affine), folder.subtype_mask(k))
    tissue = (grid.gm >= MASK_GM_THRESHOLD) & (grid.brain >= 0.5)
    rows = [
        {
            "subtype": k,
            "region": name,
            "x_mm": centre[0],
            "y_mm": centre[1],
            "z_mm": centre[2],
            "n_voxels": int(((region_weight(grid.world, centre, config.lesion_size) >= REGION_MASK_WEIGHT) & tissue).sum()),
        }
        for k, regions in enumerate(config.pattern_regions(), start=1)
        for name, centre in regions
    ]
    regions = pd.DataFrame(rows, columns=["subtype", "region", "x_mm", "y_mm", "z_mm", "n_voxels"])
    io.write_tsv(folder.regions, regions)
    io.write_tsv(folder.ground_truth, latents)
    io.write_tsv(folder.participants, _participants(latents))
    io.write_json(
        folder.description,
        {
            "Name": f"neurocl synthetic cohort (seed {config.seed})",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "neurocl synth", "Version": _neurocl_version()}],
            "SynthConfig": config.model_dump(),
        },
    )
    return io.write_text(folder.cohort_yaml, _cohort_yaml(f"synthetic-seed{config.seed}"))


def _neurocl_version() -> str:
    try:
        return version("neurocl")
    except PackageNotFoundError:
        return "unknown"
