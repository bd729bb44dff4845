"""Training: the Lightning Trainer of a pipeline, its callbacks, and the DDP handshake.

:func:`train` trains one method into one run folder (``checkpoints/``, ``logs/metrics.csv``).
Checkpoints go through :class:`AtomicCheckpointIO` (temporary file + rename), so ``--resume``
always restarts from a complete one. Under DDP only the primary process prepares the store and the
splits; the other processes wait for ``logs/prepared.json`` (:func:`wait_until_prepared`) and
then train the same networks in the same order (:func:`train_as_worker`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch import loggers
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from neurocl.cohort import Cohort, Splits
from neurocl.config import PipelineConfig, TrainingConfig
from neurocl.embed import grid_record
from neurocl.errors import ConfigError, NeuroclError, TrainingError
from neurocl.io import torch_load_failure, torch_save, write_text
from neurocl.logs import is_terminal, progress_console
from neurocl.methods import EpochBatches, MethodConfig, TrainingData, build_method
from neurocl.rundir import RunDir
from neurocl.store import VolumeStore
from neurocl.views import ViewSampler

console = progress_console()

__all__ = [
    "AtomicCheckpointIO",
    "MetricsTable",
    "RunCheckpoints",
    "is_primary_process",
    "make_trainer",
    "run_callbacks",
    "seed_config",
    "train",
    "train_as_worker",
    "training_jobs",
    "wait_until_prepared",
]

# How long an extra DDP process waits for the primary to build the store and the splits.
PREPARE_TIMEOUT_S = 6 * 3600


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O through :func:`neurocl.io.torch_save` (temporary file + rename)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        torch_save(checkpoint, path)


class MetricsTable(L.Callback):
    """``logs/metrics.csv``: step, epoch, then each logged term; rows travel in the checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        row = {"step": trainer.global_step - 1, "epoch": trainer.current_epoch, "train/loss": float(outputs["loss"])}
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
            write_text(self.path, table[["step", "epoch", *terms]].to_csv(index=False))

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self.write(trainer)

    def on_train_end(self, trainer, module) -> None:
        self.write(trainer)

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])


class EpochLines(L.Callback):
    """One line per epoch to stderr (epoch, step, logged losses, time): Lightning's bar in a log file."""

    def __init__(self) -> None:
        self.console = progress_console()
        self.started = time.monotonic()

    def on_train_epoch_start(self, trainer, module) -> None:
        self.started = time.monotonic()

    def on_train_epoch_end(self, trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()
                   if name.endswith("_loss") and value.numel() == 1}  # train/loss repeats train_loss
        losses = ", ".join(f"{name} {value:.4g}" for name, value in sorted(metrics.items()))
        self.console.print(
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}, step {trainer.global_step}: {losses} "
            f"({time.monotonic() - self.started:.1f} s)", highlight=False, markup=False)


class RunCheckpoints(L.Callback):
    """``checkpoints/last.ckpt`` every N steps and at each epoch's end; ``best.ckpt`` at the lowest val loss.

    Epoch-end checkpoints are written after the last batch and again after validation,
    never in ``on_train_epoch_end``: Lightning does not restore the train loader's position
    from a checkpoint written there, and resuming would repeat the epoch's batch order.
    """

    def __init__(self, run: RunDir, every_n_steps: int) -> None:
        self.run, self.every_n_steps = run, every_n_steps
        self.best = float("inf")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if trainer.global_step % self.every_n_steps == 0 or last_of_epoch:
            trainer.save_checkpoint(self.run.last_checkpoint, weights_only=False)

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        val_loss = trainer.callback_metrics.get("val/loss")
        if val_loss is not None and float(val_loss) < self.best:
            self.best = float(val_loss)
            trainer.save_checkpoint(self.run.best_checkpoint, weights_only=False)
        trainer.save_checkpoint(self.run.last_checkpoint, weights_only=False)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]


class InterruptGuard(L.Callback):
    """One Ctrl-C stops training even when Python loses its KeyboardInterrupt.

    Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. Inside a
    finalizer (an object the garbage collector releases mid-step) it is printed as "Exception
    ignored" and dropped, and training goes on: seen once in the test suite, a SIGINT at step 2 of
    500 and the run finished with exit 0. The guard's handler records the signal before raising, and
    the next training batch raises again if the first interrupt was lost; Lightning then shuts down
    as for any Ctrl-C.
    """

    def __init__(self):
        self.received = False
        self._previous = None

    def _interrupt(self, signum, frame):
        self.received = True
        raise KeyboardInterrupt

    def on_fit_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._interrupt)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.received:
            raise KeyboardInterrupt

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # Give the previous handler back unless Lightning has replaced ours (it ignores Ctrl-C while it
        # shuts down after one).
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._interrupt:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None


def run_callbacks(run: RunDir, every_n_steps: int, progress: bool) -> list:
    """The callbacks of a run's Trainer: metrics table, checkpoints, and progress when asked."""
    callbacks = [MetricsTable(run.metrics), RunCheckpoints(run, every_n_steps), InterruptGuard()]
    if not progress:
        return callbacks
    # A bar redrawn in place on a terminal; one line per epoch in a log file (EpochLines).
    bar = RichProgressBar(leave=True, console_kwargs={"stderr": True}) if is_terminal(sys.stderr) else EpochLines()
    return callbacks + [bar]


def _on_gpu(training: TrainingConfig) -> bool:
    return training.accelerator == "gpu" or (training.accelerator == "auto" and torch.cuda.is_available())


def precision(training: TrainingConfig) -> str:
    """The Lightning precision of a training section (``auto``: bf16-mixed on a GPU that supports it)."""
    if training.precision != "auto":
        return training.precision
    return "bf16-mixed" if _on_gpu(training) and torch.cuda.is_bf16_supported() else "32-true"


def experiment_loggers(training: TrainingConfig, run: RunDir) -> list:
    """The Lightning loggers ``training.loggers`` names, writing under ``RUN/logs/trackers``.

    Nothing reaches the network unless the user configured it: MLflow logs to a local folder
    unless ``MLFLOW_TRACKING_URI`` is set, Weights & Biases runs offline unless ``WANDB_MODE`` is.
    """
    made = []
    for name in dict.fromkeys(training.loggers):
        if name == "csv":
            made.append(loggers.CSVLogger(run.trackers, name="csv", version=""))
        elif name == "tensorboard":
            made.append(loggers.TensorBoardLogger(run.trackers, name="tensorboard", version="", default_hp_metric=False))
        elif name == "mlflow":
            _require("mlflow", name)
            uri = os.environ.get("MLFLOW_TRACKING_URI") or (run.trackers / "mlruns").absolute().as_uri()
            made.append(loggers.MLFlowLogger(experiment_name="neurocl", run_name=run.path.name, tracking_uri=uri))
        else:
            _require("wandb", name)
            made.append(loggers.WandbLogger(project="neurocl", name=run.path.name, save_dir=str(run.trackers),
                                            offline=os.environ.get("WANDB_MODE", "offline") == "offline"))
    return made


def _require(package: str, logger: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"training.loggers: {logger!r} needs the {package} package: pip install 'neurocl[tracking]'")


def make_trainer(training: TrainingConfig, run_dir: str | os.PathLike | RunDir, progress: bool = True, **overrides):
    """The Lightning Trainer of a pipeline's training section (atomic checkpoints, metrics table, progress).

    ``overrides`` are passed to :class:`lightning.Trainer` over the ones the section gives.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    world = (training.devices if isinstance(training.devices, int) else 1) * training.num_nodes
    options = dict(
        max_epochs=training.epochs,
        accelerator=training.accelerator,
        devices=training.devices,
        num_nodes=training.num_nodes,
        strategy=training.strategy,
        precision=precision(training),
        sync_batchnorm=training.sync_batchnorm and world > 1 and _on_gpu(training),
        deterministic="warn" if training.deterministic else False,
        callbacks=run_callbacks(run, training.checkpoint_every_n_steps, progress),
        enable_progress_bar=progress and is_terminal(sys.stderr),
        plugins=[AtomicCheckpointIO()],
        logger=experiment_loggers(training, run),
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=1,
        default_root_dir=str(run.path),
    )
    options.update(overrides)
    return L.Trainer(**options)


# ---------------------------------------------------------------- training data


def _attribute_columns(cohort: Cohort, names: list[str], rows: np.ndarray, standardise: bool) -> tuple[np.ndarray, list[str]]:
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


def training_data(config: PipelineConfig, method: MethodConfig, cohort: Cohort, store: VolumeStore,
                  splits: Splits) -> TrainingData:
    """What a method trains on: the store, views, train/val store rows, groups and kernel attributes."""
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


def train(config: PipelineConfig, method: MethodConfig, run_dir: str | os.PathLike | RunDir, cohort: Cohort,
          store: VolumeStore, splits: Splits, resume: bool):
    """Train ``method`` into ``run_dir`` (checkpoints/, logs/); returns the module (CPU, eval mode)."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    L.seed_everything(config.training.seed, workers=False, verbose=False)
    data = training_data(config, method, cohort, store, splits)
    module = build_method(method, config.encoder, config.training.optim(), seed=config.training.seed, data=data)
    module.grid = grid_record(store)
    trainer = make_trainer(config.training, run)
    ckpt_path = run.last_checkpoint if resume and run.last_checkpoint.is_file() else None
    if ckpt_path is not None:
        check_resumable(ckpt_path)
        console.print(f"resuming from [bold]{ckpt_path}[/]")
    _warn_few_targets(cohort, method)
    try:
        trainer.fit(module, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:
        # Lightning answers Ctrl-C by shutting down gracefully, then sys.exit(1): the CLI would
        # exit 1 without a word. An interrupted fit is a KeyboardInterrupt (exit 130, resume hint).
        if trainer.interrupted:
            _restore_sigint()
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        _restore_sigint()
        raise KeyboardInterrupt
    _say_which_weights(run, data)
    # Lightning hands the module back on the CPU; the stages after training (embedding, maps)
    # run where it trained.
    return module.to("cuda" if _on_gpu(config.training) else "cpu").eval()


def check_resumable(path: Path) -> None:
    """Refuse, in one line naming it, a ``last.ckpt`` that cannot be resumed from (damaged or hostile).

    Loaded with ``weights_only=True`` as Lightning will: a file that holds anything but tensors
    and plain data is refused unread, so a crafted pickle runs nothing.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many unrelated types for a damaged or crafted file
        raise TrainingError(
            f"{path}: cannot resume from this checkpoint ({torch_load_failure(error)}); restore a good copy, "
            "or delete it and run again with --resume to retrain from the start"
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state or "loops" not in state:
        raise TrainingError(f"{path}: not a neurocl training checkpoint; --resume cannot continue from it")


def _restore_sigint() -> None:
    """Lightning ignores further Ctrl-C while it shuts down; callers in this process get it back."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _warn_few_targets(cohort: Cohort, method: MethodConfig) -> None:
    """Contrastive analysis needs target subjects in training and validation: say so when there are too few."""
    if not method.two_spaces:
        return
    n_targets = int(cohort.table.loc[cohort.is_target, "participant_id"].nunique())
    if n_targets < 2:
        console.print(
            f"[yellow]warning:[/] cohort {cohort.source} has {n_targets} target subject(s): the validation split "
            "cannot hold target subjects, so there will be no validation loss and no best.ckpt",
            highlight=False,
        )


def _say_which_weights(run: RunDir, data: TrainingData) -> None:
    """Name the weights the embeddings are made with, and why there is no best.ckpt when there is none."""
    if not run.best_checkpoint.is_file():
        is_target = data.is_target.cpu().numpy()
        n_target = int(is_target[data.val_indices].sum())
        console.print(
            f"[yellow]warning:[/] no validation loss was computed (the validation split holds {n_target} target and "
            f"{len(data.val_indices) - n_target} background image(s)), so there is no best.ckpt",
            highlight=False,
        )
    console.print(f"embeddings come from the final weights of training: {run.last_checkpoint}", highlight=False)


def training_jobs(config: PipelineConfig, run: RunDir) -> list[tuple[str, MethodConfig, RunDir, PipelineConfig]]:
    """Every network the pipeline trains, in order: (name, method, run folder, pipeline it trains with).

    The method, then each trained baseline (both at the primary seed), then the method again for
    each further seed of ``training.seeds`` into ``seeds/seed-<s>/`` (same splits, ``training.seed`` = s).
    """
    jobs = [("main", config.method, run, config)]
    for entry in config.baselines:
        if entry.trained:
            jobs.append((f"baselines/{entry.name}", entry.method(config.method), run.baseline(entry.name), config))
    for seed in config.training.run_seeds()[1:]:
        jobs.append((seed_job(seed), config.method, run.seed_run(seed), seed_config(config, seed)))
    return jobs


def seed_job(seed: int) -> str:
    """The name of training seed ``seed``'s job in :func:`training_jobs` (a further seed, not the primary)."""
    return f"seeds/seed-{seed}"


def seed_config(config: PipelineConfig, seed: int) -> PipelineConfig:
    """The pipeline as training seed ``seed`` trains it: ``training.seed`` = seed, the rest unchanged."""
    return config.model_copy(update={"training": config.training.model_copy(update={"seed": seed})})


def world_size(training: TrainingConfig) -> int:
    """Processes of a training section: devices per node (``auto``: every GPU, or 1 on CPU) x nodes."""
    if isinstance(training.devices, int):
        devices = training.devices
    else:
        devices = max(torch.cuda.device_count(), 1) if _on_gpu(training) else 1
    return devices * training.num_nodes


def check_batch_sizes(config: PipelineConfig, cohort: Cohort, splits: Splits) -> None:
    """Refuse, before any preprocessing, a batch that the training subjects cannot fill.

    The rule is the one the training batches apply (:class:`neurocl.methods.EpochBatches`: a
    global batch never holds a subject twice; SepCLR's share of each group must fit that group),
    applied to the cohort's training rows instead of the store's, which do not exist yet.
    """
    rows = splits.rows(cohort, "train")
    rows = rows[cohort.table["group"].notna().to_numpy()[rows]]
    methods = [config.method] + [entry.method(config.method) for entry in config.baselines if entry.trained]
    for method in methods:
        EpochBatches(rows, config.training.batch_size, is_target=cohort.is_target if method.two_spaces else None,
                     target_fraction=method.target_fraction, world_size=world_size(config.training))


# ---------------------------------------------------------------- DDP handshake


def is_primary_process() -> bool:
    """False in every DDP process but the first (those Lightning launches, or torchrun / SLURM ranks > 0)."""
    ranks = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
    return all(os.environ.get(name, "0") == "0" for name in ranks)


def wait_until_prepared(run: RunDir, cohort: Cohort) -> tuple[VolumeStore, Splits]:
    """The store and splits the primary process prepared (extra DDP processes never build them).

    The primary writes ``logs/prepared.json`` naming the store's volume file once the store and
    ``splits.tsv`` are complete; a store rebuilt since (new file name) is waited for again.
    """
    deadline = time.monotonic() + PREPARE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            record = json.loads(run.prepared.read_text())
            store = VolumeStore.open(record["store"])
            if store.record["volumes"] == record["volumes"]:
                return store, Splits.load(run.splits, cohort)
        except (OSError, ValueError, KeyError, NeuroclError):
            pass  # not written yet, or being replaced by the primary
        time.sleep(2.0)
    raise TrainingError(f"DDP process: no prepared store and splits in {run.path} after {PREPARE_TIMEOUT_S} s")


def train_as_worker(config: PipelineConfig, run: RunDir, resume: bool) -> Path:
    """A DDP process other than the primary: train the same networks, in the same order, nothing else.

    Lightning launches these processes (re-running the command) at the primary's first
    ``Trainer.fit`` and they join each later fit; torchrun or SLURM start them with the primary.
    """
    cohort = Cohort.from_yaml(config.cohort)
    store, splits = wait_until_prepared(run, cohort)
    for _, method, folder, job_config in training_jobs(config, run):
        train(job_config, method, folder, cohort, store, splits, resume)
    return run.path
