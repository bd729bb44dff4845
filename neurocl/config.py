"""The pipeline schema: one YAML file, validated in full before anything runs.

:class:`PipelineConfig` gathers the sections; the sections owned by a stage module live beside
their code (``preprocess``: :class:`neurocl.store.PreprocessConfig`, ``views``:
:class:`neurocl.views.ViewConfig`, ``method``: :class:`neurocl.methods.MethodConfig`, ``encoder``:
:class:`neurocl.nets.EncoderConfig`), the others here. :func:`load_pipeline` reads a YAML, resolves
its path fields (found by their type, so a new path field needs no list to be kept up to date)
against the YAML's folder, rejects a boolean where a number is due, and reports every bad field
through the one formatter :func:`neurocl.errors.validation_message`.

The field tables of ``docs/pipelines.md`` are generated from the ``Field`` descriptions here
(:func:`field_tables`; ``python -m neurocl.config docs/pipelines.md`` rewrites them) and a test
checks that the document matches the code.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      field_validator, model_validator)

from neurocl.errors import ConfigError, validation_message
from neurocl.io import load_yaml
from neurocl.harmonise import HarmoniseConfig
from neurocl.methods import MethodConfig, OptimConfig
from neurocl.nets import EncoderConfig
from neurocl.patches import PatchConfig
from neurocl.settings import merge_settings, parse_settings, unknown_field_hint
from neurocl.store import PreprocessConfig
from neurocl.views import ViewConfig

__all__ = [
    "BaselineConfig",
    "EvaluationConfig",
    "MapsConfig",
    "OutputsConfig",
    "PipelineConfig",
    "ProbeConfig",
    "SplitConfig",
    "TrainingConfig",
    "config_yaml",
    "check_attribute_names",
    "field_tables",
    "load_pipeline",
    "validated",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitConfig(_Section):
    """How subjects are split into train / val / test (subject level, seeded)."""

    file: Path | None = Field(None, description="An existing split manifest (`participant_id`, `split`) to use instead of drawing one.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of subjects whose loss is tracked for `best.ckpt` (not trained on).")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="Fraction of subjects held out of training: the probes and separation.json are scored on them (`evaluation.probe.scope: held_out`); at least 2 per class of every probed attribute.")
    stratify: list[str] = Field(["group"], description="Columns kept balanced across splits (`group` and categorical attributes).")
    seed: int | None = Field(
        None, description="Seed of the split; `null`: `training.seed` (with `training.seeds`, its first: every seed's "
        "model trains and is scored on the same split)."
    )


class TrainingConfig(OptimConfig):
    """Optimisation and hardware: the optimiser fields of :class:`neurocl.methods.OptimConfig` and these."""

    epochs: int = Field(50, gt=0, description="Passes over the training subjects.")
    batch_size: int = Field(
        32, ge=2,
        description="Subjects per batch **and process** (global batch = batch_size x processes); ≥ 2. A global batch "
        "never holds a subject twice, so it must not exceed the training subjects (for SepCLR, each group's share of "
        "it must not exceed that group's training subjects).",
    )
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="`auto` (bf16-mixed on a GPU that supports it, else 32-true), `32-true`, `bf16-mixed`, `16-mixed`."
    )
    accelerator: Literal["auto", "cpu", "gpu"] = Field("auto", description="`auto`, `cpu` or `gpu`.")
    devices: int | Literal["auto"] = Field(1, description="Processes (GPUs) per node, or `auto`.")
    num_nodes: int = Field(1, ge=1, description="Machines (see Multi-GPU and multi-node).")
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"] = Field(
        "auto", description="`auto`, `ddp`, `ddp_spawn`, `ddp_find_unused_parameters_true`."
    )
    sync_batchnorm: bool = Field(True, description="Synchronise BatchNorm statistics across GPUs under DDP.")
    seed: int = Field(0, description="Seed of the weights, the batch order and the views.")
    seeds: list[int] | None = Field(
        None,
        description="Train one model per seed (`neurocl run --seeds 0,1,2`): the first is the run's primary model "
        "(`seed` is set to it; a `seed` given beside must equal it), each other one trains into "
        "`seeds/seed-<s>/` and the report shows each figure's spread over seeds. `null`: `seed` alone.",
    )
    deterministic: bool = Field(True, description="Ask PyTorch for deterministic kernels (warns where none exists).")
    checkpoint_every_n_steps: int = Field(
        50, ge=1, description="Write `checkpoints/last.ckpt` every N optimiser steps (and at each epoch's end)."
    )
    memory_budget_gb: float | None = Field(
        None, gt=0, description="GPU memory the whole store may take (default: half of the free memory)."
    )
    loggers: list[Literal["csv", "tensorboard", "mlflow", "wandb"]] = Field(
        ["csv", "tensorboard"],
        description="Experiment trackers (Lightning loggers) under `logs/`: `csv`, `tensorboard`; `mlflow` (local "
        "`logs/mlruns` unless `MLFLOW_TRACKING_URI` names a server) and `wandb` (offline unless `WANDB_MODE` "
        "says otherwise) need `pip install neurocl[tracking]`. `logs/metrics.csv` is written whatever this says.",
    )

    @field_validator("devices")
    @classmethod
    def _positive_devices(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError(f"devices must be >= 1 or 'auto', got {value}")
        return value

    @model_validator(mode="after")
    def _seeds_agree(self) -> "TrainingConfig":
        if self.seeds is None:
            return self
        if not self.seeds:
            raise ValueError("training.seeds is empty: give at least one seed, or leave it out (null) to use training.seed")
        repeated = sorted({seed for seed in self.seeds if self.seeds.count(seed) > 1})
        if repeated:
            raise ValueError(f"training.seeds repeats seed(s) {repeated}: each seed trains one model, give each once")
        if "seed" in self.model_fields_set and self.seed != self.seeds[0]:
            raise ValueError(
                f"training.seed = {self.seed} but training.seeds starts with {self.seeds[0]}: the first of seeds is the "
                "run's primary seed; leave training.seed out or make it the first of seeds"
            )
        self.seed = self.seeds[0]
        return self

    def run_seeds(self) -> list[int]:
        """Every seed the run trains a model for, the primary (``seed``) first."""
        return list(self.seeds) if self.seeds else [self.seed]

    def optim(self) -> OptimConfig:
        return OptimConfig.model_validate(self.model_dump(include=set(OptimConfig.model_fields)))


class ProbeConfig(_Section):
    """Cross-validation and statistics settings of the probes (see docs/probing.md)."""

    scope: Literal["held_out", "in_sample_cv"] = Field(
        "held_out",
        description="`held_out`: probes fitted on the train/val subjects and scored on the `test` subjects only "
                    "(never on the encoder's training subjects); `in_sample_cv`: cross-validated over every "
                    "subject (the encoder's training subjects included), labelled in-sample wherever shown.",
    )
    n_splits: int = Field(5, ge=2, description="Outer CV folds of `in_sample_cv`, grouped by participant (fewer, with a note, when a class has fewer participants).")
    inner_splits: int = Field(3, ge=2, description="Inner CV folds choosing the regularisation.")
    n_permutations: int = Field(
        1000, ge=0, description="Label permutations for the p-value (0: none): `held_out` permutes the test subjects' labels against the fixed predictions (all of them, no refit); `in_sample_cv` refits, fewer when the decision at 0.05 is clear.",
    )
    adaptive_permutations: bool = Field(
        True, description="`in_sample_cv`: stop permuting once p is clearly above or below 0.05 (false: always `n_permutations`).",
    )
    n_bootstrap: int = Field(1000, ge=0, description="Participant-level bootstrap resamples for the 95% CI (0: none).")
    leave_site_out: str | None = Field(None, description="Column (e.g. `site`) held out one value at a time: `held_out` scores each site's test subjects with a probe fitted on the other sites' train/val subjects; `in_sample_cv` makes each site an outer fold.")
    ridge_alphas: list[float] = Field(
        default_factory=lambda: np.logspace(-2, 4, 13).tolist(), min_length=1,
        description="Ridge penalties searched by the inner CV (default: 13 values, 10⁻² … 10⁴).",
    )
    logistic_cs: list[float] = Field(
        default_factory=lambda: [0.01, 0.1, 1.0, 10.0], min_length=1,
        description="Inverse L2 penalties of the logistic probes searched by the inner CV.",
    )
    min_samples: int = Field(10, ge=4, description="Fewer labelled rows and the combination is skipped (with a note).")
    n_jobs: int = Field(-1, description="Threads probing in parallel (-1: one per core); results do not depend on it.")
    seed: int = Field(0, description="Seeds folds, permutations and bootstrap.")

    @field_validator("n_jobs")
    @classmethod
    def _jobs(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"must be >= 1 or -1 (every core), got {value}")
        return value

    @field_validator("ridge_alphas", "logistic_cs")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        bad = [value for value in values if not value > 0]
        if bad:
            raise ValueError(f"every value must be > 0, got {bad}")
        return sorted(values)


class EvaluationConfig(_Section):
    """Linear probes of the embeddings."""

    attributes: list[str] | None = Field(None, description="Attributes to probe (`null`: every cohort attribute, plus `group`).")
    subsets: list[Literal["all", "target", "background"]] = Field(
        ["all", "target", "background"], description="Subjects the probes are fitted on."
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="Cross-validation and statistics, below.")
    ground_truth: Path | None = Field(
        None, description="`ground_truth.tsv` of a synthetic cohort (default: beside the cohort YAML, if there)."
    )


class BaselineConfig(_Section):
    """One baseline compared with the main method (``pca``, ``cpca``, ``lin2``, ``combat``, ``simclr`` or ``yaware``).

    A trained baseline (``simclr``, ``yaware``) takes every setting it does not name here from
    the pipeline's ``method`` section (``n_views``), ``encoder``, ``views`` and ``training``.
    """

    name: Literal["pca", "cpca", "lin2", "combat", "simclr", "yaware"] = Field(
        ..., description="`pca`, `cpca` (contrastive PCA of the stored voxels, fitted on the training subjects), "
        "`lin2` (the linear two-space floor: common = PCA of the training controls, salient = contrastive PCA of "
        "the training subjects; `common_*`/`salient_*` columns like SepCLR's), "
        "`combat` (PCA of ComBat-harmonised voxels), `simclr` or `yaware` (trained with this pipeline's encoder, "
        "views and training section).",
    )
    n_components: int = Field(16, gt=0, description="`pca` / `cpca` / `combat`: components kept.")
    common_dim: int | None = Field(
        None, gt=0, description="`lin2`: common-space components (`null`: the pipeline method's `common_dim`, at most "
        "the number of training controls minus one, the rank of their PCA).")
    salient_dim: int | None = Field(
        None, gt=0, description="`lin2`: salient-space components (`null`: the pipeline method's `salient_dim`).")
    alpha: float | None = Field(None, gt=0, description="`cpca` / `lin2`: contrast strength α (`null`: chosen by "
                                "cross-validation over the training subjects, never the test ones).")
    attributes: list[str] = Field(["age"], description="`yaware`: attributes of the kernel prior.")
    sigma: float | list[float] = Field(5.0, description="`yaware`: kernel bandwidth per attribute, in the attribute's units.")
    temperature: float = Field(0.1, gt=0, description="`simclr` / `yaware`: InfoNCE temperature.")
    site: str = Field("site", description="`combat`: the site attribute (PCA of ComBat-harmonised voxels).")
    protect: list[str] = Field(default_factory=list, description="`combat`: attributes whose effects ComBat keeps.")

    def method(self, main: MethodConfig) -> MethodConfig:
        """The method a trained baseline trains: this entry's settings over ``main``'s view count."""
        return MethodConfig(
            name=self.name, n_views=main.n_views, temperature=self.temperature,
            attributes=self.attributes if self.name == "yaware" else [],
            sigma=self.sigma if self.name == "yaware" else 1.0,
        )

    def lin2_dims(self, main: MethodConfig, n_background: int) -> tuple[int, int]:
        """``lin2``'s (common_dim, salient_dim): this entry's, else ``main``'s (the common one at most
        ``n_background - 1``: a PCA of ``n_background`` training controls has no more axes)."""
        common = self.common_dim or min(main.common_dim, max(n_background - 1, 1))
        return common, self.salient_dim or main.salient_dim

    @property
    def trained(self) -> bool:
        return self.name in ("simclr", "yaware")


ATTRIBUTION_METHODS = ("gradient_x_input", "occlusion")


class MapsConfig(_Section):
    """The ``maps`` section of a pipeline: attribution maps, regions and subtypes.

    The pipeline runs :func:`neurocl.maps.run_maps` as a stage when ``enabled`` is true;
    ``neurocl maps RUN`` runs it on any finished run with the run's section (or these defaults).
    """

    enabled: bool = Field(False, description="Run the maps stage at the end of `neurocl run`.")
    methods: list[Literal["gradient_x_input", "occlusion"]] = Field(
        default_factory=lambda: list(ATTRIBUTION_METHODS), min_length=1, description="Attribution methods to compute."
    )
    baseline: Literal["background_mean", "zero"] = Field(
        "background_mean",
        description="Reference volume x0: the mean background (control) volume, or zeros. Gradient x input uses "
        "(x - x0); occlusion fills the occluded patch with x0.",
    )
    split: Literal["all", "train", "val", "test"] = Field(
        "all", description="Which rows of embeddings.tsv to analyse (their `split` column)."
    )
    batch_size: PositiveInt = Field(16, description="Volumes (or occluded copies) per forward pass.")
    occlusion_patch_mm: PositiveFloat = Field(16.0, description="Side of the occluded cube, in mm.")
    occlusion_stride_mm: PositiveFloat = Field(
        16.0,
        description="Step between occluded cubes, in mm. Below the patch side the cubes overlap and the map is "
        "smoother, at (patch/stride)^3 times the cost.",
    )
    occlusion_max_subjects: PositiveInt | None = Field(
        8, description="Occlusion uses at most this many target subjects per cluster (seeded draw); `null`: all."
    )
    k_min: PositiveInt = Field(
        1, description="Smallest number of subtypes tried; 1 lets the answer be 'no subtypes' (a gap test against "
        "unimodal data decides it before the silhouette ranks k >= 2).")
    k_max: PositiveInt = Field(6, description="Largest number of subtypes tried.")
    cluster_method: Literal["kmeans", "gmm"] = Field("kmeans", description="`kmeans` or `gmm`.")
    criterion: Literal["silhouette", "bic"] = Field("silhouette", description="How k is chosen over k_min..k_max.")
    n_bootstrap: NonNegativeInt = Field(100, description="Bootstrap resamples for cluster stability (0: skip).")
    n_reference: PositiveInt = Field(50, description="Reference sets (Gaussian, the subjects' covariance) of the "
                                     "one-cluster gap test (k_min = 1).")
    alpha: float = Field(0.05, gt=0, lt=1, description="Level of the one-cluster gap test.")
    continuous_test: Literal["kruskal", "anova"] = Field(
        "kruskal", description="Test of continuous attributes across clusters: `kruskal` or `anova`."
    )
    n_regions: int = Field(48, ge=2, description="Parcels of the coarse parcellation used when no atlas is given.")
    atlas: Path | None = Field(None, description="Atlas labels NIfTI (integer labels, 0 = background).")
    atlas_names: Path | None = Field(None, description="Atlas names TSV (columns index, name).")
    plots: bool = Field(True, description="Write PNG views over the MNI152 template.")
    null_references: list[Literal["untrained", "permuted_labels"]] = Field(
        default_factory=lambda: ["untrained"],
        description="Networks whose maps are computed beside the trained one's, as what learning must beat: "
        "`untrained` is the same architecture at the training seed's initialisation; `permuted_labels` is the "
        "same method trained again (same settings, seed and splits) with the background/target labels "
        "permuted (costs one more training). `[]` for none.",
    )
    significance: Literal["none", "fwe", "fdr"] = Field(
        "none",
        description="Voxelwise test that the trained network puts more of each target's gradient x input "
        "relevance on a voxel than each null network does (paired sign-flip permutations; FWE by the maximum "
        "statistic or FDR over the mask), written as -log10 p NIfTI.",
    )
    n_permutations: PositiveInt = Field(1000, description="Sign flips of the voxelwise significance test.")
    seed: int = Field(0, description="Seed of clustering and subject draws.")

    @model_validator(mode="after")
    def _check_k_range(self) -> "MapsConfig":
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must not exceed k_max ({self.k_max})")
        if self.criterion == "silhouette" and self.k_max < 2:
            raise ValueError(f"k_max = {self.k_max}: the silhouette needs k_max >= 2 (k = 1 alone is not a choice)")
        return self


class OutputsConfig(_Section):
    """Where shared outputs go and what is written."""

    store: Path | None = Field(
        None, description="Store folder (default `RUN/store`); point runs of the same cohort and preprocessing at one "
        "folder to preprocess once."
    )
    embed_batch_size: int = Field(16, ge=1, description="Volumes per forward pass when embedding.")
    report: bool = Field(True, description="Write `report.html` and `report.md` at the end.")


class PipelineConfig(_Section):
    """A whole pipeline (the YAML). Paths are relative to the YAML file's folder."""

    name: str = Field("neurocl-run", description="A name for the run (shown in the report).")
    cohort: Path = Field(..., description="Cohort spec YAML ([cohorts.md](cohorts.md)).")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    harmonise: HarmoniseConfig | None = Field(
        None, description="ComBat or covariate residualisation of the store, fitted on the training split's "
        "background subjects, applied to all."
    )
    splits: SplitConfig = Field(default_factory=SplitConfig)
    views: ViewConfig = Field(default_factory=ViewConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    baselines: list[BaselineConfig] = Field(
        default_factory=list,
        description="Baselines computed on the same store and splits: `pca`, `cpca`, `lin2`, `combat`, `simclr`, `yaware`, as "
        "names or mappings (`{name: yaware, attributes: [age], sigma: 5.0}`); fields in `baselines[]` below.",
    )
    maps: MapsConfig = Field(default_factory=MapsConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)

    @field_validator("baselines", mode="before")
    @classmethod
    def _names_as_entries(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": entry} if isinstance(entry, str) else entry for entry in value]
        return value

    @field_validator("baselines")
    @classmethod
    def _distinct_baselines(cls, value: list[BaselineConfig]) -> list[BaselineConfig]:
        names = [entry.name for entry in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"baseline listed twice: {', '.join(repeated)}")
        return value

    @model_validator(mode="after")
    def _test_subjects_for_held_out_probes(self) -> "PipelineConfig":
        # Before any training: held-out probes score the test split, so a run without one cannot be evaluated.
        if self.evaluation.probe.scope == "held_out" and self.splits.file is None and self.splits.test_fraction == 0:
            raise ValueError("evaluation.probe.scope is held_out (the default) but splits.test_fraction is 0: no "
                             "test subjects to score; set splits.test_fraction > 0 (e.g. 0.2) or "
                             "evaluation.probe.scope: in_sample_cv (probes cross-validated over every subject, "
                             "labelled in-sample)")
        return self


# ---------------------------------------------------------------- field types


def _leaf_types(annotation) -> list:
    """The plain types an annotation admits: ``Path | None`` -> [Path, NoneType]; lists and Annotated unwrapped."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated, list, tuple):
        args = typing.get_args(annotation)
        args = args[:1] if origin is typing.Annotated else args
        return [leaf for arg in args for leaf in _leaf_types(arg)]
    if origin is Literal:
        return [type(value) for value in typing.get_args(annotation)]
    return [annotation]


def _sections(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Fields of ``model`` holding a nested section (or a list of them), by field name."""
    out = {}
    for name, field in model.model_fields.items():
        nested = [leaf for leaf in _leaf_types(field.annotation) if isinstance(leaf, type) and issubclass(leaf, BaseModel)]
        if nested:
            out[name] = nested[0]
    return out


def _walk(raw: Any, model: type[BaseModel], visit, location: tuple = ()) -> None:
    """Call ``visit(holder, key, field, location)`` for every plain field present in ``raw`` (nested sections too)."""
    if isinstance(raw, list):
        for position, item in enumerate(raw):
            _walk(item, model, visit, location + (position,))
        return
    if not isinstance(raw, dict):
        return
    sections = _sections(model)
    for key in list(raw):
        field = model.model_fields.get(key)
        if field is None:
            continue  # extra="forbid" reports it
        if key in sections:
            _walk(raw[key], sections[key], visit, location + (key,))
        else:
            visit(raw, key, field, location + (key,))


def _resolve_paths(raw: dict, base: Path) -> None:
    """Relative strings of every ``Path`` field, made absolute against ``base`` (the YAML's folder)."""

    def visit(holder: dict, key: str, field, location) -> None:
        value = holder[key]
        admits_path = any(leaf is Path or (isinstance(leaf, type) and issubclass(leaf, os.PathLike))
                          for leaf in _leaf_types(field.annotation))
        literals = [value for arg in typing.get_args(field.annotation) if typing.get_origin(arg) is Literal
                    for value in typing.get_args(arg)]
        if admits_path and isinstance(value, str) and value not in literals:
            path = Path(value).expanduser()
            holder[key] = str(path if path.is_absolute() else (base / path).resolve())

    _walk(raw, PipelineConfig, visit)


def _reject_booleans(raw: dict, source: str) -> None:
    """``epochs: true`` is not 1 epoch: a YAML boolean is refused wherever the field is not a boolean.

    pydantic's lax mode turns ``true`` into 1 for an int or float field; strict mode would also
    refuse the strings YAML gives for paths, so booleans are checked here, by the fields' types.
    """
    problems = []

    def visit(holder: dict, key: str, field, location) -> None:
        value = holder[key]
        values = value if isinstance(value, list) else [value]
        if any(isinstance(item, bool) for item in values) and bool not in _leaf_types(field.annotation):
            kinds = sorted({getattr(leaf, "__name__", str(leaf)) for leaf in _leaf_types(field.annotation)} - {"NoneType"})
            where = ".".join(str(part) for part in location)
            problems.append(f"{source}: {where}: a boolean where {' or '.join(kinds)} is expected (got {value!r})")

    _walk(raw, PipelineConfig, visit)
    if problems:
        raise ConfigError("\n".join(problems))


def validated(model: type[BaseModel], raw: Any, source: str) -> BaseModel:
    """``model.model_validate(raw)``, every problem reported as one :class:`ConfigError` (one line each;
    an unknown field with the nearest known one and its section's fields)."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(validation_message(source, error, hint=unknown_field_hint(
            lambda location: _fields_at(model, location)))) from None


def _fields_at(model: type[BaseModel], location: tuple) -> list[str] | None:
    """The fields of the section of ``model`` at ``location`` (list positions skipped), None where there is none."""
    for part in location:
        if isinstance(part, str):
            model = _sections(model).get(part)
            if model is None:
                return None
    return list(model.model_fields)


def load_pipeline(path: str | os.PathLike, overrides: dict | None = None, settings: Sequence[str] = ()) -> PipelineConfig:
    """Read and validate a pipeline YAML; relative paths are taken from the YAML's folder.

    Parameters
    ----------
    path : path
        The pipeline YAML.
    overrides : dict, optional
        Top-level fields replacing the YAML's (e.g. ``{"cohort": ...}`` for the demo).
    settings : list of str
        Dotted ``SECTION.FIELD=VALUE`` settings (``neurocl run --set``) merged into the YAML
        before validation (:mod:`neurocl.settings`); their paths are relative to the current folder.

    Raises
    ------
    ConfigError
        Naming the file, each bad field (``training.epochs``) and its value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} does not exist")
    raw = load_yaml(path, ConfigError, "pipeline") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pipeline is a mapping of sections, got {type(raw).__name__}")
    raw.update(overrides or {})
    _resolve_paths(raw, path.parent.absolute())
    source = str(path)
    if settings:
        extra = parse_settings(settings)
        _resolve_paths(extra, Path.cwd())
        raw = merge_settings(raw, extra)
        source = f"{path} with --set {' --set '.join(settings)}"
    _reject_booleans(raw, source)
    return validated(PipelineConfig, raw, source)


def check_attribute_names(config: PipelineConfig, cohort) -> None:
    """Attribute names of the pipeline that the cohort lacks, refused before any work (field named)."""
    known = sorted(cohort.attribute_kinds)
    fields = {
        "method.attributes": config.method.attributes,
        "evaluation.attributes": [name for name in config.evaluation.attributes or [] if name != "group"],
        "splits.stratify": [name for name in config.splits.stratify if name != "group"],
        **{f"baselines.{entry.name}.attributes": entry.attributes for entry in config.baselines
           if entry.name == "yaware"},
        **{"baselines.combat.site/protect": [entry.site, *entry.protect] for entry in config.baselines
           if entry.name == "combat"},
        "harmonise.site/protect/remove": config.harmonise.attribute_names() if config.harmonise else [],
    }
    for field, names in fields.items():
        unknown = [name for name in names if name not in cohort.attribute_kinds]
        if unknown:
            raise ConfigError(f"{field}: {unknown} not in the attributes of cohort {cohort.source}: {known}")


def config_yaml(config: PipelineConfig) -> str:
    """The resolved pipeline as YAML (every field, defaults included): what a run folder keeps."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- docs tables

# Sections documented in docs/pipelines.md, in order: (heading key, model, doc heading).
_DOC_SECTIONS = [
    ("top", PipelineConfig, "top level"),
    ("preprocess", PreprocessConfig, "`preprocess`"),
    ("harmonise", HarmoniseConfig, "`harmonise`"),
    ("splits", SplitConfig, "`splits`"),
    ("views", ViewConfig, "`views`"),
    ("views.patches", PatchConfig, "`views.patches`"),
    ("method", MethodConfig, "`method`"),
    ("encoder", EncoderConfig, "`encoder`"),
    ("training", TrainingConfig, "`training`"),
    ("evaluation", EvaluationConfig, "`evaluation`"),
    ("evaluation.probe", ProbeConfig, "`evaluation.probe`"),
    ("baselines", BaselineConfig, "`baselines[]`"),
    ("maps", MapsConfig, "`maps`"),
    ("outputs", OutputsConfig, "`outputs`"),
]


def _default_text(field) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        if issubclass_safe(field.annotation, BaseModel):
            return "defaults"
        value = field.default_factory()
    else:
        value = field.default
    if isinstance(value, list) and len(value) > 6:
        return f"{len(value)} values"
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return f"`{text.removesuffix('...').strip()}`"


def issubclass_safe(annotation, base) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, base)


_ENTRY = re.compile(r"^(?P<names>\w+(?:, \w+)*) : ")


def docstring_entries(model: type) -> dict[str, str]:
    """Field descriptions from a class docstring's numpydoc ``Parameters`` / ``Attributes`` section.

    The one source of a field's meaning where the field itself has no ``description`` (nilearn's
    ``fill_doc`` idea): the docstring that a reader of the code sees is the text of the docs table.
    """
    lines = inspect.cleandoc(model.__doc__ or "").splitlines()
    entries: dict[str, list[str]] = {}
    current: list[str] = []
    in_section = False
    for line, underline in zip(lines, lines[1:] + [""]):
        if line.strip() in ("Parameters", "Attributes") and set(underline.strip()) == {"-"}:
            in_section = True
            continue
        if not in_section or set(line.strip()) == {"-"}:
            continue
        match = _ENTRY.match(line)
        if match:
            current = []
            for name in match["names"].split(", "):
                entries[name] = current
        elif line.startswith("    ") and current is not None:
            current.append(line.strip())
        elif line.strip():
            in_section = False  # another section or prose
    return {name: " ".join(text) for name, text in entries.items() if text}


def field_table(model: type[BaseModel]) -> str:
    """The markdown table (field, default, meaning) of one section, from its ``Field`` descriptions
    (or, for a field without one, its entry in the class docstring)."""
    lines = ["| field | default | meaning |", "| --- | --- | --- |"]
    documented = docstring_entries(model)
    for name, field in model.model_fields.items():
        description = field.description or documented.get(name)
        if description is None:
            if issubclass_safe(field.annotation, BaseModel) or _sections(model).get(name):
                continue  # a nested section has its own table
            raise ConfigError(f"{model.__name__}.{name} has no description; docs/pipelines.md needs one")
        meaning = " ".join(description.split()).replace("|", "\\|")
        lines.append(f"| `{name}` | {_default_text(field)} | {meaning} |")
    return "\n".join(lines)


def field_tables() -> dict[str, str]:
    """Every section's table, keyed as the ``<!-- fields: KEY -->`` markers of docs/pipelines.md."""
    return {key: field_table(model) for key, model, _ in _DOC_SECTIONS}


_MARKER = re.compile(r"(<!-- fields: (?P<key>[\w.]+) -->\n)(?P<table>.*?)(\n<!-- end fields -->)", re.S)


def render_docs(text: str) -> str:
    """``text`` (docs/pipelines.md) with every generated table replaced by the one the code gives."""
    tables = field_tables()
    missing = set(tables) - set(match["key"] for match in _MARKER.finditer(text))
    if missing:
        raise ConfigError(f"docs/pipelines.md has no table marker for section(s) {sorted(missing)}")
    return _MARKER.sub(lambda match: match[1] + tables[match["key"]] + match[4], text)


if __name__ == "__main__":  # python -m neurocl.config docs/pipelines.md: regenerate the field tables
    target = Path(sys.argv[1])
    target.write_text(render_docs(target.read_text()))
