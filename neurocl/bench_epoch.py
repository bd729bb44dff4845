"""``neurocl bench epoch``: wall time of real training epochs of a method on a synthetic store.

One Lightning ``Trainer.fit`` of the method's own module (batched views on the store's device,
the encoder, the loss, the optimiser; bf16 autocast on a GPU), so the figure is what a user's
epoch costs, not a micro-benchmark of one part. The store is made from random volumes of the
asked shape (the content does not change the cost of a step); the first epoch pays for
kernel selection and allocation and is reported apart from the next ones.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from neurocl.bench import describe_machine, synthetic_volumes
from neurocl.errors import ConfigError
from neurocl.methods import TrainingData, build_method
from neurocl.store import VolumeStore
from neurocl.views import ViewConfig, ViewSampler


@dataclass
class EpochBenchConfig:
    """What one epoch benchmark trains.

    Parameters
    ----------
    method : str
        A method name (``sepclr``, ``simclr``, ...); half of the subjects are targets.
    encoder : str
        ``densenet121``, ``small_cnn``, ``resnet18``, ...
    shape : tuple of int
        Volume shape (3D).
    n_subjects : int
        Subjects in the (training) store: one epoch is ``n_subjects // batch_size`` steps.
    batch_size : int
        Subjects per step (two views each).
    epochs : int
        Epochs timed; the first one is reported apart (warm-up).
    device : "cpu" or "cuda"
    precision : str
        Lightning precision; ``auto``: bf16-mixed on a GPU that supports it, else 32-true.
    """

    method: str = "sepclr"
    encoder: str = "densenet121"
    shape: tuple[int, ...] = (121, 145, 121)
    n_subjects: int = 256
    batch_size: int = 32
    epochs: int = 2
    device: str = "cpu"
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.device not in ("cpu", "cuda") or (self.device == "cuda" and not torch.cuda.is_available()):
            raise ConfigError(f"--device {self.device!r}: use cpu, or cuda on a machine with a CUDA GPU")
        if self.n_subjects < 2 * self.batch_size:
            raise ConfigError(f"--subjects {self.n_subjects}: need at least two batches of {self.batch_size}")
        if self.precision == "auto":
            bf16 = self.device == "cuda" and torch.cuda.is_bf16_supported()
            self.precision = "bf16-mixed" if bf16 else "32-true"


class _EpochTimer(L.Callback):
    """Wall time of each training epoch, synchronised with the device."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        self.seconds.append(time.perf_counter() - self._start)


def run_epoch_benchmark(config: EpochBenchConfig) -> dict:
    """Train ``config.epochs`` epochs and return their wall times, steps and peak GPU memory."""
    torch.manual_seed(config.seed)
    volumes = synthetic_volumes(config.n_subjects, config.shape, seed=config.seed)
    is_target = torch.arange(config.n_subjects) % 2 == 1
    method = {"name": config.method}
    if config.method in ("yaware",):
        method.update(attributes=["age"], sigma=5.0)
    with tempfile.TemporaryDirectory() as scratch:
        store = VolumeStore.from_array(volumes, Path(scratch) / "store")
        data = TrainingData(
            store=store, sampler=ViewSampler(ViewConfig(), spatial_dims=len(config.shape), store=store),
            train_indices=np.arange(config.n_subjects), val_indices=np.arange(0), is_target=is_target,
            attributes=torch.rand(config.n_subjects, 1, generator=torch.Generator().manual_seed(config.seed)) * 50 + 20,
            attribute_kinds=["continuous"], batch_size=config.batch_size,
        )
        module = build_method(method, {"name": config.encoder}, seed=config.seed, data=data)
        timer = _EpochTimer()
        trainer = L.Trainer(
            max_epochs=config.epochs, accelerator="gpu" if config.device == "cuda" else "cpu", devices=1,
            precision=config.precision, callbacks=[timer], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            use_distributed_sampler=False, default_root_dir=scratch,
        )
        if config.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(module)
        peak_gb = torch.cuda.max_memory_allocated() / 1e9 if config.device == "cuda" else None
    steps = config.n_subjects // config.batch_size
    return {
        "config": asdict(config),
        "steps_per_epoch": steps,
        "epoch_seconds": timer.seconds,
        "warm_epoch_s": float(np.mean(timer.seconds[1:])) if len(timer.seconds) > 1 else None,
        "peak_gpu_memory_gb": peak_gb,
        "machine": describe_machine(config.device),
    }


def print_epoch_benchmark(result: dict, console) -> None:
    """Results as plain lines on ``console`` (stdout): every number whole, one per line."""
    config = result["config"]
    console.print(f"{config['method']} with {config['encoder']}, {config['n_subjects']} subjects of "
                  f"{'x'.join(map(str, config['shape']))}, batch {config['batch_size']} x 2 views, "
                  f"{config['precision']}, device {config['device']}")
    for number, seconds in enumerate(result["epoch_seconds"]):
        label = "epoch 1 (warm-up)" if number == 0 else f"epoch {number + 1}"
        console.print(f"{label}: {seconds:.2f} s ({seconds / result['steps_per_epoch']:.3f} s/step, "
                      f"{result['steps_per_epoch']} steps)")
    if result["peak_gpu_memory_gb"] is not None:
        console.print(f"peak GPU memory: {result['peak_gpu_memory_gb']:.1f} GB")
    console.print(f"machine: {result['machine']}")
