"""The separation benchmark's panel: cohorts with known ground truth, each stressing one failure.

Every cohort says which of its attributes every subject has (``shared``: a common space should
hold them and a salient space should not) and which only the target subjects have
(``specific``: the salient space should hold them). Values are read from the cohort's
``ground_truth.tsv`` (full precision; the subtype is there even though ``participants.tsv`` does
not give it, as in a real study). ``docs/benchmarks-separation.md`` describes each cohort.

The synthetic cohorts start from the demo cohort's generator settings
(:data:`neurocl.demo.DEMO_COHORT`: stronger subtype loss, weaker deformation than the
generator's defaults) and change one thing each (``reference-hard``: the effect sizes together);
``natural-digits`` is built from real images that scikit-learn ships (:mod:`neurocl.validation.natural`).
``reference-hard``, ``focal-jitter``, ``shrink-foci`` and ``age-interaction`` are built so that a linear
readout of the voxels misses the subtype; :mod:`neurocl.validation.oracles` checks that it is there.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from neurocl import io
from neurocl.errors import ConfigError
from neurocl.synth import SynthConfig, make_synthetic_cohort
from neurocl.synthdir import SynthDir
from neurocl.validation.natural import NaturalConfig, make_natural_cohort

# The demo cohort's generator settings (neurocl.demo.DEMO_COHORT) minus size, grid and seed,
# which the panel's scale and the seed set. Spelled here rather than imported so that the panel
# does not import the pipeline (the run path imports the validation package, not the reverse).
DEMO_GENERATOR = {"subtypes": 2, "sites": 3, "subtype_effect": 2.5, "deformation": 0.25}

SYNTHETIC_SHARED = {"age": "continuous", "sex": "categorical", "site": "categorical"}
SYNTHETIC_SPECIFIC = {"subtype": "categorical", "severity": "continuous"}

# The "independent" cohort renames what a user's table would call its columns and values.
RENAMED_COLUMNS = {"diagnosis": "dx", "age": "AGE", "sex": "gender", "site": "scanner", "severity": "score"}
RENAMED_GROUPS = {"control": "HC", "patient": "PT"}


@dataclass(frozen=True)
class PanelCohort:
    """One cohort of the panel.

    Attributes
    ----------
    name : short name (a folder name)
    stress : the failure it provokes, in a sentence
    options : ``SynthConfig`` fields over :data:`DEMO_GENERATOR` (synthetic) or ``NaturalConfig`` fields
    shared, specific : ground-truth column -> "continuous" / "categorical"
    natural : built by :mod:`neurocl.validation.natural` instead of ``neurocl synth``
    rename : give the participants table other column names and group labels
    """

    name: str
    stress: str
    options: dict = field(default_factory=dict)
    shared: dict = field(default_factory=lambda: dict(SYNTHETIC_SHARED))
    specific: dict = field(default_factory=lambda: dict(SYNTHETIC_SPECIFIC))
    natural: bool = False
    rename: bool = False


PANEL: tuple[PanelCohort, ...] = (
    PanelCohort("reference", "none: the demo cohort's generator settings (what the demo was tuned on), other seeds"),
    PanelCohort("lesion-subject", "the loss is planted after the warp, at fixed image voxels, not on the anatomy",
                {"lesion_space": "subject"}),
    PanelCohort("age-gradient", "ageing is an anterior-posterior gradient, which per-subject z-scoring keeps",
                {"age_pattern": "gradient"}),
    PanelCohort("sex-headsize", "head size is a near-perfect readout of sex (brain extent differs ~20 %)",
                {"sex_effect": 4.0, "head_size_noise": 0.25}),
    PanelCohort("site-confound", "site and diagnosis are confounded (75 % of subjects at their group's own sites)",
                {"confound": 0.75}),
    PanelCohort("small-regions", "each subtype's loss is spread over 3 small regions (radii x 0.75)",
                {"lesion_regions": 3, "lesion_size": 0.75}),
    PanelCohort("continuum", "no subtypes: one pattern with a continuous severity down to 0 (unimodal patients)",
                {"subtypes": 0}, specific={"severity": "continuous"}),
    PanelCohort("independent", "what a new user brings: other column names, 2 regions per subtype, "
                "an age gradient and a site confound together",
                {"lesion_regions": 2, "age_pattern": "gradient", "confound": 0.5}, rename=True),
    PanelCohort("reference-hard", "a subtle subtype loss under strong covariates (age, site, individual "
                "deformation): linear methods no longer read the subtype perfectly",
                {"subtype_effect": 1.0, "age_effect": 2.0, "site_effect": 2.0, "deformation": 1.0}),
    PanelCohort("focal-jitter", "subtype k is k foci in regions drawn per patient from a pool of 4, each moved "
                "up to 10 mm per axis: equal subtype mean images, so no linear readout of voxels tells them apart",
                {"lesion_pattern": "foci", "lesion_pool": 4, "lesion_jitter": 10.0}),
    PanelCohort("shrink-foci", "atrophy by warping (regions contract, GM values kept), subtype k is k shrinking "
                "regions of a pool of 4: a shape change with equal subtype mean images",
                {"lesion_pattern": "foci", "lesion_pool": 4, "atrophy": "shrink"}),
    PanelCohort("age-interaction", "an age x diagnosis interaction: subtype 1's region loses GM faster with age, "
                "subtype 2's has the same mean loss at every age: only the interaction tells them apart",
                {"lesion_course": "age", "subtype_effect": 1.25}),
    PanelCohort("natural-digits", "real images: photographs (scikit-learn), real handwritten digits blended into "
                "the targets", natural=True,
                shared={"photo": "categorical", "crop_row": "continuous", "gamma": "continuous"},
                specific={"digit": "categorical", "strength": "continuous"}),
)


def panel_cohort(name: str) -> PanelCohort:
    """The panel cohort called ``name`` (ConfigError listing the names otherwise)."""
    for cohort in PANEL:
        if cohort.name == name:
            return cohort
    raise ConfigError(f"no panel cohort {name!r}; the panel has {[cohort.name for cohort in PANEL]}")


@dataclass(frozen=True)
class PanelScale:
    """How big the panel's cohorts are: subjects, synthetic voxel size, natural image size."""

    n_subjects: int
    resolution: float
    patch: int = 64


def build_cohort(cohort: PanelCohort, out_dir: str | Path, scale: PanelScale, seed: int, workers: int | None = 1) -> Path:
    """Write ``cohort`` at ``scale`` with cohort seed ``seed`` into ``out_dir`` (new or empty); return its cohort.yaml."""
    out_dir = Path(out_dir)
    if cohort.natural:
        config = NaturalConfig(n_subjects=scale.n_subjects, patch=scale.patch, seed=seed, **cohort.options)
        spec = make_natural_cohort(out_dir, config)
        _declare_ground_truth(out_dir)
        return spec

    options = {**DEMO_GENERATOR, **cohort.options, "n_subjects": scale.n_subjects,
               "resolution": scale.resolution, "seed": seed}
    spec = make_synthetic_cohort(out_dir, SynthConfig.from_options(**options), workers=workers)
    if cohort.rename:
        _rename(out_dir)
    return spec


def _declare_ground_truth(folder: Path) -> None:
    """Name the folder's ground_truth.tsv in its cohort.yaml, so the pipeline probes and clusters its factors."""
    files = SynthDir(folder)
    spec = io.load_yaml(files.cohort_yaml, ConfigError, "cohort spec")
    spec.setdefault("ground_truth", SynthDir.GROUND_TRUTH)
    io.write_text(files.cohort_yaml, yaml.safe_dump(spec, sort_keys=False))


def _rename(folder: Path) -> None:
    """Other column names and group labels in participants.tsv and cohort.yaml (ground_truth.tsv keeps its own)."""
    files = SynthDir(folder)
    participants = io.read_tsv(files.participants)
    participants["diagnosis"] = participants["diagnosis"].map(RENAMED_GROUPS)
    io.write_tsv(files.participants, participants.rename(columns=RENAMED_COLUMNS))
    spec = io.load_yaml(files.cohort_yaml, ConfigError, "cohort spec")
    spec["group"] = {"column": RENAMED_COLUMNS["diagnosis"], "background": [RENAMED_GROUPS["control"]],
                     "target": [RENAMED_GROUPS["patient"]]}
    spec["attributes"] = {RENAMED_COLUMNS.get(name, name): kind for name, kind in spec["attributes"].items()}
    io.write_text(files.cohort_yaml, yaml.safe_dump(spec, sort_keys=False))


def run_panel(cohorts: list[str], seeds: list[int], workdir: Path | None, bench: str,
              run_one: Callable[["PanelCohort", int, Path], dict], log=None) -> list[dict]:
    """``run_one(cohort, seed, workdir)`` for every cohort x seed, in a temporary folder unless ``workdir``.

    The one walk over the panel of the benches (``neurocl bench separation``, ``bench oracles``);
    ``bench`` names them in progress lines and in the temporary folder's name.
    """
    cleanup = workdir is None
    folder = Path(tempfile.mkdtemp(prefix=f"neurocl-bench-{bench}-")) if cleanup else workdir
    folder.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for name in cohorts:
            for seed in seeds:
                if log:
                    log(f"bench {bench}: {name}, seed {seed}")
                runs.append(run_one(panel_cohort(name), seed, folder))
    finally:
        if cleanup:
            shutil.rmtree(folder, ignore_errors=True)
    return runs
