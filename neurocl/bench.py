"""``neurocl bench data``: views per second of neurocl's batched data path against MONAI and TorchIO.

The same synthetic volumes, the same augmentation recipe and two views per subject go through

* **neurocl**: :class:`~neurocl.store.VolumeStore` (resident on the GPU, or read from its memory
  map on the CPU) + :class:`~neurocl.views.ViewSampler`, one batched call per batch;
* **MONAI**: ``CacheDataset`` + the equivalent ``Compose`` of dictionary transforms + ``DataLoader``
  with worker processes, one sample at a time as MONAI documents it;
* **TorchIO**: ``SubjectsDataset`` + the equivalent ``Compose`` + ``DataLoader`` with worker
  processes.

Two recipes: ``full`` is y-Aware's (75% crop resized back, flip of one axis, Gaussian blur sigma in
[0.1, 1], Gaussian noise sigma in [0.1, 1], cutout of a quarter of each side; each p = 0.5);
``light`` keeps only what needs no interpolation (75% crop without resize, flip, noise, cutout).
Where a library has no exact equivalent the closest documented transform is used and listed by
:func:`recipe_notes` (printed with the table). Times are wall-clock over ``n_batches`` after a
warm-up (neurocl: one batch; a baseline: one batch per worker, so that the measured window starts
with every worker beginning a new batch), which absorbs worker start-up and CUDA initialisation;
on a GPU each measured batch
ends on the device (baselines include the host-to-device copy) and is synchronised.
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from neurocl.allocator import describe_allocator
from neurocl.errors import ConfigError
from neurocl.store import VolumeStore
from neurocl.views import ViewConfig, ViewSampler

RECIPES = ("full", "light")
LIBRARIES = ("neurocl", "monai", "torchio")
MNI_2MM = (91, 109, 91)
# How to add a baseline that is not installed (TorchIO is the optional extra "bench").
INSTALL_HINTS = {"torchio": 'pip install -e ".[bench]"  (or: pip install torchio)'}


@dataclass
class DataBenchConfig:
    """What ``neurocl bench data`` measures.

    Parameters
    ----------
    shape : spatial shape of the synthetic volumes (default 121x145x121, a 1.5 mm MNI grid)
    batch_size : subjects per batch (each gives ``n_views`` views)
    n_views : views per subject
    n_batches : measured batches per library (after the warm-up: one batch, one per worker for a baseline)
    n_subjects : size of the synthetic cohort that batches are drawn from
    device : "cpu" or "cuda"
    workers : DataLoader worker processes of the baselines (default: every core)
    recipes, libraries : what to run
    memory_budget_gb : neurocl's GPU residency budget; 0 forces pinned-memory staging
    model : "densenet121" to also time one training step and report the data path's share
    seed : seed of the synthetic volumes and of the views
    """

    shape: tuple[int, ...] = (121, 145, 121)
    batch_size: int = 32
    n_views: int = 2
    n_batches: int = 5
    n_subjects: int = 64
    device: str = "cpu"
    workers: int | None = None
    recipes: Sequence[str] = RECIPES
    libraries: Sequence[str] = LIBRARIES
    memory_budget_gb: float | None = None
    model: str | None = None
    seed: int = 0

    def __post_init__(self):
        if len(self.shape) not in (2, 3) or any(n < 8 for n in self.shape):
            raise ConfigError(f"--shape must be 2 or 3 sizes >= 8, got {self.shape}")
        for name in ("batch_size", "n_views", "n_batches", "n_subjects"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [r for r in self.recipes if r not in RECIPES] + [lib for lib in self.libraries if lib not in LIBRARIES]
        if bad:
            raise ConfigError(f"unknown recipe/library {bad}: recipes are {RECIPES}, libraries {LIBRARIES}")
        if self.device not in ("cpu", "cuda") or (self.device == "cuda" and not torch.cuda.is_available()):
            raise ConfigError(f"--device {self.device!r}: use cpu, or cuda on a machine with a CUDA GPU")
        if self.model not in (None, "densenet121"):
            raise ConfigError(f"--model {self.model!r}: only densenet121 is supported")


@dataclass
class Measurement:
    library: str
    recipe: str
    views: int
    seconds: float
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def views_per_second(self) -> float:
        return self.views / self.seconds


# ---------------------------------------------------------------- the recipe in each library


def view_config(recipe: str) -> ViewConfig:
    """neurocl's recipe: the y-Aware defaults, or the same without blur and without resize."""
    if recipe == "full":
        return ViewConfig()
    return ViewConfig(p_blur=0.0, crop_resize=False)


def _crop_size(shape: Sequence[int], fraction: float = 0.75) -> tuple[int, ...]:
    return tuple(math.ceil(fraction * n - 1e-9) for n in shape)


def monai_transform(recipe: str, shape: Sequence[int]):
    """MONAI dictionary transforms for ``recipe`` (key ``image``, channel-first)."""
    from monai import transforms as mt

    crop = _crop_size(shape)
    cut = _crop_size(shape, 0.25)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    if recipe == "full":
        crop_step = mt.OneOf([mt.Compose([mt.RandSpatialCropd("image", roi_size=crop, random_size=False),
                                          mt.Resized("image", spatial_size=shape, mode=mode)]),
                              mt.Identityd("image")])
    else:
        crop_step = mt.OneOf([mt.RandSpatialCropd("image", roi_size=crop, random_size=False),
                              mt.CenterSpatialCropd("image", roi_size=crop)])
    steps = [mt.EnsureTyped("image", dtype=torch.float32, track_meta=False), crop_step,
             mt.RandAxisFlipd("image", prob=0.5)]
    if recipe == "full":
        sigma = (0.1, 1.0)
        steps.append(mt.RandGaussianSmoothd("image", sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=0.5))
    steps += [
        mt.RandGaussianNoised("image", prob=0.5, mean=0.0, std=1.0, sample_std=True),
        mt.RandCoarseDropoutd("image", holes=1, spatial_size=cut, fill_value=0, prob=0.5),
    ]
    return mt.Compose(steps)


def _torchio_random_crop(tensor: torch.Tensor) -> torch.Tensor:
    """Random 75% crop without resize, at a uniform position (TorchIO has no random whole-image crop)."""
    size = _crop_size(tensor.shape[1:])
    start = [int(np.random.randint(0, n - c + 1)) for n, c in zip(tensor.shape[1:], size)]
    return tensor[(slice(None),) + tuple(slice(s, s + c) for s, c in zip(start, size))].clone()


def _torchio_centre_crop(tensor: torch.Tensor) -> torch.Tensor:
    size = _crop_size(tensor.shape[1:])
    start = [(n - c) // 2 for n, c in zip(tensor.shape[1:], size)]
    return tensor[(slice(None),) + tuple(slice(s, s + c) for s, c in zip(start, size))].clone()


def _torchio_cutout(tensor: torch.Tensor) -> torch.Tensor:
    """Cutout of a quarter of each side (TorchIO has no cutout transform)."""
    size = _crop_size(tensor.shape[1:], 0.25)
    start = [int(np.random.randint(0, n - c + 1)) for n, c in zip(tensor.shape[1:], size)]
    tensor = tensor.clone()
    tensor[(slice(None),) + tuple(slice(s, s + c) for s, c in zip(start, size))] = 0
    return tensor


def torchio_transform(recipe: str, shape: Sequence[int]):
    """TorchIO transforms for ``recipe`` (3D; 1 mm voxels so mm equal voxels)."""
    import torchio as tio

    crop = _crop_size(shape)
    if recipe == "full":
        # A 75% crop resized back is a zoom by 1/0.75 about a centre shifted by up to (n - c)/2 voxels.
        shifts = tuple(value for n, c in zip(shape, crop) for value in (-(n - c) / 2, (n - c) / 2))
        crop_step = tio.RandomAffine(scales=(1 / 0.75, 1 / 0.75), degrees=0, translation=shifts, isotropic=True,
                                     default_pad_value=0, image_interpolation="linear", p=0.5)
    else:
        crop_step = tio.OneOf({tio.Lambda(_torchio_random_crop): 0.5, tio.Lambda(_torchio_centre_crop): 0.5})
    flip = tio.OneOf({tio.RandomFlip(axes=(axis,), flip_probability=1.0): 1.0 for axis in range(3)}, p=0.5)
    steps = [crop_step, flip]
    if recipe == "full":
        steps.append(tio.RandomBlur(std=(0.1, 1.0), p=0.5))
    steps += [tio.RandomNoise(mean=0.0, std=(0.1, 1.0), p=0.5), tio.Lambda(_torchio_cutout, p=0.5)]
    return tio.Compose(steps)


def recipe_notes(recipe: str) -> list[str]:
    """Where a baseline's transform differs from neurocl's (same cost, slightly different distribution)."""
    notes = [
        "MONAI RandGaussianNoise draws sigma in [0, 1] (neurocl, TorchIO: [0.1, 1])",
        "TorchIO cutout is a tio.Lambda (no built-in cutout)",
    ]
    if recipe == "full":
        notes += [
            "MONAI RandGaussianSmooth and TorchIO RandomBlur draw one sigma per axis (neurocl: isotropic)",
            "TorchIO crop+resize is RandomAffine zoom 1/0.75 with a random shift (SimpleITK resampling)",
        ]
    else:
        notes.append("TorchIO random/centre crop is a tio.Lambda (no built-in random whole-image crop)")
    return notes


# ---------------------------------------------------------------- data and loaders


def synthetic_volumes(n_subjects: int, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """Smooth random volumes ``(N, 1, *shape)`` in float16: low-resolution noise upsampled, z-scored."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((n_subjects, 1, *[max(2, n // 8) for n in shape]), generator=generator)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    volumes = torch.cat([torch.nn.functional.interpolate(part, size=tuple(shape), mode=mode, align_corners=False)
                         for part in coarse.split(8)])
    volumes = (volumes - volumes.mean()) / volumes.std()
    return volumes.to(torch.float16).numpy()


class _TwoViews(torch.utils.data.Dataset):
    """Item ``i`` of the loader: ``n_views`` independent draws of ``base[indices[i]]``, stacked."""

    def __init__(self, base, indices: np.ndarray, n_views: int, unpack: Callable):
        self.base, self.indices, self.n_views, self.unpack = base, indices, n_views, unpack

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> torch.Tensor:
        index = int(self.indices[item])
        return torch.stack([torch.as_tensor(self.unpack(self.base[index])) for _ in range(self.n_views)])


def _unpack_monai(sample: dict):
    return sample["image"]


def _unpack_torchio(subject):
    return subject["image"].data


def _worker_seed(worker_id: int) -> None:
    # Both baselines draw from NumPy's global generator; give every worker its own stream.
    np.random.seed((torch.initial_seed() + worker_id) % 2**32)


def _baseline_loader(library: str, recipe: str, volumes: np.ndarray, indices: np.ndarray, config: DataBenchConfig):
    """The library's dataset + loader as its documentation sets them up, ``n_views`` draws per item."""
    shape = volumes.shape[2:]
    workers = _workers(config)
    options = dict(batch_size=config.batch_size, num_workers=workers, shuffle=False,
                   pin_memory=config.device == "cuda", prefetch_factor=2 if workers > 0 else None)
    if library == "monai":
        from monai.data import CacheDataset, DataLoader

        data = [{"image": volumes[i].astype(np.float32)} for i in range(len(volumes))]
        base = CacheDataset(data, transform=monai_transform(recipe, shape), progress=False)
        # MONAI's DataLoader re-seeds each worker's copy of the transforms' random states.
        return DataLoader(_TwoViews(base, indices, config.n_views, _unpack_monai), **options)
    import torchio as tio

    if len(shape) != 3:
        raise ConfigError("TorchIO works on 3D volumes only: use a 3-value --shape or leave torchio out")
    subjects = [tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(volumes[i].astype(np.float32))))
                for i in range(len(volumes))]
    base = tio.SubjectsDataset(subjects, transform=torchio_transform(recipe, shape))
    # A plain DataLoader: tio.SubjectsLoader only adds a collate for Subjects, and items here are
    # the stacked view tensors.
    return torch.utils.data.DataLoader(_TwoViews(base, indices, config.n_views, _unpack_torchio),
                                       worker_init_fn=_worker_seed, **options)


def _workers(config: DataBenchConfig) -> int:
    return config.workers if config.workers is not None else (os.cpu_count() or 1)


def _synchronise(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _measure_baseline(library, recipe, volumes, config) -> Measurement:
    rng = np.random.default_rng(config.seed)
    # Warm up with one batch per worker: all workers start together, so when only the first batch
    # had been waited for, the other workers' batches were nearly done and the measured window
    # would credit them with work done before it began (2x too fast with 2 workers and 2 batches).
    n_warm = max(1, _workers(config))
    indices = rng.integers(0, len(volumes), size=config.batch_size * (config.n_batches + n_warm))
    loader = _baseline_loader(library, recipe, volumes, indices, config)
    iterator = iter(loader)
    first = [next(iterator).to(config.device) for _ in range(n_warm)]  # worker start-up, first batches
    _synchronise(config.device)
    start = time.perf_counter()
    n_views = 0
    for batch in iterator:
        batch = batch.to(config.device, non_blocking=True)
        n_views += batch.shape[0] * batch.shape[1]
    _synchronise(config.device)
    seconds = time.perf_counter() - start
    del first, iterator, loader
    return Measurement(library, recipe, n_views, seconds, note=f"{_workers(config)} workers")


def _measure_neurocl(recipe, store, config) -> Measurement:
    sampler = ViewSampler(view_config(recipe), spatial_dims=len(config.shape), store=store)
    rng = np.random.default_rng(config.seed)
    batches = [rng.integers(0, len(store), size=config.batch_size) for _ in range(config.n_batches + 1)]
    sampler.sample(batches[0], n_views=config.n_views, seed=config.seed)  # warm-up (kernels, caches)
    _synchronise(config.device)
    start = time.perf_counter()
    n_views = 0
    for number, indices in enumerate(batches[1:], start=1):
        views = sampler.sample(indices, n_views=config.n_views, seed=config.seed + number)
        n_views += views.shape[0] * views.shape[1]
    _synchronise(config.device)
    seconds = time.perf_counter() - start
    where = "resident on GPU" if store.resident else ("pinned staging" if config.device == "cuda" else "memmap")
    note = f"{where}, {torch.get_num_threads()} threads" if config.device == "cpu" else where
    return Measurement("neurocl", recipe, n_views, seconds, note=note)


def _measure_model_step(store, config) -> dict:
    """Seconds of one DenseNet121 training step on ``batch_size * n_views`` views and of the data path."""
    from monai.networks.nets import DenseNet121

    device = torch.device(config.device)
    net = DenseNet121(spatial_dims=len(config.shape), in_channels=1, out_channels=128).to(device)
    optimiser = torch.optim.SGD(net.parameters(), lr=0.01)
    sampler = ViewSampler(view_config("full"), spatial_dims=len(config.shape), store=store)
    rng = np.random.default_rng(config.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    data_seconds, step_seconds = [], []
    for number in range(config.n_batches + 1):
        indices = rng.integers(0, len(store), size=config.batch_size)
        _synchronise(config.device)
        start = time.perf_counter()
        views = sampler.sample(indices, n_views=config.n_views, seed=number)
        _synchronise(config.device)
        middle = time.perf_counter()
        with autocast:
            loss = net(views.flatten(0, 1)).float().pow(2).mean()
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        _synchronise(config.device)
        end = time.perf_counter()
        if number:  # the first step compiles kernels and allocates
            data_seconds.append(middle - start)
            step_seconds.append(end - middle)
    data, step = float(np.mean(data_seconds)), float(np.mean(step_seconds))
    return {"data_s": data, "step_s": step, "data_share": data / (data + step)}


# ---------------------------------------------------------------- the benchmark


def installed(library: str) -> bool:
    """Whether a baseline library imports (neurocl itself always does)."""
    if library == "neurocl":
        return True

    try:
        importlib.import_module(library)
    except ImportError:
        return False
    return True


def run_data_benchmark(config: DataBenchConfig, progress: bool = True) -> dict:
    """Measure every installed library on every recipe; returns the measurements, the ratios and
    ``missing``: the requested libraries that are not installed, which are left out instead of
    ending the run (a plain ``pip install -e .`` has no TorchIO)."""
    console = Console(stderr=True, quiet=not progress)
    missing = [library for library in config.libraries if not installed(library)]
    libraries = [library for library in config.libraries if library not in missing]
    for library in missing:
        console.print(f"{library} is not installed: not measured ({INSTALL_HINTS.get(library, f'pip install {library}')})", markup=False)
    volumes = synthetic_volumes(config.n_subjects, config.shape, seed=config.seed)
    measurements: list[Measurement] = []
    model = None
    with tempfile.TemporaryDirectory(prefix="neurocl-bench-") as scratch:
        store = VolumeStore.from_array(volumes, Path(scratch) / "volumes").to(config.device, config.memory_budget_gb)
        threads = torch.get_num_threads()
        for recipe in config.recipes:
            for library in libraries:
                console.print(f"measuring {library} ({recipe} recipe) ...")
                if library == "neurocl":
                    # On the CPU neurocl gets as many threads as the baselines get worker processes.
                    torch.set_num_threads(max(1, _workers(config)) if config.device == "cpu" else threads)
                    measurements.append(_measure_neurocl(recipe, store, config))
                    torch.set_num_threads(threads)
                else:
                    measurements.append(_measure_baseline(library, recipe, volumes, config))
        if config.model:
            console.print(f"timing a {config.model} training step ...")
            model = _measure_model_step(store, config)
        store.to("cpu")
    ratios = {}
    for recipe in config.recipes:
        by_library = {m.library: m.views_per_second for m in measurements if m.recipe == recipe}
        if "neurocl" in by_library:
            ratios[recipe] = {f"neurocl/{lib}": by_library["neurocl"] / rate for lib, rate in by_library.items()
                              if lib != "neurocl"}
    return {"config": config, "measurements": measurements, "ratios": ratios, "model": model, "missing": missing}


def describe_machine(device: str) -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} + {cpu}, torch {torch.__version__}"
    return f"{cpu}, torch {torch.__version__}, {describe_allocator()}"


def measurement_table(title: str, columns: Sequence[str], numeric: Sequence[str], rows) -> Table:
    """A rich table of measurements: ``columns`` in order, those in ``numeric`` right-aligned."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column in numeric else "left")
    for row in rows:
        table.add_row(*row)
    return table


def print_missing_and_machine(console, missing: Sequence[str], device: str) -> None:
    """The libraries not measured (with how to install each) and the machine line that ends every benchmark."""
    for library in missing:
        console.print(f"{library}: not installed, not measured; add it with "
                      f"{INSTALL_HINTS.get(library, f'pip install {library}')}", markup=False)
    console.print(f"machine: {describe_machine(device)}")


def print_data_benchmark(result: dict, console=None) -> None:
    """The measured numbers as a rich table, then the ratios and the recipe notes."""
    console = console or Console()
    config: DataBenchConfig = result["config"]
    title = (f"neurocl bench data: {'x'.join(map(str, config.shape))}, batch {config.batch_size} x "
             f"{config.n_views} views, {config.n_batches} measured batches, device {config.device}")
    rows = [(m.recipe, m.library, str(m.views), f"{m.seconds:.2f}", f"{m.views_per_second:.1f}", m.note)
            for m in result["measurements"]]
    console.print(measurement_table(title, ("recipe", "library", "views", "seconds", "views/s", "setting"),
                                    ("views", "seconds", "views/s"), rows))
    for recipe, ratios in result["ratios"].items():
        if not ratios:
            continue
        text = ", ".join(f"{name} = {value:.2f}x" for name, value in ratios.items())
        console.print(f"{recipe}: {text}")
    if result["model"]:
        model = result["model"]
        console.print(f"{config.model} training step: data path {model['data_s'] * 1000:.1f} ms, "
                      f"step {model['step_s'] * 1000:.1f} ms, data share {100 * model['data_share']:.1f}%")
    print_missing_and_machine(console, result.get("missing", []), config.device)
    for recipe in config.recipes:
        for note in recipe_notes(recipe):
            console.print(f"  note ({recipe}): {note}", style="dim")
