"""``neurocl bench patches``: patches per second of neurocl's batched patch gather against TorchIO and MONAI.

The same synthetic volumes, the same patch size and the same number of patches per volume go through

* **neurocl**: :class:`~neurocl.store.VolumeStore` (resident on the GPU, or read from its memory map
  on the CPU) + :func:`~neurocl.patches.random_corners` + :func:`~neurocl.patches.store_patches`:
  the K patches of each of the B subjects of a batch in one gather;
* **TorchIO**: ``SubjectsDataset`` + ``Queue`` (``samples_per_volume=K``, ``UniformSampler``, the
  subjects loaded by worker processes) + ``SubjectsLoader``, as TorchIO documents patch training;
* **MONAI**: ``CacheDataset`` + ``RandSpatialCropSamplesd(num_samples=K)`` + ``DataLoader`` with
  worker processes and ``list_data_collate`` (B subjects give B * K patches).

Only the sampling is measured (no augmentation: neither baseline's sampler augments). Every library
serves batches of ``B * K`` patches, ``B`` subjects drawn with replacement; the baselines get every
core as worker processes and neurocl as many threads on the CPU. Times are wall-clock over
``n_batches`` after a warm-up (neurocl: one batch; a baseline: one batch per worker); on a GPU each
batch ends on the device and is synchronised (the baselines include the host-to-device copy).

With a model (default on a GPU) it also measures a DenseNet121 bf16 training step: the peak GPU
memory on ``B * K`` patches against ``B * K`` whole volumes, and the share of the step that the
patch path (draw, gather and the full y-Aware view recipe) takes.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from rich.console import Console

from neurocl.bench import (
    INSTALL_HINTS, _synchronise, _worker_seed, describe_machine, installed, measurement_table, print_missing_and_machine,
    synthetic_volumes,
)
from neurocl.errors import ConfigError
from neurocl.patches import PatchConfig, PatchSampler, random_corners, store_patches
from neurocl.store import VolumeStore
from neurocl.views import ViewConfig, ViewSampler

LIBRARIES = ("neurocl", "torchio", "monai")
SHAPES = ((121, 145, 121), (182, 218, 182))  # MNI at 1.5 mm and 1 mm (OpenBHB quasi-raw)
SIZES = (64, 96)


@dataclass
class PatchBenchConfig:
    """What ``neurocl bench patches`` measures.

    Parameters
    ----------
    shapes : volume shapes (3D)
    sizes : patch sides in voxels (cubes)
    per_subject : patches K per subject (TorchIO's samples_per_volume, MONAI's num_samples)
    batch_size : subjects B per batch (a batch holds B * K patches)
    n_batches : measured batches per library and setting
    n_subjects : synthetic subjects that batches are drawn from
    device : "cpu" or "cuda"
    workers : baselines' worker processes (default: every core); neurocl's threads on the CPU
    libraries : what to run
    model : also measure a DenseNet121 step (memory on patches vs whole volumes, patch path share)
    memory_budget_gb : neurocl's GPU residency budget; 0 forces pinned-memory staging
    seed : seed of the volumes and of the patch draws
    """

    shapes: Sequence[tuple[int, ...]] = SHAPES
    sizes: Sequence[int] = SIZES
    per_subject: int = 8
    batch_size: int = 4
    n_batches: int = 8
    n_subjects: int = 16
    device: str = "cpu"
    workers: int | None = None
    libraries: Sequence[str] = LIBRARIES
    model: bool = False
    memory_budget_gb: float | None = None
    seed: int = 0

    def __post_init__(self):
        if any(len(shape) != 3 or min(shape) < 8 for shape in self.shapes):
            raise ConfigError(f"--shapes must be 3D shapes of sides >= 8, got {list(self.shapes)}")
        too_large = [(size, shape) for size in self.sizes for shape in self.shapes if size > min(shape)]
        if any(size < 1 for size in self.sizes) or too_large:
            raise ConfigError(f"--sizes must be positive and fit every shape, got {list(self.sizes)} "
                              f"for shapes {list(self.shapes)}")
        for name in ("per_subject", "batch_size", "n_batches", "n_subjects"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [library for library in self.libraries if library not in LIBRARIES]
        if unknown:
            raise ConfigError(f"unknown library {unknown}: libraries are {LIBRARIES}")
        if self.device not in ("cpu", "cuda") or (self.device == "cuda" and not torch.cuda.is_available()):
            raise ConfigError(f"--device {self.device!r}: use cpu, or cuda on a machine with a CUDA GPU")

    @property
    def patches_per_batch(self) -> int:
        return self.batch_size * self.per_subject

    def worker_count(self) -> int:
        return self.workers if self.workers is not None else (os.cpu_count() or 1)


@dataclass
class PatchMeasurement:
    library: str
    shape: tuple[int, ...]
    size: int
    patches: int
    seconds: float
    note: str = ""

    @property
    def patches_per_second(self) -> float:
        return self.patches / self.seconds


@dataclass
class ModelMeasurement:
    """One DenseNet121 bf16 training step on ``batch`` inputs of ``input_shape``."""

    input_shape: tuple[int, ...]
    batch: int
    peak_gib: float | None  # None: not measured (CPU) or out of memory (see ``out_of_memory``)
    step_s: float | None = None
    data_s: float | None = None
    out_of_memory: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def data_share(self) -> float | None:
        if self.data_s is None or self.step_s is None:
            return None
        return self.data_s / (self.data_s + self.step_s)


# ---------------------------------------------------------------- neurocl


def _measure_neurocl(store, shape, size: int, config: PatchBenchConfig) -> PatchMeasurement:
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator(device=store.device).manual_seed(config.seed)
    patch = (size,) * 3
    k = config.per_subject

    def one_batch() -> torch.Tensor:
        rows = np.repeat(rng.integers(0, len(store), size=config.batch_size), k)
        corners = random_corners(len(rows), shape, patch, generator)
        return store_patches(store, rows, corners, patch)

    one_batch()  # warm-up: kernels, page cache, allocator
    _synchronise(config.device)
    start = time.perf_counter()
    n_patches = sum(one_batch().shape[0] for _ in range(config.n_batches))
    _synchronise(config.device)
    seconds = time.perf_counter() - start
    where = "resident on GPU" if store.resident else ("pinned staging" if config.device == "cuda" else "memmap")
    note = f"{where}, {torch.get_num_threads()} threads" if config.device == "cpu" else where
    return PatchMeasurement("neurocl", tuple(shape), size, n_patches, seconds, note)


# ---------------------------------------------------------------- baselines


def _subject_draws(config: PatchBenchConfig, n_volumes: int, n_warm: int) -> torch.utils.data.Sampler:
    """Subjects drawn with replacement, enough for the warm-up and the measured batches in one epoch
    (an epoch boundary would restart the baselines' workers inside the measured window)."""
    generator = torch.Generator().manual_seed(config.seed)
    return torch.utils.data.RandomSampler(range(n_volumes), replacement=True, generator=generator,
                                          num_samples=config.batch_size * (config.n_batches + n_warm))


def _torchio_loader(volumes: np.ndarray, size: int, config: PatchBenchConfig, n_warm: int):
    import torchio as tio

    subjects = [tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(v.astype(np.float32)))) for v in volumes]
    queue = tio.Queue(
        tio.SubjectsDataset(subjects),
        # The queue holds four batches: it refills (workers loading subjects) while patches are served.
        max_length=4 * config.patches_per_batch,
        samples_per_volume=config.per_subject,
        sampler=tio.UniformSampler(size),
        subject_sampler=_subject_draws(config, len(volumes), n_warm),
        num_workers=config.worker_count(),
        shuffle_subjects=False,  # the subject sampler already draws at random
        shuffle_patches=True,
    )
    # The queue's own workers load subjects; the loader over the queue must stay in this process.
    loader = tio.SubjectsLoader(queue, batch_size=config.patches_per_batch, num_workers=0,
                                pin_memory=config.device == "cuda")
    return (batch["image"][tio.DATA] for batch in loader)


def _monai_loader(volumes: np.ndarray, size: int, config: PatchBenchConfig, n_warm: int):
    from monai import transforms as mt
    from monai.data import CacheDataset, DataLoader, list_data_collate

    transform = mt.Compose([
        mt.EnsureTyped("image", dtype=torch.float32, track_meta=False),  # cached by CacheDataset
        mt.RandSpatialCropSamplesd("image", roi_size=(size,) * 3, num_samples=config.per_subject, random_size=False),
    ])
    dataset = CacheDataset([{"image": v.astype(np.float32)} for v in volumes], transform=transform, progress=False)
    workers = config.worker_count()
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=_subject_draws(config, len(volumes), n_warm),
                        num_workers=workers, collate_fn=list_data_collate, pin_memory=config.device == "cuda",
                        prefetch_factor=2 if workers > 0 else None, worker_init_fn=_worker_seed)
    return (batch["image"] for batch in loader)


def _measure_baseline(library: str, volumes: np.ndarray, size: int, config: PatchBenchConfig) -> PatchMeasurement:
    n_warm = max(1, config.worker_count())
    make = _torchio_loader if library == "torchio" else _monai_loader
    batches = make(volumes, size, config, n_warm)
    # Warm-up: one batch per worker, so that the measured window starts with every worker busy.
    first = [next(batches).to(config.device) for _ in range(n_warm)]
    _synchronise(config.device)
    start = time.perf_counter()
    n_patches = 0
    for batch in batches:
        batch = batch.to(config.device, non_blocking=True)
        n_patches += batch.shape[0]
    _synchronise(config.device)
    seconds = time.perf_counter() - start
    if first[0].shape[1:] != (1, size, size, size):
        raise RuntimeError(f"{library} served patches of shape {tuple(first[0].shape[1:])}, expected (1, {size}, {size}, {size})")
    del first, batches
    return PatchMeasurement(library, tuple(volumes.shape[2:]), size, n_patches, seconds,
                            f"{config.worker_count()} workers")


# ---------------------------------------------------------------- the model step


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def model_step(make_inputs, device: torch.device, n_steps: int = 2, net=None) -> ModelMeasurement:
    """Peak memory and seconds of DenseNet121 bf16 training steps on ``make_inputs()`` batches.

    ``make_inputs()`` returns ``(N, 1, *S)`` inputs on ``device`` (timed as the data path); the first
    step compiles kernels and allocates and is not timed. An out-of-memory error is reported as such.
    """
    from monai.networks.nets import DenseNet121

    net = net or DenseNet121(spatial_dims=3, in_channels=1, out_channels=128).to(device)
    optimiser = torch.optim.SGD(net.parameters(), lr=0.01)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    data_seconds, step_seconds = [], []
    shape, batch = None, None
    _reset_peak(device)
    try:
        for number in range(n_steps + 1):
            _synchronise(device.type)
            start = time.perf_counter()
            inputs = make_inputs()
            _synchronise(device.type)
            middle = time.perf_counter()
            shape, batch = tuple(inputs.shape[2:]), inputs.shape[0]
            with autocast:
                loss = net(inputs).float().pow(2).mean()
            loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            del inputs, loss
            _synchronise(device.type)
            if number:
                data_seconds.append(middle - start)
                step_seconds.append(time.perf_counter() - middle)
    except torch.OutOfMemoryError:
        peak = _peak_gib(device)
        optimiser.zero_grad(set_to_none=True)
        del net, optimiser
        _reset_peak(device)
        return ModelMeasurement(shape or (), batch or 0, None, out_of_memory=True, extra={"peak_before_gib": peak})
    peak = _peak_gib(device)
    del net, optimiser
    _reset_peak(device)
    return ModelMeasurement(shape, batch, peak, float(np.mean(step_seconds)), float(np.mean(data_seconds)))


def _measure_models(store, volumes_shape, config: PatchBenchConfig) -> dict:
    """DenseNet121 steps on B * K patches (the patch path with the full view recipe) and on B * K whole volumes."""
    device = torch.device(config.device)
    results: dict[str, ModelMeasurement] = {}
    generator = torch.Generator(device=store.device).manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    for size in config.sizes:
        sampler = PatchSampler(PatchConfig(size=size, per_subject=config.per_subject), ViewSampler(ViewConfig()), store)

        def patches(sampler=sampler):
            views, _ = sampler(rng.integers(0, len(store), size=config.batch_size), n_views=1, generator=generator)
            return views[0]

        results[f"patches {size}^3"] = model_step(patches, device)
    n_whole = config.patches_per_batch

    def whole():
        return store.batch(rng.integers(0, len(store), size=n_whole))

    results[f"whole {'x'.join(map(str, volumes_shape))}"] = model_step(whole, device)
    return results


# ---------------------------------------------------------------- the benchmark


def run_patch_benchmark(config: PatchBenchConfig, progress: bool = True) -> dict:
    """Measure every installed library at every (shape, size); returns measurements, ratios, models, missing."""

    console = Console(stderr=True, quiet=not progress)
    missing = [library for library in config.libraries if not installed(library)]
    libraries = [library for library in config.libraries if library not in missing]
    for library in missing:
        console.print(f"{library} is not installed: not measured ({INSTALL_HINTS.get(library, f'pip install {library}')})",
                      markup=False)
    measurements: list[PatchMeasurement] = []
    models: dict[str, dict] = {}
    threads = torch.get_num_threads()
    for shape in config.shapes:
        volumes = synthetic_volumes(config.n_subjects, shape, seed=config.seed)
        with tempfile.TemporaryDirectory(prefix="neurocl-bench-patches-") as scratch:
            store = VolumeStore.from_array(volumes, Path(scratch) / "store").to(config.device, config.memory_budget_gb)
            for size in config.sizes:
                for library in libraries:
                    console.print(f"measuring {library}: {size}^3 patches of {'x'.join(map(str, shape))} ...")
                    if library == "neurocl":
                        # On the CPU neurocl gets as many threads as the baselines get worker processes.
                        torch.set_num_threads(config.worker_count() if config.device == "cpu" else threads)
                        try:
                            measurements.append(_measure_neurocl(store, shape, size, config))
                        finally:
                            torch.set_num_threads(threads)
                    else:
                        measurements.append(_measure_baseline(library, volumes, size, config))
            if config.model:
                console.print(f"DenseNet121 bf16 steps on {'x'.join(map(str, shape))} ...")
                models["x".join(map(str, shape))] = _measure_models(store, shape, config)
            store.to("cpu")
            del store
    ratios = {}
    for shape in config.shapes:
        for size in config.sizes:
            rates = {m.library: m.patches_per_second for m in measurements if m.shape == tuple(shape) and m.size == size}
            if "neurocl" in rates:
                ratios[(tuple(shape), size)] = {f"neurocl/{lib}": rates["neurocl"] / rate
                                                for lib, rate in rates.items() if lib != "neurocl"}
    return {"config": config, "measurements": measurements, "ratios": ratios, "models": models, "missing": missing}


def result_dict(result: dict) -> dict:
    """The result as JSON types (for ``--out``)."""
    config: PatchBenchConfig = result["config"]
    return {
        "machine": describe_machine(config.device),
        "config": {name: (list(value) if isinstance(value, tuple) else value)
                   for name, value in vars(config).items()},
        "measurements": [{"library": m.library, "shape": list(m.shape), "size": m.size, "patches": m.patches,
                          "seconds": m.seconds, "patches_per_s": m.patches_per_second, "note": m.note}
                         for m in result["measurements"]],
        "ratios": [{"shape": list(shape), "size": size, **ratios} for (shape, size), ratios in result["ratios"].items()],
        "models": {shape: {name: {**vars(m), "data_share": m.data_share} for name, m in runs.items()}
                   for shape, runs in result["models"].items()},
        "missing": result["missing"],
    }


def print_patch_benchmark(result: dict, console=None) -> None:
    """The measured numbers as rich tables, then the ratios and the model steps."""
    console = console or Console()
    config: PatchBenchConfig = result["config"]
    title = (f"neurocl bench patches: batch {config.batch_size} subjects x {config.per_subject} patches, "
             f"{config.n_batches} measured batches, device {config.device}")
    rows = [("x".join(map(str, m.shape)), f"{m.size}^3", m.library, str(m.patches), f"{m.seconds:.2f}",
             f"{m.patches_per_second:.1f}", m.note) for m in result["measurements"]]
    console.print(measurement_table(title, ("volume", "patch", "library", "patches", "seconds", "patches/s", "setting"),
                                    ("patches", "seconds", "patches/s"), rows))
    for (shape, size), ratios in result["ratios"].items():
        if ratios:
            text = ", ".join(f"{name} = {value:.2f}x" for name, value in ratios.items())
            console.print(f"{'x'.join(map(str, shape))}, {size}^3: {text}")
    for shape, runs in result["models"].items():
        for name, m in runs.items():
            if m.out_of_memory:
                console.print(f"DenseNet121 bf16 step, {m.batch} x {name}: out of memory")
                continue
            memory = f"peak {m.peak_gib:.1f} GiB" if m.peak_gib is not None else "peak memory not measured (CPU)"
            share = f", input path {100 * m.data_share:.1f}% of the step" if m.data_share is not None else ""
            console.print(f"DenseNet121 bf16 step, {m.batch} x {name}: {memory}, step {m.step_s * 1000:.0f} ms, "
                          f"input {m.data_s * 1000:.1f} ms{share}")
    print_missing_and_machine(console, result["missing"], config.device)
    console.print("  note: sampling only (no augmentation) in every library; neurocl's patches stay on "
                  f"{config.device}, the baselines' are copied there", style="dim")
