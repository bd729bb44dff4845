"""Patches of volumes in batched gathers: random patches for patch-batched training, grid patches
for sliding-window embedding and occlusion maps.

At 1-1.5 mm a batch of whole volumes does not fit a GPU's memory in a DenseNet121 training step;
training on patches does (TorchIO's ``Queue`` is the usual tool). Here the K patches of every
subject of a batch are cut out of the store (resident on the GPU, or its memory map on the CPU) by
one indexing operation on a strided view, with no Python loop over patches or subjects, and the
view recipe (:class:`neurocl.views.ViewSampler`) then runs on the patch batch as it runs on
volumes.

The module has two layers, as MONAI splits its functional transforms from their array wrappers:

* pure tensor functions: :func:`random_corners`, :func:`gather_boxes`, :func:`grid_corners`,
  :func:`extract_patches`, :func:`aggregate_patches`, :func:`sliding_window_features`;
* thin wrappers that read a :class:`~neurocl.store.VolumeStore`: :func:`store_patches` and
  :class:`PatchSampler`, the training views of ``views.patches``.

Positives (``views.patches.positives``):

* ``same_location``: the ``n_views`` augmented views of one patch are positives; the other patches,
  including the other K - 1 patches of the same subject, are negatives. The loss sees ``B * K``
  samples of ``n_views`` views each. Use it when the representation should describe local anatomy
  (each patch position is its own instance), and with small K when subjects should stay the
  instances of the contrast.
* ``same_subject``: the K patches of one subject (each augmented once) are its K views, so the
  positives are different places of the same brain and the loss sees ``B`` samples of ``K`` views.
  Use it when the representation should describe the subject as a whole (what a sliding-window
  embedding averages), e.g. for SepCLR's subject-level salient space; it needs ``K >= 2`` and
  patches large enough that two of them share subject-level information.

Either way the group (SepCLR's background/target) and the attributes of a patch are its subject's.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from neurocl.errors import ConfigError


class PatchConfig(BaseModel):
    """Patch-batched training (embeds in a pipeline YAML under ``views.patches``).

    ``size`` is the patch side in voxels of the stored grid (one value for every axis, or one per
    axis); ``per_subject`` the K patches drawn from each subject of a batch, at uniformly drawn
    positions of the sliding-window grid (``placement: grid``, the default: the same places in
    every subject, the places ``embed: sliding`` averages over) or at uniform random positions
    (``placement: random``: anywhere the patch lies inside the volume, like TorchIO's
    ``UniformSampler``). Grid placement separated better on every measurement so far
    (docs/benchmarks.md, "Grid placement"): registered volumes put the same anatomy at the same
    grid position, so a patch position means the same thing in every subject.
    """

    model_config = ConfigDict(extra="forbid")

    size: int | tuple[int, ...] = Field(96, description="Patch side in voxels (one value, or one per axis).")
    per_subject: int = Field(4, ge=1, description="Patches K drawn per subject and step.")
    positives: Literal["same_location", "same_subject"] = Field(
        "same_location", description="Views of one patch (same_location) or K patches of one subject (same_subject)."
    )

    placement: Literal["grid", "random"] = Field(
        "grid", description="Where patches are cut: at positions of the sliding-window grid (grid, step embed_stride), the "
        "same places in every subject, or anywhere they fit (random, TorchIO's UniformSampler).",
    )
    embed: Literal["sliding", "whole"] = Field(
        "sliding", description="Embed a volume by the mean of its patches' features (sliding) or the encoder on it whole."
    )
    embed_stride: float = Field(0.5, gt=0, le=1, description="Step of the sliding-window grid, in patch sides.")

    @field_validator("size")
    @classmethod
    def _positive_size(cls, value):
        sizes = (value,) if isinstance(value, int) else value
        if not sizes or any(size < 1 for size in sizes):
            raise ValueError(f"patch size must be positive voxel counts, got {value}")
        return value

    @model_validator(mode="after")
    def _two_patches_for_same_subject(self) -> "PatchConfig":
        if self.positives == "same_subject" and self.per_subject < 2:
            raise ValueError("positives: same_subject makes the K patches of a subject its views: per_subject must be >= 2")
        return self

    def sizes(self, dims: int) -> tuple[int, ...]:
        """The patch side along each of ``dims`` spatial axes."""
        return _as_tuple(self.size, dims, "size")

    def grid_strides(self, dims: int) -> tuple[int, ...]:
        """The sliding-window grid's step along each axis in voxels: ``embed_stride`` patch sides.

        The one grid of a patch model: where ``placement: grid`` cuts training patches and where
        ``embed: sliding`` averages patch features."""
        return tuple(max(1, round(self.embed_stride * side)) for side in self.sizes(dims))


# ---------------------------------------------------------------- random patches


def random_corners(
    n: int, spatial_shape: Sequence[int], size: Sequence[int], generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(n, D)`` start corners drawn uniformly among the positions where a ``size`` box fits.

    ``corner[:, d] = floor(u * (S_d - P_d + 1))`` with ``u ~ U[0, 1)``, so every valid position
    ``0 .. S_d - P_d`` has the same probability. Drawn from ``generator`` (on its device) or from
    torch's global generator on ``device``.
    """
    if any(p > s for p, s in zip(size, spatial_shape)):
        raise ConfigError(f"patch size {tuple(size)} is larger than the volume {tuple(spatial_shape)}")
    device = generator.device if generator is not None else torch.device(device or "cpu")
    room = torch.tensor([s - p for s, p in zip(spatial_shape, size)], device=device)
    u = torch.rand((n, len(size)), generator=generator, device=device)
    return (u * (room + 1)).floor().long().clamp_max(room)


def gather_boxes(x: torch.Tensor, source: torch.Tensor, start: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Boxes of ``size`` at per-sample ``start`` corners of ``x[source]`` in one gather: ``(N, C, *size)``.

    ``out[n] = x[source[n], :, s0:s0 + p0, s1:s1 + p1, ...]`` with ``(s0, s1, ...) = start[n]``.

    A box is cut as its rows along the last axis. The flat tensor read as overlapping windows of
    ``p_last`` elements (``as_strided``: a view, no copy) holds every possible row; one
    ``index_select`` takes the ``N * C * p0 * ... * p_{D-2}`` windows that start at the rows of the
    boxes. Each window is a contiguous run, so the CPU copies row by row; advanced indexing of an
    ``unfold`` view (the first version) computes an offset per voxel and was ~10x slower at 96^3
    on one CPU thread (docs/benchmarks.md). On a GPU it is one kernel either way. ``x`` may be a tensor over
    a memory map: only the pages of the chosen rows are read.
    """
    batch, channels, *spatial = x.shape
    size = tuple(int(p) for p in size)
    if len(size) != len(spatial):
        raise ConfigError(f"gather_boxes: {len(size)} box sides for {len(spatial)} spatial axes")
    x = x.contiguous()  # a no-op for store volumes (memory map or resident tensor)
    stride = x.stride()
    device = x.device
    source, start = source.to(device), start.to(device)
    corner = source * stride[0]
    for axis in range(len(size)):
        corner = corner + start[:, axis] * stride[2 + axis]
    # Offsets of a box's rows from its corner: channels, then every leading spatial axis.
    rows = torch.arange(channels, device=device) * stride[1]
    for axis, length in enumerate(size[:-1]):
        rows = (rows[:, None] + torch.arange(length, device=device) * stride[2 + axis]).reshape(-1)
    flat = x.reshape(-1)
    windows = flat.as_strided((max(flat.numel() - size[-1] + 1, 0), size[-1]), (1, 1))
    return windows.index_select(0, (corner[:, None] + rows).reshape(-1)).view(len(source), channels, *size)


# ---------------------------------------------------------------- grid patches


def _patch_starts(length: int, size: int, stride: int) -> list[int]:
    """Start positions that step by ``stride`` and end with a patch flush with the border."""
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def _patch_voxel_index(coords: torch.Tensor, size: Sequence[int], spatial_shape: Sequence[int]) -> torch.Tensor:
    """Flat voxel index of every voxel of every patch: ``(L * prod(size),)``, patch-major."""
    flat = torch.zeros((coords.shape[0],) + (1,) * len(size), dtype=torch.long, device=coords.device)
    for axis, (length, patch) in enumerate(zip(spatial_shape, size)):
        shape = [coords.shape[0]] + [1] * len(size)
        shape[1 + axis] = patch
        along = (coords[:, axis, None] + torch.arange(patch, device=coords.device)).view(shape)
        flat = flat * length + along
    return flat.reshape(-1)


def _as_tuple(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    values = (value,) * dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != dims or any(v < 1 for v in values):
        raise ConfigError(f"patch {name} must be a positive int or {dims} positive ints, got {value}")
    return values


def extract_patches(
    x: torch.Tensor, size: int | Sequence[int], stride: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """All patches of ``size`` on a ``stride`` grid of a batch, in one gather.

    The same patches as ``unfold`` along each axis (``x.unfold(2, p, t).unfold(3, ...)``) taken
    in one :func:`gather_boxes`; in addition the grid covers the whole volume: when ``stride`` does
    not land on the far border, one more patch flush with it is added, so every voxel lies in at
    least one patch (``unfold`` would drop the border voxels).

    Parameters
    ----------
    x : (B, C, *S) tensor
    size, stride : int or one int per spatial axis

    Returns
    -------
    patches : (B, L, C, *size) tensor
        ``patches[b, l] == x[b, :, c0:c0 + p0, c1:c1 + p1, ...]`` with ``(c0, c1, ...) = coords[l]``.
    coords : (L, D) long tensor
        Start corner (voxel index) of each patch, patches ordered with the last axis fastest
        (the Cartesian product of the start positions along each axis); what
        :func:`aggregate_patches` takes.
    """
    batch, channels, *spatial = x.shape
    dims = len(spatial)
    size = _as_tuple(size, dims, "size")
    stride = _as_tuple(stride, dims, "stride")
    coords = grid_corners(spatial, size, stride).to(x.device)
    # Every (subject, grid corner) pair, subject-major: the boxes gather_boxes cuts as rows.
    source = torch.arange(batch, device=x.device).repeat_interleave(len(coords))
    patches = gather_boxes(x, source, coords.repeat(batch, 1), size)
    return patches.view(batch, len(coords), channels, *size), coords


def aggregate_patches(
    values: torch.Tensor, coords: torch.Tensor, size: int | Sequence[int], spatial_shape: Sequence[int]
) -> torch.Tensor:
    """Put patch-level values back on the volume, averaging where patches overlap.

    ``out[b, c, v] = sum_{l: v in patch l} values[b, l, c, v - coords_l] / #{l: v in patch l}``;
    voxels that no patch covers are 0.

    Parameters
    ----------
    values : (B, L, C, *size), (B, L, C) or (B, L) tensor
        Voxel-wise values per patch, or one value per patch (and channel) spread over the patch.
    coords : (L, D) long tensor of patch start corners, as returned by :func:`extract_patches`
    size : int or one int per spatial axis
    spatial_shape : the volume's spatial shape

    Returns
    -------
    (B, C, *spatial_shape) tensor
    """
    dims = len(spatial_shape)
    size = _as_tuple(size, dims, "size")
    if values.ndim == 2:
        values = values[:, :, None]
    if values.ndim == 3:
        values = values.view(*values.shape, *([1] * dims)).expand(*values.shape, *size)
    batch, n_patches, channels = values.shape[:3]
    if n_patches != coords.shape[0]:
        raise ConfigError(f"aggregate_patches: {n_patches} patch values but {coords.shape[0]} coordinates")
    voxels = _patch_voxel_index(coords.to(values.device), size, spatial_shape)
    # Sums in float64: k equal float32 copies add up exactly, so extract-then-aggregate gives
    # back the volume bit for bit.
    flat = values.transpose(1, 2).reshape(batch, channels, -1).double()
    n_voxels = math.prod(spatial_shape)
    total = torch.zeros(batch, channels, n_voxels, device=values.device, dtype=torch.float64)
    total.index_add_(2, voxels, flat)
    counts = torch.zeros(n_voxels, device=values.device, dtype=torch.float64)
    counts.index_add_(0, voxels, torch.ones_like(voxels, dtype=torch.float64))
    return (total / counts.clamp_min(1)).float().view(batch, channels, *spatial_shape)


def grid_corners(spatial_shape: Sequence[int], size: int | Sequence[int], stride: int | Sequence[int]) -> torch.Tensor:
    """``(L, D)`` start corners of the sliding-window grid of :func:`extract_patches` (last axis fastest)."""
    dims = len(spatial_shape)
    size = _as_tuple(size, dims, "size")
    stride = _as_tuple(stride, dims, "stride")
    if any(p > s for p, s in zip(size, spatial_shape)):
        raise ConfigError(f"patch size {size} is larger than the volume {tuple(spatial_shape)}")
    axes = [torch.tensor(_patch_starts(s, p, t)) for s, p, t in zip(spatial_shape, size, stride)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, dims)


@torch.no_grad()
def sliding_window_features(
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    volumes: torch.Tensor,
    size: int | Sequence[int],
    stride: int | Sequence[int],
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """A volume's features as the mean of its patches' features on a grid.

    ``f(x) = (1 / L) sum_l encode(x[patch l])`` over the ``L`` patches of :func:`grid_corners`
    (side ``size``, step ``stride``, the last patch of each axis flush with the border), so an
    encoder trained on patches embeds whole volumes at full resolution with a patch-sized
    activation footprint. The patches of all subjects go through ``encode`` ``batch_size`` at a
    time. :class:`SlidingWindow` is the same mean as a differentiable module (for maps).

    Parameters
    ----------
    encode : callable
        ``(N, C, *size) -> {name: (N, d)}``, e.g. a method's ``embed``.
    volumes : (B, C, *S) tensor on the encoder's device

    Returns
    -------
    {name: (B, d) tensor}
    """
    return _grid_mean(encode, volumes, size, stride, batch_size)


class SlidingWindow(torch.nn.Module):
    """``network`` applied to a volume the way a patch model embeds it: the mean of its outputs over
    the volume's grid patches (:func:`sliding_window_features`, differentiable).

    The maps of a model trained with ``views.patches`` (``embed: sliding``) explain this, the
    representation its embeddings are, rather than the network run once on the whole volume.
    """

    def __init__(self, network: torch.nn.Module, size: Sequence[int], stride: Sequence[int], batch_size: int = 32):
        super().__init__()
        self.network, self.size, self.stride, self.batch_size = network, tuple(size), tuple(stride), batch_size

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return _grid_mean(self.network, x, self.size, self.stride, self.batch_size)


def _grid_mean(encode, volumes: torch.Tensor, size, stride, batch_size: int) -> dict[str, torch.Tensor]:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    spatial = tuple(volumes.shape[2:])
    size = _as_tuple(size, len(spatial), "size")
    corners = grid_corners(spatial, size, stride).to(volumes.device)
    n_subjects, n_patches = volumes.shape[0], corners.shape[0]
    # Pair p of the flat (subject, patch) list is subject p // L, patch p % L.
    subject = torch.arange(n_subjects, device=volumes.device).repeat_interleave(n_patches)
    where = corners.repeat(n_subjects, 1)
    sums: dict[str, torch.Tensor] = {}
    for first in range(0, len(subject), batch_size):
        part = slice(first, first + batch_size)
        outputs = encode(gather_boxes(volumes, subject[part], where[part], size))
        for name, value in outputs.items():
            total = sums.get(name)
            if total is None:
                total = torch.zeros(n_subjects, value.shape[1], device=volumes.device, dtype=torch.float64)
            # Out of place, so that autograd can differentiate the mean (maps).
            sums[name] = total.index_add(0, subject[part], value.double())
    return {name: (total / n_patches).float() for name, total in sums.items()}


# ---------------------------------------------------------------- store wrappers


def store_patches(store, rows, corners: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Patches of store volumes as float32 ``(N, 1, *size)`` on the store's device, in one gather.

    Patch ``n`` is the box of ``size`` at ``corners[n]`` of store volume ``rows[n]``. A resident store
    is cut on its device; otherwise the boxes are cut from the memory map (only their pages are
    read) and, for a GPU, staged through pinned memory: a patch batch is a fraction of its volumes.
    """
    rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    if rows.ndim != 1 or corners.shape != (len(rows), len(size)):
        raise ConfigError(f"store_patches: {len(rows)} rows need ({len(rows)}, {len(size)}) corners, "
                          f"got {tuple(corners.shape)}")
    if len(rows) and (rows.min() < 0 or rows.max() >= len(store)):
        raise ConfigError(f"store index out of range in patches: the store holds {len(store)} volumes")
    if any(p > s for p, s in zip(size, store.spatial_shape)):
        raise ConfigError(f"views.patches.size {tuple(size)} is larger than the stored volumes {store.spatial_shape}")
    resident = store.resident_volumes
    if resident is not None:
        return gather_boxes(resident, rows.to(resident.device), corners.to(resident.device), size).float()
    with warnings.catch_warnings():
        # The memory map is read-only; the gather only reads it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        host = torch.from_numpy(store.volumes)
    patches = gather_boxes(host, rows, corners.cpu(), size)
    if store.device.type == "cpu":
        return patches.float()
    return patches.pin_memory().to(store.device, non_blocking=True).float()


class PatchSampler:
    """The training views of ``views.patches``: K patches per subject (random or grid positions), then the view recipe.

    Parameters
    ----------
    config : PatchConfig
    views : callable
        ``(x, n_views, generator) -> (V, N, C, *S)``, a :class:`neurocl.views.ViewSampler`.
    store : VolumeStore

    ``sampler(indices, n_views, generator)`` returns ``(views, rows)``: with ``same_location``
    ``views`` is ``(n_views, B * K, 1, *size)`` and ``rows`` (the store index of each of the B * K
    samples) repeats every subject K times; with ``same_subject`` ``views`` is ``(K, B, 1, *size)``
    (view k of subject b is its k-th patch, augmented once) and ``rows`` is ``indices``. The
    corners and the augmentations are drawn from ``generator``, so a step's seed fixes both.
    """

    def __init__(self, config: PatchConfig, views: Callable, store):
        self.config = config
        self.views = views
        self.store = store
        self.size = config.sizes(store.spatial_dims)
        if any(p > s for p, s in zip(self.size, store.spatial_shape)):
            raise ConfigError(f"views.patches.size {self.size} is larger than the stored volumes {store.spatial_shape}")
        # The places of placement: grid, fixed by the store's shape: made once, not every step.
        self.grid = (grid_corners(store.spatial_shape, self.size, config.grid_strides(len(self.size)))
                     if config.placement == "grid" else None)

    def __repr__(self) -> str:
        return f"PatchSampler(size={self.size}, per_subject={self.config.per_subject}, positives={self.config.positives!r})"

    def samples_per_subject(self) -> int:
        """Samples of the loss per subject: K with same_location, 1 with same_subject."""
        return self.config.per_subject if self.config.positives == "same_location" else 1

    def __call__(self, indices, n_views: int = 2, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        k = self.config.per_subject
        same_location = self.config.positives == "same_location"
        # same_location: subject-major (sample j is subject j // K); same_subject: patch-major, so
        # that the (K * B) patches reshape to K views of B subjects.
        rows = np.repeat(indices, k) if same_location else np.tile(indices, k)
        device = generator.device if generator is not None else self.store.device
        if self.config.placement == "grid":
            grid = self.grid.to(device)
            # With replacement: drawing K distinct places per subject separated no better on the
            # choosing seeds and worse at 2 mm (docs/benchmarks.md, "Grid placement").
            corners = grid[torch.randint(len(grid), (len(rows),), generator=generator, device=device)]
        else:
            corners = random_corners(len(rows), self.store.spatial_shape, self.size, generator, device)
        patches = store_patches(self.store, rows, corners, self.size)
        if same_location:
            return self.views(patches, n_views=n_views, generator=generator), rows
        views = self.views(patches, n_views=1, generator=generator)[0]
        return views.unflatten(0, (k, len(indices))), indices
