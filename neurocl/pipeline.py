"""Pipelines: one YAML in, trained encoders, per-subject embeddings, probes and a report out.

``run_pipeline(PIPELINE.yaml, RUN_DIR)`` chains the stages, each reading only the
previous stage's output:

validate cohort -> build (or reuse) the store -> splits (``splits.tsv``) -> train the method,
then any trained baseline (``checkpoints/``, ``logs/metrics.csv``) -> embed every subject (``embeddings.tsv``) ->
probes (``probes.tsv``, ``separation.json``) -> baselines (``baselines/<name>/``) ->
maps (optional, ``maps/``) -> report (``report.html``, ``report.md``).

Every file is written atomically (:mod:`neurocl.io`); checkpoints are written to a
temporary file and renamed, so ``--resume`` always restarts from a complete one. The
schema is :class:`PipelineConfig`; every field is described in ``docs/pipelines.md``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from neurocl.errors import ConfigError, NeuroclError, TrainingError
from neurocl.harmonise import HarmoniseConfig
from neurocl.io import read_tsv, torch_save, write_json, write_text, write_tsv
from neurocl.logs import epoch_lines, is_terminal, progress_console, results_console
from neurocl.maps import MapsConfig
from neurocl.methods import MethodConfig, OptimConfig, TrainingData, build_method, method_from_checkpoint
from neurocl.nets import EncoderConfig
from neurocl.probe import ProbeConfig
from neurocl.store import PreprocessConfig
from neurocl.views import ViewConfig

__all__ = [
    "BaselineConfig",
    "EvaluationConfig",
    "OutputsConfig",
    "PipelineConfig",
    "Run",
    "SplitConfig",
    "TrainingConfig",
    "embed_cohort",
    "embeddings_table",
    "load_model",
    "load_pipeline",
    "load_run",
    "make_trainer",
    "run_demo",
    "run_pipeline",
    "train",
]

console = progress_console()

DEMO_PIPELINE = Path(__file__).parent / "pipelines" / "demo.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitConfig(_Section):
    """How subjects are split into train / val / test (subject level, seeded)."""

    file: Path | None = Field(None, description="An existing splits.tsv to use instead of drawing one.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of subjects for the validation loss.")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="Fraction of subjects held out of training.")
    stratify: list[str] = Field(["group"], description="Columns the split keeps balanced (group, categorical attributes).")
    seed: int | None = Field(None, description="Seed of the split (default: training.seed).")


class TrainingConfig(OptimConfig):
    """Optimisation and hardware: the optimiser fields of :class:`neurocl.methods.OptimConfig` and these."""

    epochs: int = Field(50, gt=0, description="Passes over the training subjects.")
    batch_size: int = Field(32, ge=2, description="Subjects per batch and process (global batch = batch_size x processes).")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="auto: bf16-mixed on a GPU that supports it, 32-true otherwise."
    )
    accelerator: Literal["auto", "cpu", "gpu"] = Field("auto", description="Where to train.")
    devices: int | Literal["auto"] = Field(1, description="Processes (GPUs) per node.")
    num_nodes: int = Field(1, ge=1, description="Machines; launch the same command on each (see docs/pipelines.md).")
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"] = Field(
        "auto", description="Lightning strategy; auto picks DDP with more than one process."
    )
    sync_batchnorm: bool = Field(
        True, description="Synchronise BatchNorm statistics across GPUs under DDP (PyTorch has no CPU SyncBatchNorm)."
    )
    seed: int = Field(0, description="Seed of weights, batch order and views: same seed, same embeddings on CPU.")
    deterministic: bool = Field(True, description="Ask PyTorch for deterministic kernels (warns where none exists).")
    checkpoint_every_n_steps: int = Field(50, ge=1, description="Write checkpoints/last.ckpt every N optimiser steps.")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="GPU memory for the whole store (default: half of the free memory)."
    )

    @field_validator("devices")
    @classmethod
    def _positive_devices(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError(f"devices must be >= 1 or 'auto', got {value}")
        return value

    def optim(self) -> OptimConfig:
        return OptimConfig.model_validate(self.model_dump(include=set(OptimConfig.model_fields)))


class EvaluationConfig(_Section):
    """Linear probes of the embeddings."""

    attributes: list[str] | None = Field(None, description="Attributes to probe (default: every cohort attribute + group).")
    subsets: list[Literal["all", "target", "background"]] = Field(
        ["all", "target", "background"], description="Subjects the probes are fitted on."
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="Cross-validation and statistics (probe.ProbeConfig).")
    ground_truth: Path | None = Field(
        None, description="ground_truth.tsv of a synthetic cohort (default: beside the cohort YAML, if present)."
    )


class BaselineConfig(_Section):
    """One baseline compared with the main method (``pca``, ``cpca``, ``simclr`` or ``yaware``)."""

    name: Literal["pca", "cpca", "combat", "simclr", "yaware"]
    n_components: int = Field(16, gt=0, description="pca / cpca / combat: components kept.")
    alpha: float | None = Field(None, gt=0, description="cpca: contrast strength alpha (None: chosen automatically).")
    attributes: list[str] = Field(["age"], description="yaware: attributes of the kernel prior.")
    sigma: float | list[float] = Field(5.0, description="yaware: kernel bandwidth per attribute (attribute units).")
    temperature: float = Field(0.1, gt=0, description="simclr / yaware: InfoNCE temperature.")
    site: str = Field("site", description="combat: the site attribute (PCA of ComBat-harmonised voxels).")
    protect: list[str] = Field(default_factory=list, description="combat: attributes whose effects ComBat keeps.")


class OutputsConfig(_Section):
    """Where shared outputs go and what is written."""

    store: Path | None = Field(None, description="Store cache folder (default RUN/store); share one across runs.")
    embed_batch_size: int = Field(16, ge=1, description="Volumes per forward pass when embedding.")
    report: bool = Field(True, description="Write report.html and report.md at the end.")


class PipelineConfig(_Section):
    """A whole pipeline (the YAML). Paths are relative to the YAML file's folder."""

    name: str = Field("neurocl-run", description="A name for the run (shown in the report).")
    cohort: Path = Field(..., description="Cohort spec YAML.")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    harmonise: HarmoniseConfig | None = Field(
        None, description="ComBat on the store, fitted on the training split's background subjects, applied to all."
    )
    splits: SplitConfig = Field(default_factory=SplitConfig)
    views: ViewConfig = Field(default_factory=ViewConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    baselines: list[BaselineConfig] = Field(default_factory=list, description="e.g. [pca, cpca, simclr, yaware].")
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


# Fields holding paths, as (section, field): resolved against the pipeline YAML's folder.
_PATH_FIELDS = [
    (None, "cohort"),
    ("preprocess", "reference"),
    ("preprocess", "mask"),
    ("encoder", "weights"),
    ("splits", "file"),
    ("evaluation", "ground_truth"),
    ("maps", "atlas"),
    ("maps", "atlas_names"),
    ("outputs", "store"),
]


def _resolve_paths(raw: dict, base: Path) -> dict:
    def resolve(value: Any) -> Any:
        if not isinstance(value, str) or value in ("auto", "none"):
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    for section, field in _PATH_FIELDS:
        holder = raw if section is None else raw.get(section)
        if isinstance(holder, dict) and field in holder:
            holder[field] = resolve(holder[field])
    return raw


def _format_validation(source: str, error: ValidationError) -> ConfigError:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        got = "" if item["type"] == "missing" else f" (got {item.get('input')!r})"
        lines.append(f"{source}: {where}: {item['msg']}{got}")
    return ConfigError("\n".join(lines))


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
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pipeline is a mapping of sections, got {type(raw).__name__}")
    raw.update(overrides or {})
    raw = _resolve_paths(raw, path.parent.absolute())
    source = str(path)
    if settings:
        from neurocl.settings import merge_settings, parse_settings

        raw = merge_settings(raw, _resolve_paths(parse_settings(settings), Path.cwd()))
        source = f"{path} with --set {' --set '.join(settings)}"
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise _format_validation(source, error) from None


def _config_yaml(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- training engine


class _AtomicCheckpointIO:
    """Lightning checkpoint I/O through :func:`neurocl.io.torch_save` (temporary file + rename)."""

    @staticmethod
    def make():
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        class AtomicCheckpointIO(TorchCheckpointIO):
            def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
                torch_save(checkpoint, path)

        return AtomicCheckpointIO()


def _callbacks(run_dir: Path, every_n_steps: int, progress: bool) -> list:
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar

    class MetricsTable(L.Callback):
        """``logs/metrics.csv``: step, epoch, then each logged term; rows travel in the checkpoint."""

        def __init__(self) -> None:
            self.rows: list[dict] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            row = {"step": trainer.global_step - 1, "epoch": trainer.current_epoch,
                   "train/loss": float(outputs["loss"])}
            row.update({f"train/{name}": float(value) for name, value in outputs["terms"].items()})
            self.rows.append(row)

        def on_validation_end(self, trainer, module) -> None:
            values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            if values:
                self.rows.append({"step": trainer.global_step - 1, "epoch": trainer.current_epoch, **values})

        def write(self, trainer) -> None:
            if trainer.is_global_zero and self.rows:
                table = pd.DataFrame(self.rows)
                # step, epoch, then train/loss, the train terms, val/loss, the val terms (first-logged order)
                order = {"train/loss": 0, "val/loss": 2}
                terms = sorted(table.columns[2:], key=lambda c: order.get(c, 1 if c.startswith("train/") else 3))
                write_text(run_dir / "logs" / "metrics.csv", table[["step", "epoch", *terms]].to_csv(index=False))

        def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
            self.write(trainer)

        def on_train_end(self, trainer, module) -> None:
            self.write(trainer)

        def state_dict(self) -> dict:
            return {"rows": self.rows}

        def load_state_dict(self, state: dict) -> None:
            self.rows = list(state["rows"])

    class RunCheckpoints(L.Callback):
        """``checkpoints/last.ckpt`` every N steps and at each epoch's end; ``best.ckpt`` at the lowest val loss.

        Epoch-end checkpoints are written after the last batch and again after validation,
        never in ``on_train_epoch_end``: Lightning does not restore the train loader's position
        from a checkpoint written there, and resuming would repeat the epoch's batch order.
        """

        def __init__(self) -> None:
            self.best = float("inf")

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
            if trainer.global_step % every_n_steps == 0 or last_of_epoch:
                trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)

        def on_validation_end(self, trainer, module) -> None:
            if trainer.sanity_checking:
                return
            val_loss = trainer.callback_metrics.get("val/loss")
            if val_loss is not None and float(val_loss) < self.best:
                self.best = float(val_loss)
                trainer.save_checkpoint(run_dir / "checkpoints" / "best.ckpt", weights_only=False)
            trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)

        def state_dict(self) -> dict:
            return {"best": self.best}

        def load_state_dict(self, state: dict) -> None:
            self.best = state["best"]

    if not progress:
        return [MetricsTable(), RunCheckpoints()]
    # A bar redrawn in place on a terminal; one line per epoch in a log file (logs.epoch_lines).
    bar = RichProgressBar(leave=True, console_kwargs={"stderr": True}) if is_terminal(sys.stderr) else epoch_lines()
    return [MetricsTable(), RunCheckpoints(), bar]


def _on_gpu(training: TrainingConfig) -> bool:
    import torch

    return training.accelerator == "gpu" or (training.accelerator == "auto" and torch.cuda.is_available())


def _precision(training: TrainingConfig) -> str:
    import torch

    if training.precision != "auto":
        return training.precision
    return "bf16-mixed" if _on_gpu(training) and torch.cuda.is_bf16_supported() else "32-true"


def make_trainer(training: TrainingConfig, run_dir: Path, progress: bool = True, **overrides):
    """The Lightning Trainer of a pipeline's training section (atomic checkpoints, metrics table, progress).

    ``overrides`` are passed to :class:`lightning.Trainer` over the ones the section gives.
    """
    import lightning as L

    world = (training.devices if isinstance(training.devices, int) else 1) * training.num_nodes
    options = dict(
        max_epochs=training.epochs,
        accelerator=training.accelerator,
        devices=training.devices,
        num_nodes=training.num_nodes,
        strategy=training.strategy,
        precision=_precision(training),
        sync_batchnorm=training.sync_batchnorm and world > 1 and _on_gpu(training),
        deterministic="warn" if training.deterministic else False,
        callbacks=_callbacks(run_dir, training.checkpoint_every_n_steps, progress),
        enable_progress_bar=progress and is_terminal(sys.stderr),
        plugins=[_AtomicCheckpointIO.make()],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=1,
        default_root_dir=str(run_dir),
    )
    options.update(overrides)
    return L.Trainer(**options)


def _attribute_columns(cohort, names: list[str], rows: np.ndarray, standardise: bool) -> tuple[np.ndarray, list[str]]:
    """The kernel attributes of every cohort row; continuous ones divided by their training SD when asked."""
    unknown = [name for name in names if name not in cohort.attribute_kinds]
    if unknown:
        raise ConfigError(
            f"method.attributes: {unknown} not in the cohort's attributes {sorted(cohort.attribute_kinds)}"
        )
    values = cohort.attribute_matrix(names) if names else np.zeros((len(cohort), 0))
    kinds = [cohort.attribute_kinds[name] for name in names]
    if standardise:
        for column, kind in enumerate(kinds):
            if kind == "continuous":
                values[:, column] /= np.nanstd(values[rows, column]) or 1.0
    return values, kinds


def _training_data(config: PipelineConfig, method: MethodConfig, cohort, store, splits) -> TrainingData:
    import torch

    from neurocl.views import ViewSampler

    store_rows = store.rows_for(cohort)
    has_group = cohort.table["group"].notna().to_numpy()

    def indices(split: str) -> np.ndarray:
        rows = splits.rows(cohort, split)
        return store_rows[rows[has_group[rows]]]

    train_rows = splits.rows(cohort, "train")
    values, kinds = _attribute_columns(cohort, method.attributes, train_rows, method.standardise)
    attributes = np.full((len(store), values.shape[1]), np.nan)
    attributes[store_rows] = values
    is_target = np.zeros(len(store), dtype=bool)
    is_target[store_rows] = cohort.is_target
    return TrainingData(
        store=store,
        sampler=ViewSampler(config.views, spatial_dims=store.spatial_dims, store=store),
        train_indices=indices("train"),
        val_indices=indices("val"),
        is_target=torch.as_tensor(is_target),
        attributes=torch.as_tensor(attributes, dtype=torch.float32),
        attribute_kinds=kinds,
        batch_size=config.training.batch_size,
        memory_budget_gb=config.training.memory_budget_gb,
    )


def _grid_record(store) -> dict:
    """What embedding new subjects needs of the training store: its grid, mask and preprocessing."""
    import torch

    return {
        "preprocess": store.config.model_dump(mode="json"),
        "affine": store.affine.tolist(),
        "mask": torch.as_tensor(np.asarray(store.mask, dtype=bool)),
    }


def train(config: PipelineConfig, method: MethodConfig, run_dir: Path, cohort, store, splits, resume: bool):
    """Train ``method`` into ``run_dir`` (checkpoints/, logs/); returns the module (CPU, eval mode)."""
    import lightning as L

    L.seed_everything(config.training.seed, workers=False, verbose=False)
    data = _training_data(config, method, cohort, store, splits)
    module = build_method(method, config.encoder, config.training.optim(), seed=config.training.seed, data=data)
    module.grid = _grid_record(store)
    trainer = make_trainer(config.training, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt_path = last if resume and last.is_file() else None
    if ckpt_path is not None:
        console.print(f"resuming from [bold]{ckpt_path}[/]")
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=True)
    if trainer.interrupted:
        raise KeyboardInterrupt
    return module.cpu().eval()


# ---------------------------------------------------------------- stages

# How long an extra DDP process waits for the primary to build the store and the splits.
_PREPARE_TIMEOUT_S = 6 * 3600


def _is_primary_process() -> bool:
    """False in every DDP process but the first (those Lightning launches, or torchrun / SLURM ranks > 0)."""
    ranks = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
    return all(os.environ.get(name, "0") == "0" for name in ranks)


# What a resumed run must share with the run it continues: everything the trained weights depend
# on. The other sections (evaluation, baselines, maps, outputs, name) only shape later stages,
# which a resumed run recomputes, so they may change.
_TRAINING_SECTIONS = ("cohort", "preprocess", "splits", "views", "method", "encoder", "training")
_FREE_TRAINING_FIELDS = ("checkpoint_every_n_steps", "memory_budget_gb")


def _training_part(config: dict) -> dict:
    part = {section: config.get(section) for section in _TRAINING_SECTIONS}
    if isinstance(part["training"], dict):
        part["training"] = {k: v for k, v in part["training"].items() if k not in _FREE_TRAINING_FIELDS}
    return part


def _prepare_run_dir(config: PipelineConfig, run_dir: Path, resume: bool) -> None:
    """Check the run directory (new, or the same training's with ``resume``) and save config.yaml."""
    saved = run_dir / "config.yaml"
    if resume:
        if not saved.is_file():
            raise ConfigError(f"--resume: {run_dir} holds no run (config.yaml missing); start it without --resume")
        before, now = _training_part(yaml.safe_load(saved.read_text())), _training_part(config.model_dump(mode="json"))
        changed = [section for section in _TRAINING_SECTIONS if before[section] != now[section]]
        if changed:
            raise ConfigError(
                f"--resume: the pipeline differs from the run's {saved} in section(s) {', '.join(changed)}, "
                "which the trained weights depend on; resume with the same pipeline or start a new run"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"--out {run_dir} exists and is not empty; choose a new folder or pass --resume")
    write_text(saved, _config_yaml(config))


def _splits(config: PipelineConfig, cohort, run_dir: Path):
    """The run's split manifest: RUN/splits.tsv when it exists (resume), else drawn (or read) and saved."""
    from neurocl.cohort import Splits, make_splits

    manifest = run_dir / "splits.tsv"
    if manifest.is_file():
        return Splits.load(manifest, cohort)
    if config.splits.file is not None:
        splits = Splits.load(config.splits.file, cohort)
    else:
        options = config.splits
        splits = make_splits(
            cohort, "holdout", val_fraction=options.val_fraction, test_fraction=options.test_fraction,
            stratify=tuple(options.stratify), seed=config.training.seed if options.seed is None else options.seed,
        )
    if splits.column != "split":
        raise ConfigError(f"splits.file {config.splits.file}: training needs a holdout manifest (a 'split' column)")
    splits.save(manifest)
    return splits


def embeddings_table(module, store, cohort, splits=None, batch_size: int = 16, progress: bool = False) -> pd.DataFrame:
    """embeddings.tsv of every cohort row: keys, split, group, then ``<space>_<i>`` (``BaseMethod.embed``)."""
    representations = module.embed_store(store, store.rows_for(cohort), batch_size, progress=progress)
    table = cohort.keys().reset_index(drop=True)
    table["split"] = np.nan if splits is None else _split_labels(splits, cohort)
    table["group"] = cohort.table["group"].to_numpy()
    columns = {f"{space}_{i}": values[:, i] for space, values in representations.items() for i in range(values.shape[1])}
    return pd.concat([table, pd.DataFrame(columns)], axis=1)


def _split_labels(splits, cohort) -> np.ndarray:
    labels = np.full(len(cohort), "n/a", dtype=object)
    for name in ("train", "val", "test"):
        labels[splits.rows(cohort, name)] = name
    return labels


def _probe(embeddings: pd.DataFrame, cohort, config: PipelineConfig, out_dir: Path, ground_truth) -> None:
    from neurocl.probe import probe_embeddings, separation

    evaluation = config.evaluation
    probes = probe_embeddings(embeddings, cohort, attributes=evaluation.attributes, subsets=evaluation.subsets,
                              config=evaluation.probe, progress=True)
    write_tsv(out_dir / "probes.tsv", probes)
    write_json(out_dir / "separation.json",
               separation(embeddings, cohort, probes, ground_truth=ground_truth, config=evaluation.probe))


def _ground_truth(config: PipelineConfig) -> Path | None:
    if config.evaluation.ground_truth is not None:
        return config.evaluation.ground_truth
    beside = config.cohort.parent / "ground_truth.tsv"
    return beside if beside.is_file() else None


def _check_names(config: PipelineConfig, cohort) -> None:
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
        "harmonise.site/protect": [config.harmonise.site, *config.harmonise.protect] if config.harmonise else [],
    }
    for field, names in fields.items():
        unknown = [name for name in names if name not in cohort.attribute_kinds]
        if unknown:
            raise ConfigError(f"{field}: {unknown} not in the attributes of cohort {cohort.source}: {known}")


def _training_jobs(config: PipelineConfig, run_dir: Path) -> list[tuple[str, MethodConfig, Path]]:
    """Every network the pipeline trains, in order: (name, method, output folder)."""
    jobs = [("main", config.method, run_dir)]
    for entry in config.baselines:
        if entry.name in ("simclr", "yaware"):
            method = MethodConfig(
                name=entry.name, n_views=config.method.n_views, temperature=entry.temperature,
                attributes=entry.attributes if entry.name == "yaware" else [],
                sigma=entry.sigma if entry.name == "yaware" else 1.0,
            )
            jobs.append((f"baselines/{entry.name}", method, run_dir / "baselines" / entry.name))
    return jobs


def _optional_module(name: str, stage: str):
    """``neurocl.<name>`` if this installation has it; otherwise None and a warning that ``stage`` is skipped."""
    import importlib

    try:
        return importlib.import_module(f"neurocl.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"neurocl.{name}":
            raise
        console.print(f"[yellow]skipped {stage}: neurocl.{name} is not available in this installation[/]")
        return None


def _prepared_marker(run_dir: Path) -> Path:
    return run_dir / "logs" / "prepared.json"


def _wait_until_prepared(config: PipelineConfig, run_dir: Path, cohort):
    """The store and splits the primary process prepared (extra DDP processes never build them).

    The primary writes ``logs/prepared.json`` naming the store's volume file once the store and
    ``splits.tsv`` are complete; a store rebuilt since (new file name) is waited for again.
    """
    from neurocl.cohort import Splits
    from neurocl.store import VolumeStore

    marker, deadline = _prepared_marker(run_dir), time.monotonic() + _PREPARE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            record = json.loads(marker.read_text())
            store = VolumeStore.open(record["store"])
            if store.record["volumes"] == record["volumes"]:
                return store, Splits.load(run_dir / "splits.tsv", cohort)
        except (OSError, ValueError, KeyError, NeuroclError):
            pass  # not written yet, or being replaced by the primary
        time.sleep(2.0)
    raise TrainingError(f"DDP process: no prepared store and splits in {run_dir} after {_PREPARE_TIMEOUT_S} s")


def _train_as_worker(config: PipelineConfig, run_dir: Path, resume: bool) -> Path:
    """A DDP process other than the primary: train the same networks, in the same order, nothing else.

    Lightning launches these processes (re-running the command) at the primary's first
    ``Trainer.fit`` and they join each later fit; torchrun or SLURM start them with the primary.
    """
    from neurocl.cohort import Cohort

    cohort = Cohort.from_yaml(config.cohort)
    store, splits = _wait_until_prepared(config, run_dir, cohort)
    for _, method, out_dir in _training_jobs(config, run_dir):
        train(config, method, out_dir, cohort, store, splits, resume)
    return run_dir


def run_pipeline(path: str | os.PathLike, out: str | os.PathLike, resume: bool = False,
                 overrides: dict | None = None, settings: Sequence[str] = ()) -> Path:
    """``neurocl run PIPELINE --out RUN``: every stage of a pipeline into the run directory.

    validate cohort -> store (reused when up to date) -> splits.tsv -> train (the method, then
    trained baselines) -> embeddings.tsv -> probes.tsv + separation.json -> baselines -> maps ->
    report. Under DDP the extra processes only train (:func:`_train_as_worker`).

    Parameters
    ----------
    path : path
        Pipeline YAML.
    out : path
        Run directory (new, or the killed run's own with ``resume``).
    resume : bool
        Continue every training from its ``checkpoints/last.ckpt`` (the last complete
        checkpoint); the stages after training are recomputed.
    overrides : dict, optional
        Top-level pipeline fields replacing the YAML's.
    settings : list of str
        ``neurocl run --set SECTION.FIELD=VALUE`` settings, validated with the YAML (the run's
        config.yaml records the result).

    Returns
    -------
    Path
        The run directory.
    """
    from neurocl.cohort import Cohort
    from neurocl.store import VolumeStore

    config = load_pipeline(path, overrides, settings)
    run_dir = Path(out).absolute()
    if not _is_primary_process():
        return _train_as_worker(config, run_dir, resume)
    _prepare_run_dir(config, run_dir, resume)

    console.print(f"[bold]cohort[/] {config.cohort}")
    cohort = Cohort.from_yaml(config.cohort)
    cohort.check(check_images=True)
    _check_names(config, cohort)
    store = VolumeStore.build(cohort, config.outputs.store or run_dir / "store", config.preprocess, progress=True)
    splits = _splits(config, cohort, run_dir)
    if config.harmonise is not None:
        from neurocl.harmonise import harmonise_run_store

        console.print(f"[bold]harmonising[/] {config.harmonise.site} with ComBat (protecting {config.harmonise.protect})")
        store = harmonise_run_store(store, cohort, splits, config.harmonise, run_dir / "store-harmonised")
    write_json(_prepared_marker(run_dir), {"store": str(store.cache_dir), "volumes": store.record["volumes"]})

    modules = {}
    for name, method, out_dir in _training_jobs(config, run_dir):
        console.print(f"[bold]training[/] {name}: {method.name} with {config.encoder.name}")
        modules[name] = train(config, method, out_dir, cohort, store, splits, resume)

    console.print("[bold]embedding[/] every subject")
    embeddings = embeddings_table(modules["main"], store, cohort, splits, config.outputs.embed_batch_size, progress=True)
    write_tsv(run_dir / "embeddings.tsv", embeddings)
    ground_truth = _ground_truth(config)
    attributes = config.evaluation.attributes
    console.print("[bold]probing[/] " + ("every attribute" if attributes is None else ", ".join(attributes) or "nothing"))
    _probe(embeddings, cohort, config, run_dir, ground_truth)

    for entry in config.baselines:
        out_dir = run_dir / "baselines" / entry.name
        if entry.name in ("pca", "cpca", "combat"):
            baselines = _optional_module("baselines", f"baseline {entry.name}")
            if baselines is None:
                continue
            console.print(f"[bold]baseline[/] {entry.name}")
            # Fitted on the training subjects only, like the trained networks.
            table = baselines.voxel_embeddings(store, cohort, method=entry.name, n_components=entry.n_components,
                                               splits=splits, alpha=entry.alpha, seed=config.training.seed,
                                               progress=True, site=entry.site, protect=entry.protect)
        else:
            console.print(f"[bold]baseline[/] {entry.name}: embedding every subject")
            table = embeddings_table(modules[f"baselines/{entry.name}"], store, cohort, splits,
                                     config.outputs.embed_batch_size, progress=True)
        write_tsv(out_dir / "embeddings.tsv", table)
        _probe(table, cohort, config, out_dir, ground_truth)

    if config.maps.enabled:
        from neurocl.maps import run_maps

        console.print("[bold]maps[/]")
        run_maps(run_dir, config=config.maps, ground_truth=ground_truth.parent if ground_truth else None)

    if config.outputs.report:
        report = _optional_module("report", "the report")
        if report is not None:
            html, _ = report.write_report(run_dir)
            console.print(f"report: [bold]{html}[/]")
    console.print(f"run finished: [bold]{run_dir}[/]")
    return run_dir


# The demo cohort: 200 subjects at 4 mm, 2 subtypes, 3 sites. The subtype loss is set stronger and
# the individual deformation weaker than the generator's defaults so that a small CNN trained for a
# few minutes on 2 CPU cores finds the subtypes (docs/getting-started.md says what the demo reaches).
DEMO_COHORT = {"n_subjects": 200, "resolution": 4.0, "subtypes": 2, "sites": 3, "subtype_effect": 2.5,
               "deformation": 0.25, "seed": 0}
# What `neurocl demo` checks on its run: attribute -> (space it should be decodable from, space it should not).
DEMO_EXPECTED = {
    "subtype": ("salient", "common"),
    "severity": ("salient", "common"),
    "age": ("common", "salient"),
    "sex": ("common", "salient"),
    "site": ("common", "salient"),
}
DEMO_MAP_AUC = 0.8
DEMO_ARI = 0.5


def run_demo(out: str | os.PathLike = "neurocl-demo", resume: bool = False) -> Path:
    """``neurocl demo``: the demo synthetic cohort into ``OUT/cohort``, the demo pipeline into ``OUT/run``.

    The cohort is :data:`DEMO_COHORT` (made once; a later call reuses it after checking it was
    made with the same options), the pipeline ``neurocl/pipelines/demo.yaml``. At the end the
    demo checks its scientific targets on the run (:func:`demo_summary`), prints them and writes
    ``OUT/demo_summary.json``.

    Parameters
    ----------
    out : path
        Folder for ``cohort/``, ``run/`` and ``demo_summary.json``.
    resume : bool
        Continue a killed demo from ``OUT/run/checkpoints/last.ckpt``.

    Returns
    -------
    Path
        The run directory ``OUT/run``.
    """
    started = time.monotonic()
    out = Path(out)
    cohort_yaml = _demo_cohort(out / "cohort")
    run_dir = run_pipeline(DEMO_PIPELINE, out / "run", resume=resume,
                           overrides={"cohort": str(cohort_yaml.absolute())})
    summary = demo_summary(run_dir, cohort_yaml.parent)
    summary["wall_time_s"] = round(time.monotonic() - started, 1)
    summary["resumed"] = resume
    write_json(out / "demo_summary.json", summary)
    _print_demo_summary(summary)
    return run_dir


def _demo_cohort(folder: Path) -> Path:
    """``folder/cohort.yaml`` of the demo cohort, generated unless a complete one made alike is there."""
    from neurocl.synth import SynthConfig, make_synthetic_cohort

    config = SynthConfig(**DEMO_COHORT)
    cohort_yaml = folder / "cohort.yaml"
    if cohort_yaml.is_file():
        description = folder / "dataset_description.json"
        made_with = json.loads(description.read_text()).get("SynthConfig") if description.is_file() else None
        if made_with != config.model_dump():
            raise ConfigError(
                f"{folder} holds a synthetic cohort made with other options ({made_with}) than the demo's "
                f"({config.model_dump()}); give `neurocl demo` another --out"
            )
        console.print(f"[bold]synthetic cohort[/] reusing {folder}")
        return cohort_yaml
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(
            f"{folder} is an incomplete synthetic cohort (no cohort.yaml: its generation was interrupted); "
            "delete it and run `neurocl demo` again"
        )
    console.print(f"[bold]synthetic cohort[/] {config.n_subjects} subjects at {config.resolution:g} mm into {folder}")
    return make_synthetic_cohort(folder, config, progress=True)


def demo_summary(run_dir: str | os.PathLike, cohort_dir: str | os.PathLike) -> dict:
    """The demo's targets measured on a finished run of a synthetic cohort.

    * ``probes``: for each attribute of :data:`DEMO_EXPECTED` and each space, the primary probe
      score (balanced accuracy or R^2), its 95% CI, permutation p-value and chance, from
      ``probes.tsv`` (subset ``target`` for severity, ``all`` for age, sex and site). The subtype is
      not a cohort attribute (a real study does not know it): it is probed here, on target subjects,
      from ``ground_truth.tsv`` with the run's probe settings.
    * ``maps``: the mean AUC of the subtype maps against the true masks per attribution method
      and the adjusted Rand index of the clusters, from ``maps/evaluation.json``.
    * ``targets``: each check and whether it holds (decodable = p < 0.05 and score above chance).
    """
    from neurocl.cohort import Cohort
    from neurocl.probe import PRIMARY_METRIC, probe_attribute

    run_dir, cohort_dir = Path(run_dir), Path(cohort_dir)
    config = PipelineConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    probes = read_tsv(run_dir / "probes.tsv")
    embeddings = read_tsv(run_dir / "embeddings.tsv")
    truth = read_tsv(cohort_dir / "ground_truth.tsv")
    kinds = Cohort.from_yaml(cohort_dir / "cohort.yaml").attribute_kinds
    results: dict[str, dict] = {}
    for attribute in DEMO_EXPECTED:
        if attribute == "subtype":
            results[attribute] = _probe_subtype(embeddings, truth, config.evaluation.probe, probe_attribute)
            continue
        subset = "target" if attribute == "severity" else "all"
        rows = probes[(probes["attribute"] == attribute) & (probes["subset"] == subset)
                      & (probes["metric"] == PRIMARY_METRIC[kinds[attribute]])]
        results[attribute] = {row["space"]: _probe_record(row, subset) for _, row in rows.iterrows()}
    targets = []
    for attribute, (wanted, unwanted) in DEMO_EXPECTED.items():
        for space, expected in ((wanted, True), (unwanted, False)):
            record = results[attribute].get(space)
            reached = record is not None and record["decodable"] == expected
            targets.append({"check": f"{attribute} {'decodable' if expected else 'not decodable'} from {space}",
                            "reached": reached})
    maps = _demo_maps(run_dir)
    for method, auc in maps.get("mean_auc_subtype_map", {}).items():
        targets.append({"check": f"{method} map AUC >= {DEMO_MAP_AUC}", "reached": auc is not None and auc >= DEMO_MAP_AUC})
    if "ari" in maps:
        targets.append({"check": f"cluster ARI >= {DEMO_ARI}", "reached": maps["ari"] is not None and maps["ari"] >= DEMO_ARI})
    return {"run": str(run_dir), "probes": results, "maps": maps, "targets": targets,
            "all_reached": all(target["reached"] for target in targets)}


def _probe_record(row, subset: str) -> dict:
    def number(value):
        return None if pd.isna(value) else float(value)

    value, p_value, chance = number(row["value"]), number(row["p_value"]), number(row["chance"])
    decodable = value is not None and p_value is not None and p_value < 0.05 and value > (chance or 0.0)
    return {"subset": subset, "metric": row["metric"], "value": value, "ci": [number(row["ci_low"]), number(row["ci_high"])],
            "p_value": p_value, "chance": chance, "n": number(row.get("n")), "decodable": decodable}


def _probe_subtype(embeddings: pd.DataFrame, truth: pd.DataFrame, probe_config: ProbeConfig, probe_attribute) -> dict:
    """Subtype (1..K) of the target subjects probed from each space (balanced accuracy)."""
    table = embeddings.merge(truth[["participant_id", "subtype"]], on="participant_id", how="inner")
    table = table[table["group"] == "target"]
    records = {}
    for space in ("common", "salient"):
        columns = [c for c in table.columns if c.startswith(f"{space}_")]
        rows, _ = probe_attribute(table[columns].to_numpy(dtype=np.float64), table["subtype"].astype(int).to_numpy(),
                                  table["participant_id"].to_numpy(), "categorical", probe_config)
        primary = [row for row in rows if row["metric"] == "balanced_accuracy"]
        if primary:
            records[space] = _probe_record(pd.Series(primary[0]), "target")
    return records


def _demo_maps(run_dir: Path) -> dict:
    path = run_dir / "maps" / "evaluation.json"
    if not path.is_file():
        return {}
    evaluation = json.loads(path.read_text())
    summary = evaluation.get("summary", {})
    return {
        "ari": evaluation.get("ari"),
        "n_clusters": evaluation.get("n_clusters"),
        "mean_auc_subtype_map": {method: values.get("mean_auc_subtype_map") for method, values in summary.items()},
        "mean_auc_cluster_map": {method: values.get("mean_auc_cluster_map") for method, values in summary.items()},
    }


def _number(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _demo_cell(record: dict | None) -> str:
    if record is None:
        return "n/a"
    return f"{_number(record['value'], 2)} (p={_number(record['p_value'], 3)})" + (" *" if record["decodable"] else "")


def _print_demo_summary(summary: dict) -> None:
    from rich.table import Table

    out = results_console()  # the demo's results go to stdout, its progress to stderr
    table = Table(title="neurocl demo: what is decodable from which space (cross-validated linear probes)")
    for column in ("attribute", "subjects", "metric", "common", "salient", "chance"):
        table.add_column(column)
    for attribute, spaces in summary["probes"].items():
        if not spaces:
            continue
        first = next(iter(spaces.values()))
        cells = [_demo_cell(spaces.get(space)) for space in ("common", "salient")]
        table.add_row(attribute, first["subset"], first["metric"], *cells, _number(first["chance"], 2))
    out.print(table)
    maps = summary["maps"]
    if maps:
        aucs = ", ".join(f"{method} {_number(auc, 2)}" for method, auc in maps["mean_auc_subtype_map"].items())
        out.print(f"maps: AUC vs true subtype masks: {aucs}; clusters: {maps['n_clusters']}, "
                      f"ARI {_number(maps['ari'], 2)}")
    for target in summary["targets"]:
        mark = "[green]reached[/]" if target["reached"] else "[red]missed[/]"
        out.print(f"  {mark}  {target['check']}")
    out.print(f"demo finished in {summary['wall_time_s'] / 60:.1f} min; summary: demo_summary.json beside the run")


# ---------------------------------------------------------------- trained models


def load_model(checkpoint: str | os.PathLike):
    """The trained method of a checkpoint (CPU, eval mode), loaded with ``weights_only=True``.

    The module's ``grid`` holds the training store's affine, mask and preprocessing (for
    embedding new subjects on the same grid).
    """
    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a damaged file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from None
    if "hyper_parameters" not in state or "state_dict" not in state:
        raise ConfigError(f"checkpoint {path} is not a neurocl training checkpoint")
    module = method_from_checkpoint(state)
    module.grid = state.get("neurocl_grid")
    return module


def embed_cohort(checkpoint: str | os.PathLike, cohort_yaml: str | os.PathLike, out_tsv: str | os.PathLike) -> Path:
    """``neurocl embed``: embeddings.tsv of new subjects, preprocessed onto the training store's grid.

    The images are resampled onto the stored (cropped) grid of the training run, masked with
    its brain mask and normalised the same way, in a temporary store that is removed after.
    """
    import nibabel as nib

    from neurocl.cohort import Cohort
    from neurocl.store import VolumeStore

    module = load_model(checkpoint)
    if not module.grid:
        raise ConfigError(f"checkpoint {checkpoint} has no training grid record; it was not written by neurocl run")
    cohort = Cohort.from_yaml(cohort_yaml)
    cohort.check(check_images=True)
    affine = np.asarray(module.grid["affine"], dtype=float)
    mask = module.grid["mask"].numpy().astype(np.uint8)
    with tempfile.TemporaryDirectory(prefix="neurocl-embed-") as scratch:
        scratch = Path(scratch)
        nib.save(nib.Nifti1Image(mask, affine), scratch / "mask.nii.gz")
        preprocess = PreprocessConfig.model_validate(module.grid["preprocess"]).model_copy(update={
            "voxel_size": None, "reference": scratch / "mask.nii.gz", "mask": scratch / "mask.nii.gz",
            "crop_to_mask": False,
        })
        store = VolumeStore.build(cohort, scratch / "store", preprocess, progress=True)
        embeddings = embeddings_table(module, store, cohort, batch_size=16)
    return write_tsv(out_tsv, embeddings)


@dataclass
class Run:
    """A finished run as objects: what ``neurocl maps`` and notebooks work from."""

    run_dir: Path
    config: PipelineConfig
    cohort: Any
    store: Any
    model: Any
    embeddings: pd.DataFrame


def load_run(run_dir: str | os.PathLike, checkpoint: str = "last.ckpt") -> Run:
    """Open a run directory: resolved config, cohort, store, trained model (CPU, eval) and embeddings."""
    from neurocl.cohort import Cohort
    from neurocl.store import VolumeStore

    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (config.yaml missing)")
    try:
        config = PipelineConfig.model_validate(yaml.safe_load(saved.read_text()))
    except ValidationError as error:
        raise _format_validation(str(saved), error) from None
    embeddings_path = run_dir / "embeddings.tsv"
    if not embeddings_path.is_file():
        raise NeuroclError(f"{run_dir}: no embeddings.tsv yet; finish the run first (neurocl run ... --resume)")
    return Run(
        run_dir=run_dir,
        config=config,
        cohort=Cohort.from_yaml(config.cohort),
        store=VolumeStore.open(config.outputs.store or run_dir / "store"),
        model=load_model(run_dir / "checkpoints" / checkpoint),
        embeddings=read_tsv(embeddings_path),
    )
