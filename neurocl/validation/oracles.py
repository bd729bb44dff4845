"""``neurocl bench oracles``: is a panel cohort's patient signal really there, and do linear methods miss it?

A cohort built to defeat linear contrastive analysis proves two things, on held-out subjects:

* **the signal is there**: an *oracle* feature, computed from the images and the ground truth, decodes
  the target-only attributes. Per lesion site ``r`` of the cohort (``SynthConfig.lesion_sites``) and
  subject ``i``, the deficit is a box mean at the site's known (for ``lesion_jitter``: jittered) centre
  ``c_ir``, taken relative to the mean image ``m`` of the fitting controls::

      d_ir = sum_x w(x; c_ir) (m(x) - v_i(x)) / sum_x w(x; c_ir)

  with ``w`` the generator's own region blob (:func:`neurocl.synth.region_weight`) and ``v_i`` the
  subject's preprocessed volume. The features are the deficits, sorted per subject for
  ``lesion_pattern=foci`` (which sites are hit is random; how many tells the subtype), and, for
  ``lesion_course=age``, the mean deficit ``d``, the centred age ``a = (age - 50) / 30``, the
  severity ``s`` and the products ``d a``, ``s a`` (subtype 1's loss grows with age, subtype 2's
  does not);
* **linear methods miss it**: PCA and contrastive PCA of the masked voxels (the pipeline's own
  baselines, :func:`neurocl.baselines.voxel_embeddings`, 16 components, fitted on the training
  subjects) give features whose linear probe is near chance.

Every representation is scored by the separation bench's probe (:func:`score_representations`:
fitted on ``train``/``val``, scored on ``test``), with the splits the pipeline makes (holdout 70/10/20,
stratified by group, split seed = the seed) and the demo's preprocessing (automatic mask, z-score,
crop), on cohort seed ``1000 + seed`` as in ``neurocl bench separation``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table

from neurocl.baselines import voxel_embeddings
from neurocl.cohort import Cohort
from neurocl.cohort.splits import make_splits
from neurocl.errors import ConfigError
from neurocl.store import PreprocessConfig, VolumeStore
from neurocl.synth import SynthConfig, region_weight
from neurocl.synthdir import SynthDir
from neurocl.validation.panel import PanelCohort, PanelScale, build_cohort, panel_cohort, run_panel
from neurocl.validation.separation import COHORT_SEED_OFFSET, machine_description, score_representations

ORACLE_COHORTS = ("reference", "reference-hard", "focal-jitter", "shrink-foci", "age-interaction")
REPRESENTATIONS = ("oracle", "pca", "cpca")
N_COMPONENTS = 16
AGE_CENTRE, AGE_HALF_RANGE = 50.0, 30.0


class OracleBenchConfig(BaseModel):
    """What ``neurocl bench oracles`` runs: panel cohorts x seeds at one scale."""

    model_config = ConfigDict(extra="forbid")

    cohorts: list[str] = Field(list(ORACLE_COHORTS), min_length=1, description="synthetic panel cohorts")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="seeds: cohort seed 1000 + seed, split seed")
    n_subjects: int = Field(160, ge=16, description="subjects per cohort (the separation bench's default)")
    resolution: float = Field(8.0, ge=4.0, le=16.0, description="voxel size in mm (the separation bench's default)")
    workdir: Path | None = Field(None, description="keep the cohorts here (default: a temporary folder)")

    @classmethod
    def checked(cls, **options) -> "OracleBenchConfig":
        try:
            config = cls(**{key: value for key, value in options.items() if value is not None})
        except Exception as error:  # pydantic's message names the field
            raise ConfigError(f"bench oracles: {error}") from None
        for name in config.cohorts:
            if panel_cohort(name).natural:
                raise ConfigError(f"bench oracles --cohorts: {name} is not synthetic; oracles need a synthetic cohort")
        return config


def cohort_config(folder: Path) -> SynthConfig:
    """The generator options a synthetic cohort folder was made with (its dataset_description.json)."""
    description = SynthDir(folder).description
    try:
        return SynthConfig(**json.loads(description.read_text())["SynthConfig"])
    except (OSError, KeyError, ValueError) as error:
        raise ConfigError(f"{description}: no usable SynthConfig ({error})") from None


def site_centres(truth: pd.DataFrame, config: SynthConfig) -> np.ndarray:
    """(subjects, sites, 3) centre in mm of every lesion site: the truth's jittered ones, else the fixed ones."""
    sites = config.lesion_sites()
    if config.per_subject_lesions:
        return np.stack([truth[[f"lesion{r}_{axis}_mm" for axis in "xyz"]].to_numpy(float)
                         for r in range(1, len(sites) + 1)], axis=1)
    fixed = np.array([centre for _, centre in sites], dtype=float)
    return np.broadcast_to(fixed, (len(truth), *fixed.shape))


def lesion_deficits(volumes: np.ndarray, affine: np.ndarray, centres: np.ndarray, reference: np.ndarray,
                    size: float) -> np.ndarray:
    """(subjects, sites) deficit ``d_ir`` (module docstring) of ``volumes`` (subjects, *spatial) below ``reference``."""
    index = np.indices(volumes.shape[1:], dtype=np.float32).reshape(3, -1)
    world = (affine[:3, :3] @ index + affine[:3, 3:4]).reshape(3, *volumes.shape[1:]).astype(np.float32)
    deficits = np.zeros(centres.shape[:2])
    below = reference[None] - volumes
    for i in range(len(volumes)):
        for r in range(centres.shape[1]):
            weight = region_weight(world, tuple(centres[i, r]), size)
            deficits[i, r] = float((weight * below[i]).sum() / max(weight.sum(), 1e-12))
    return deficits


def oracle_inputs(config: SynthConfig) -> set[str]:
    """Ground-truth attributes the oracle reads as features: its score of them is not reported."""
    return {"age", "severity"} if config.lesion_course == "age" else set()


def oracle_features(deficits: np.ndarray, truth: pd.DataFrame, config: SynthConfig) -> np.ndarray:
    """The oracle's features (module docstring) from the deficits and the truth."""
    if config.lesion_pattern == "foci":
        return -np.sort(-deficits, axis=1)
    if config.lesion_course == "age":
        deficit = deficits.mean(axis=1)
        age = (truth["age"].to_numpy(float) - AGE_CENTRE) / AGE_HALF_RANGE
        severity = truth["severity"].to_numpy(float)
        return np.column_stack([deficit, age, severity, deficit * age, severity * age])
    return deficits


def run_one(cohort: PanelCohort, seed: int, config: OracleBenchConfig, workdir: Path) -> dict:
    """Build one cohort, compute the oracle, PCA and cPCA representations, score them held-out."""
    started = time.monotonic()
    folder = workdir / f"{cohort.name}-seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    scale = PanelScale(config.n_subjects, config.resolution)
    spec = build_cohort(cohort, folder / "cohort", scale, COHORT_SEED_OFFSET + seed)
    table = Cohort.from_yaml(spec)
    store = VolumeStore.build(table, folder / "store", PreprocessConfig(dtype="float32"), workers=1, progress=False)
    splits = make_splits(table, "holdout", val_fraction=0.1, test_fraction=0.2, seed=seed)
    keys = ["participant_id", "split"]
    representations = {}
    for method in ("pca", "cpca"):
        embedding = voxel_embeddings(store, table, method, N_COMPONENTS, splits, seed=seed)
        representations[method] = embedding[keys + [c for c in embedding.columns if c.startswith("emb_")]]

    truth = SynthDir(spec.parent).read_ground_truth().set_index("participant_id")
    generator = cohort_config(spec.parent)
    rows = table.keys()
    rows["split"] = rows["participant_id"].map(dict(zip(splits.table["participant_id"], splits.table["split"])))
    subjects = truth.loc[rows["participant_id"]].reset_index()
    volumes = np.asarray(store.volumes[store.rows_for(table)], dtype=np.float64)[:, 0]
    fitting_controls = (subjects["group"].eq("background") & rows["split"].isin(["train", "val"])).to_numpy()
    reference = volumes[fitting_controls].mean(axis=0)
    deficits = lesion_deficits(volumes, store.affine, site_centres(subjects, generator), reference,
                               generator.lesion_size)
    features = oracle_features(deficits, subjects, generator)
    oracle = rows[keys].copy()
    for column in range(features.shape[1]):
        oracle[f"oracle_{column}"] = features[:, column]
    scored, _ = score_representations({"oracle": oracle, **representations}, truth.reset_index(), cohort)
    specific = [row for row in scored if row["role"] == "specific"]
    for row in specific:
        if row["attribute"] in oracle_inputs(generator):
            row["values"]["oracle"] = row["u"]["oracle"] = None
    return {"cohort": cohort.name, "seed": seed, "cohort_seed": COHORT_SEED_OFFSET + seed, "rows": specific,
            "wall_s": round(time.monotonic() - started, 1)}


def run_oracle_bench(config: OracleBenchConfig, log=None) -> dict:
    """Every cohort x seed of ``config``: the runs and the mean ± SD table."""
    started = time.monotonic()
    runs = run_panel(config.cohorts, config.seeds, config.workdir, "oracles",
                     lambda cohort, seed, workdir: run_one(cohort, seed, config, workdir), log)
    return {"config": config.model_dump(mode="json"), "machine": machine_description(),
            "wall_s": round(time.monotonic() - started, 1), "runs": runs, "table": aggregate(runs)}


def aggregate(runs: list[dict]) -> list[dict]:
    """Per cohort and specific attribute: metric, chance and mean ± SD over seeds of every representation."""
    table = []
    for name in dict.fromkeys(run["cohort"] for run in runs):
        mine = [run for run in runs if run["cohort"] == name]
        for index, first in enumerate(mine[0]["rows"]):
            cells = {}
            for rep in REPRESENTATIONS:
                values = [run["rows"][index]["values"].get(rep) for run in mine]
                values = [v for v in values if v is not None]
                cells[rep] = {"mean": float(np.mean(values)) if values else None,
                              "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                              "values": values}
            table.append({"cohort": name, "attribute": first["attribute"], "metric": first["metric"],
                          "chance": first["chance"], "seeds": [run["seed"] for run in mine], "values": cells})
    return table


def _cell(stats: dict) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.2f}" + ("" if stats["sd"] is None else f" ± {stats['sd']:.2f}")


def print_oracles(results: dict, console) -> None:
    """The table: cohort, specific attribute, metric (chance), oracle, PCA, cPCA (held-out targets)."""
    seeds = results["config"]["seeds"]
    table = Table(title=f"oracle vs linear, held-out test targets, seeds {seeds} "
                        f"({results['config']['n_subjects']} subjects, {results['config']['resolution']:g} mm)",
                  title_justify="left")
    for column in ("cohort", "attribute", "metric (chance)", *REPRESENTATIONS):
        table.add_column(column)
    for row in results["table"]:
        chance = "" if row["chance"] is None else f" ({row['chance']:.2f})"
        table.add_row(row["cohort"], row["attribute"], f"{row['metric'] or 'n/a'}{chance}",
                      *[_cell(row["values"][rep]) for rep in REPRESENTATIONS])
    console.print(table)
    console.print(f"bench oracles: {len(results['runs'])} runs in {results['wall_s']:.0f} s")
