"""Batched augmented views and grid patches, made on the device that holds the volumes.

:class:`ViewSampler` turns a batch ``(B, C, *S)`` into ``V`` augmented views ``(V, B, C, *S')``
with a handful of batched tensor operations: every random parameter is drawn per sample as a
tensor from one :class:`torch.Generator`, and each transform is applied to the whole batch with
masks and broadcasting, never with a Python loop over samples. This is what removes the
per-sample CPU augmentation that bounds 3D contrastive training with TorchIO/MONAI loaders.

Transforms, in the order they are applied (each with its own probability ``p_*``; a sample that
is not selected passes unchanged):

1. crop: a box of ``ceil(crop_scale * side)`` voxels along each side (one scale per sample, drawn
   in the range) or of ``crop_size`` voxels, at a uniform random position; resized back to the input size when
   ``crop_resize`` (trilinear/bilinear). Without resize every view is cropped to the same size (a
   sample not selected gets the centre crop) so that the batch keeps one shape.
2. affine: rotation by up to ``rotation_deg`` degrees about each axis and isotropic scaling in
   ``scaling``, about the centre, composed with the crop into one ``affine_grid`` + ``grid_sample``
   (used only when rotation/scaling is asked or the crop scale varies per sample).
3. flip: with probability ``p_flip``, one axis of ``flip_axes`` chosen uniformly is flipped
   (``flip_mode="one"``, y-Aware's ``Flip``), or every axis of ``flip_axes`` is flipped
   independently with probability ``p_flip`` (``flip_mode="each"``, TorchIO's ``RandomFlip``).
4. intensity: ``x * a + b`` with ``a`` in ``intensity_scale`` and ``b`` in ``intensity_shift``.
5. gamma: ``x`` rescaled to [0, 1] per sample, raised to ``gamma`` (log-uniform), rescaled back.
6. blur: isotropic Gaussian of standard deviation ``blur_sigma`` (voxels), separable, truncated at
   4 standard deviations, borders mirrored: ``scipy.ndimage.gaussian_filter``'s defaults.
7. noise: additive Gaussian noise of standard deviation ``noise_sigma`` (intensity units).
8. cutout: a box of ``ceil(cutout_fraction * side)`` voxels, at a uniform random position, set to 0.

The defaults follow y-Aware's 3D MRI recipe (Dufumier et al., 2021, "Contrastive learning with
continuous proxy meta-data for 3D MRI classification", https://arxiv.org/abs/2106.08808): flip,
blur sigma in [0.1, 1], noise sigma in [0.1, 1], cutout of a quarter of each side, 75% crop
resized back, each with p = 0.5. One difference: y-Aware crops last (after cutout); here the
geometry comes first so that blur, noise and cutout work on the final grid (the noise stays white
and the cutout keeps its size instead of being magnified by the resize).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from neurocl.errors import ConfigError
from neurocl.patches import PatchConfig, gather_boxes

if TYPE_CHECKING:
    from neurocl.store import VolumeStore


def Probability(default: float):
    """A probability field in [0, 1]."""
    return Field(default=default, ge=0.0, le=1.0)


def _ordered_pair(value: tuple[float, float], name: str) -> tuple[float, float]:
    low, high = value
    if low > high:
        raise ValueError(f"{name} range must be (low, high) with low <= high, got {value}")
    return value


class ViewConfig(BaseModel):
    """The augmentation recipe (embeds in a pipeline YAML under ``views``).

    Ranges are ``(low, high)``; a per-sample value is drawn uniformly in it (gamma log-uniformly).
    Sigmas of blur are in voxels of the stored grid; noise sigma and intensity shift are in the
    stored intensity units (z-scores with the default preprocessing).

    Parameters
    ----------
    p_crop : float
        Probability of a random crop.
    crop_scale : tuple[float, float]
        Side of the crop as a fraction of each side.
    crop_size : tuple[int, ...] | None
        Crop of a fixed size in voxels instead of `crop_scale`.
    crop_resize : bool
        Resize the crop back to the input size (otherwise views keep the crop size).
    p_flip : float
        Probability of a flip (set 0 when left/right matters).
    flip_axes : tuple[int, ...] | None
        Axes that may be flipped (`null`: all).
    flip_mode : Literal['one', 'each']
        `one`: one axis drawn among `flip_axes`; `each`: every axis independently.
    p_affine : float
        Probability of a rotation + scaling.
    rotation_deg : float
        Largest rotation about each axis (degrees).
    scaling : tuple[float, float]
        Isotropic scaling range.
    p_intensity : float
        Probability of `x * a + b`.
    intensity_scale : tuple[float, float]
        Range of `a`.
    intensity_shift : tuple[float, float]
        Range of `b`.
    p_gamma : float
        Probability of a gamma change.
    gamma : tuple[float, float]
        Gamma range (log-uniform).
    p_noise : float
        Probability of additive Gaussian noise.
    noise_sigma : tuple[float, float]
        Noise standard deviation range.
    p_blur : float
        Probability of a Gaussian blur.
    blur_sigma : tuple[float, float]
        Blur standard deviation range (voxels).
    p_cutout : float
        Probability of zeroing a box.
    cutout_fraction : float
        Side of the zeroed box as a fraction of each side.
    patches : PatchConfig or None
        Patch-batched training: the views are made of K random patches per subject (``views.patches``,
        see neurocl.patches); ``null`` trains on whole volumes.
    """

    model_config = ConfigDict(extra="forbid")

    p_crop: float = Probability(default=0.5)
    crop_scale: tuple[float, float] = (0.75, 0.75)
    crop_size: tuple[int, ...] | None = None
    crop_resize: bool = True
    p_flip: float = Probability(default=0.5)
    flip_axes: tuple[int, ...] | None = None
    flip_mode: Literal["one", "each"] = "one"
    p_affine: float = Probability(default=0.0)
    rotation_deg: float = Field(default=10.0, ge=0.0, le=180.0)
    scaling: tuple[float, float] = (0.9, 1.1)
    p_intensity: float = Probability(default=0.0)
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    intensity_shift: tuple[float, float] = (-0.1, 0.1)
    p_gamma: float = Probability(default=0.0)
    gamma: tuple[float, float] = (0.7, 1.5)
    p_noise: float = Probability(default=0.5)
    noise_sigma: tuple[float, float] = (0.1, 1.0)
    p_blur: float = Probability(default=0.5)
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    p_cutout: float = Probability(default=0.5)
    cutout_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    # Patch-batched training: the recipe above is applied to K random patches per subject instead
    # of the whole volumes (see neurocl.patches); None trains on whole volumes.
    patches: PatchConfig | None = None

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale(cls, value):
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {value}")
        return value

    @field_validator("scaling", "gamma")
    @classmethod
    def _positive_range(cls, value, info):
        if value[0] <= 0:
            raise ValueError(f"{info.field_name} must be positive, got {value}")
        return _ordered_pair(value, info.field_name)

    @field_validator("intensity_scale", "intensity_shift", "noise_sigma", "blur_sigma")
    @classmethod
    def _range(cls, value, info):
        return _ordered_pair(value, info.field_name)

    @field_validator("noise_sigma", "blur_sigma")
    @classmethod
    def _non_negative(cls, value, info):
        if value[0] < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {value}")
        return value

    @field_validator("crop_size")
    @classmethod
    def _crop_size(cls, value):
        if value is not None and any(size < 1 for size in value):
            raise ValueError(f"crop_size must be positive voxel counts, got {value}")
        return value

    @model_validator(mode="after")
    def _fixed_size_without_resize(self) -> "ViewConfig":
        if not self.crop_resize and self.crop_size is None and self.crop_scale[0] != self.crop_scale[1]:
            raise ValueError(
                f"crop_resize=False needs one crop size for the whole batch: set crop_scale to a single value "
                f"(low == high), got {self.crop_scale}"
            )
        return self

    @property
    def geometric_resample(self) -> bool:
        """Whether views need one ``grid_sample`` (rotation/scaling, or a crop scale that varies)."""
        varying_crop = self.p_crop > 0 and self.crop_size is None and self.crop_scale[0] != self.crop_scale[1]
        return self.p_affine > 0 or varying_crop


class ViewSampler:
    """Make ``V`` augmented views of a batch in batched tensor operations.

    Parameters
    ----------
    config : ViewConfig
        The recipe (defaults: y-Aware's 3D MRI recipe).
    spatial_dims : int
        2 for images ``(B, C, H, W)``, 3 for volumes ``(B, C, D, H, W)``.
    store : VolumeStore or None
        Needed only by :meth:`sample`, which reads the batch from the store.

    Examples
    --------
    >>> sampler = ViewSampler(ViewConfig(), spatial_dims=3, store=store)
    >>> views = sampler.sample(indices, n_views=2, seed=0)     # (2, B, 1, *store.spatial_shape)
    """

    def __init__(self, config: ViewConfig | None = None, spatial_dims: int = 3, store: "VolumeStore | None" = None):
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.config = config or ViewConfig()
        self.spatial_dims = spatial_dims
        self.store = store
        axes = self.config.flip_axes if self.config.flip_axes is not None else tuple(range(spatial_dims))
        if any(not 0 <= axis < spatial_dims for axis in axes):
            raise ConfigError(f"flip_axes {axes} must be spatial axes in 0..{spatial_dims - 1}")
        self.flip_axes = tuple(axes)
        if self.config.crop_size is not None and len(self.config.crop_size) != spatial_dims:
            raise ConfigError(f"crop_size {self.config.crop_size} must have {spatial_dims} values")

    def __repr__(self) -> str:
        return f"ViewSampler(spatial_dims={self.spatial_dims}, config={self.config!r})"

    # ------------------------------------------------------------ public API

    def output_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of the views made from inputs of ``spatial_shape``."""
        if self.config.crop_resize:
            return tuple(spatial_shape)
        return self._crop_shape(spatial_shape)

    def sample(self, indices, n_views: int = 2, seed: int | None = None) -> torch.Tensor:
        """Views of store volumes ``indices``: ``(V, B, 1, *S')`` on the store's device.

        The same ``seed`` gives the same views (on the same device); ``None`` draws from torch's
        global generator.
        """
        if self.store is None:
            raise ConfigError("ViewSampler.sample needs a store: ViewSampler(config, store=store)")
        batch = self.store.batch(indices)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=batch.device).manual_seed(int(seed))
        return self(batch, n_views=n_views, generator=generator)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, n_views: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment ``x`` ``(B, C, *S)`` into ``(V, B, C, *S')`` views (``S' = S`` unless cropping without resize)."""
        if x.ndim != self.spatial_dims + 2:
            raise ConfigError(
                f"views: expected a (B, C, *spatial) tensor with {self.spatial_dims} spatial dims, got shape {tuple(x.shape)}"
            )
        if n_views < 1:
            raise ConfigError(f"n_views must be >= 1, got {n_views}")
        if not x.is_floating_point():
            x = x.float()
        # Views are made in the input's precision whatever autocast says: under bf16/fp16 autocast
        # the matrix products of the blur (and grid_sample, interpolate) would return half
        # precision and could not be written back into the float32 batch. The network's own
        # forward pass still runs under the caller's autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._make_views(x, n_views, generator)

    def _make_views(self, x: torch.Tensor, n_views: int, generator: torch.Generator | None) -> torch.Tensor:
        draw = _Draw(generator, x.device)
        # _geometry always returns a new tensor (never a view of x): the later steps work in place.
        views = self._geometry(x, n_views, draw)
        views = self._flip(views, draw)
        views = self._intensity(views, draw)
        views = self._gamma(views, draw)
        views = self._blur(views, draw)
        views = self._noise(views, draw)
        views = self._cutout(views, draw)
        return views.reshape(n_views, x.shape[0], *views.shape[1:])

    # ------------------------------------------------------------ geometry

    def _crop_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        if self.config.crop_size is not None:
            return tuple(min(c, s) for c, s in zip(self.config.crop_size, spatial_shape))
        return tuple(_fraction_of(self.config.crop_scale[0], s) for s in spatial_shape)

    def _geometry(self, x: torch.Tensor, n_views: int, draw: "_Draw") -> torch.Tensor:
        """Crop (+ resize) and rotation/scaling: the only steps that move voxels."""
        config = self.config
        n_samples = n_views * x.shape[0]
        spatial = tuple(x.shape[2:])
        source = torch.arange(n_samples, device=x.device) % x.shape[0]  # view k of sample i reads x[i]
        if config.geometric_resample:
            theta = self._theta(n_samples, spatial, draw, with_crop=config.crop_resize)
            views = _grid_sample(x[source], theta)
            if config.crop_resize:
                return views
            x, source = views, torch.arange(n_samples, device=x.device)
        elif config.crop_resize and config.p_crop == 0:
            return x[source]
        crop = self._crop_shape(spatial)
        selected = draw.bernoulli(n_samples, config.p_crop)
        room = torch.tensor([s - c for s, c in zip(spatial, crop)], device=x.device)
        random_start = (draw.uniform((n_samples, len(spatial))) * (room + 1)).floor().long().clamp_max(room)
        if config.crop_resize:
            # Only the selected samples are cropped and resized: the others are copied as they are.
            views = x[source]
            chosen = selected.nonzero().flatten()
            if len(chosen):
                cropped = gather_boxes(x, source[chosen], random_start[chosen], crop)
                mode = _LINEAR[self.spatial_dims]
                views[chosen] = F.interpolate(cropped, size=spatial, mode=mode, align_corners=False)
            return views
        start = torch.where(selected[:, None], random_start, room // 2)
        return gather_boxes(x, source, start, crop)

    def _theta(self, n_samples: int, spatial: tuple[int, ...], draw: "_Draw", with_crop: bool) -> torch.Tensor:
        """Per-sample ``(N, D, D+1)`` maps from output to input normalised coordinates (array axis order).

        ``u_in = centre + s * A u_out`` where ``s`` is the crop's fraction of each side, ``centre`` its
        centre, and ``A = D^-1 R D / k`` rotates by ``R`` and scales by ``k`` in voxel units
        (``D = diag(S / 2)``), so that a rotation stays a rotation on non-cubic grids.
        """
        config = self.config
        device = draw.device
        dims = self.spatial_dims
        matrix = torch.eye(dims, device=device).expand(n_samples, dims, dims)
        centre = torch.zeros(n_samples, dims, device=device)
        if config.p_affine > 0:
            do_affine = draw.bernoulli(n_samples, config.p_affine)
            n_angles = 3 if dims == 3 else 1
            limit = math.radians(config.rotation_deg)
            angles = draw.uniform((n_samples, n_angles), -limit, limit) * do_affine[:, None]
            zoom = draw.uniform((n_samples,), *config.scaling)
            zoom = torch.where(do_affine, zoom, torch.ones_like(zoom))
            half = torch.tensor(spatial, device=device, dtype=torch.float32) / 2
            rotation = _rotation_matrices(angles, dims)
            matrix = (rotation * half[None, None, :]) / half[None, :, None] / zoom[:, None, None]
        if with_crop and config.p_crop > 0:
            do_crop = draw.bernoulli(n_samples, config.p_crop)
            if config.crop_size is not None:
                fraction = torch.tensor(self._crop_shape(spatial), device=device) / torch.tensor(spatial, device=device)
                fraction = fraction.float().expand(n_samples, dims)
            else:
                fraction = draw.uniform((n_samples, 1), *config.crop_scale).expand(n_samples, dims)
            fraction = torch.where(do_crop[:, None], fraction, torch.ones_like(fraction))
            offset = draw.uniform((n_samples, dims)) * (1 - fraction)
            centre = -1 + 2 * (offset + fraction / 2)
            matrix = fraction[:, :, None] * matrix
        return torch.cat([matrix, centre[:, :, None]], dim=2)

    # ------------------------------------------------------------ voxel-wise transforms

    def _flip(self, views: torch.Tensor, draw: "_Draw") -> torch.Tensor:
        if self.config.p_flip == 0 or not self.flip_axes:
            return views
        n_samples, n_axes = views.shape[0], len(self.flip_axes)
        if self.config.flip_mode == "one":
            selected = draw.bernoulli(n_samples, self.config.p_flip)
            chosen = (draw.uniform(n_samples) * n_axes).floor().long().clamp_max(n_axes - 1)
            flips = selected[:, None] & (chosen[:, None] == torch.arange(n_axes, device=views.device))
        else:
            flips = draw.bernoulli((n_samples, n_axes), self.config.p_flip)
        for column, axis in enumerate(self.flip_axes):
            chosen = flips[:, column].nonzero().flatten()
            if len(chosen):
                views[chosen] = views[chosen].flip(2 + axis)
        return views

    def _intensity(self, views: torch.Tensor, draw: "_Draw") -> torch.Tensor:
        config = self.config
        if config.p_intensity == 0:
            return views
        n_samples = views.shape[0]
        selected = draw.bernoulli(n_samples, config.p_intensity)
        scale = torch.where(selected, draw.uniform((n_samples,), *config.intensity_scale), 1.0)
        shift = torch.where(selected, draw.uniform((n_samples,), *config.intensity_shift), 0.0)
        return views * _per_sample(scale, views.ndim) + _per_sample(shift, views.ndim)

    def _gamma(self, views: torch.Tensor, draw: "_Draw") -> torch.Tensor:
        config = self.config
        if config.p_gamma == 0:
            return views
        n_samples = views.shape[0]
        selected = draw.bernoulli(n_samples, config.p_gamma)
        log_low, log_high = math.log(config.gamma[0]), math.log(config.gamma[1])
        gamma = _per_sample(draw.uniform((n_samples,), log_low, log_high).exp(), views.ndim)
        flat = views.flatten(1)
        low = _per_sample(flat.amin(dim=1), views.ndim)
        span = _per_sample(flat.amax(dim=1), views.ndim) - low
        unit = ((views - low) / span.clamp_min(1e-8)).clamp(0, 1)
        adjusted = unit.pow(gamma) * span + low
        return torch.where(_per_sample(selected, views.ndim), adjusted, views)

    def _blur(self, views: torch.Tensor, draw: "_Draw") -> torch.Tensor:
        """Separable Gaussian blur with one kernel per sample (grouped convolution, mirrored borders).

        ``g_i(t) = exp(-t^2 / (2 sigma_i^2)) / sum_t' exp(-t'^2 / (2 sigma_i^2))`` for ``|t| <= r``,
        ``r = int(4 max(blur_sigma) + 0.5)`` (scipy's ``truncate=4``; one radius for the batch, so a
        smaller sigma keeps a few more, negligible, taps than scipy would); samples
        not selected are left as they are (and not computed).
        """
        config = self.config
        if config.p_blur == 0 or config.blur_sigma[1] == 0:
            return views
        n_samples = views.shape[0]
        selected = draw.bernoulli(n_samples, config.p_blur)
        sigma = draw.uniform((n_samples,), *config.blur_sigma).clamp_min(1e-3)
        chosen = selected.nonzero().flatten()
        if len(chosen) == 0:
            return views
        radius = int(4 * config.blur_sigma[1] + 0.5)
        taps = torch.arange(-radius, radius + 1, device=views.device, dtype=views.dtype)
        kernel = torch.exp(-(taps[None, :] ** 2) / (2 * sigma[chosen, None] ** 2))
        views[chosen] = gaussian_filter_separable(views[chosen], kernel / kernel.sum(dim=1, keepdim=True))
        return views

    def _noise(self, views: torch.Tensor, draw: "_Draw") -> torch.Tensor:
        config = self.config
        if config.p_noise == 0 or config.noise_sigma[1] == 0:
            return views
        n_samples = views.shape[0]
        selected = draw.bernoulli(n_samples, config.p_noise)
        sigma = draw.uniform((n_samples,), *config.noise_sigma)
        # Noise is drawn only for the selected samples: drawing normals is the cost of this step.
        chosen = selected.nonzero().flatten()
        noise = draw.normal((len(chosen), *views.shape[1:]), dtype=views.dtype)
        return views.index_add_(0, chosen, noise.mul_(_per_sample(sigma[chosen], views.ndim)))

    def _cutout(self, views: torch.Tensor, draw: "_Draw") -> torch.Tensor:
        config = self.config
        if config.p_cutout == 0:
            return views
        n_samples = views.shape[0]
        spatial = views.shape[2:]
        selected = draw.bernoulli(n_samples, config.p_cutout)
        size = torch.tensor([_fraction_of(config.cutout_fraction, s) for s in spatial], device=views.device)
        room = torch.tensor(spatial, device=views.device) - size
        start = (draw.uniform((n_samples, len(spatial))) * (room + 1)).floor().long().clamp_max(room)
        box = _per_sample(selected, views.ndim)
        for axis, length in enumerate(spatial):
            position = torch.arange(length, device=views.device)
            inside = (position >= start[:, axis, None]) & (position < (start[:, axis] + size[axis])[:, None])
            shape = [n_samples, 1] + [1] * len(spatial)
            shape[2 + axis] = length
            box = box & inside.view(shape)
        return views.masked_fill_(box, 0.0)


# ---------------------------------------------------------------- batched helpers

_LINEAR = {2: "bilinear", 3: "trilinear"}


class _Draw:
    """Random draws from one generator (or torch's global one) on one device, in call order."""

    def __init__(self, generator: torch.Generator | None, device: torch.device):
        self.generator = generator
        self.device = device

    def uniform(self, shape, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        values = torch.rand(shape, generator=self.generator, device=self.device)
        return low + (high - low) * values

    def bernoulli(self, shape, p: float) -> torch.Tensor:
        return self.uniform(shape) < p

    def normal(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, device=self.device, dtype=dtype)


def _fraction_of(fraction: float, length: int) -> int:
    """``ceil(fraction * length)`` voxels (y-Aware's rounding), at least 1; the tolerance keeps
    ``0.25 * 64`` at 16 despite floating point."""
    return max(1, min(length, math.ceil(fraction * length - 1e-9)))


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-sample ``(N,)`` tensor to broadcast against ``(N, C, *S)``."""
    return values.view(values.shape[0], *([1] * (ndim - 1)))


def _grid_sample(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` ``(N, C, *S)`` with per-sample affine maps ``theta`` given in array-axis order."""
    dims = theta.shape[1]
    # affine_grid/grid_sample order coordinates (x, y, z) = last array axis first.
    reverse = torch.arange(dims - 1, -1, -1, device=theta.device)
    matrix = theta[:, :, :dims][:, reverse][:, :, reverse]
    translation = theta[:, reverse, dims:]
    grid = F.affine_grid(torch.cat([matrix, translation], dim=2), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _rotation_matrices(angles: torch.Tensor, dims: int) -> torch.Tensor:
    """``(N, D, D)`` rotations: about one axis in 2D, ``R_0 R_1 R_2`` (one angle per axis) in 3D."""
    cos, sin = angles.cos(), angles.sin()
    n_samples = angles.shape[0]
    if dims == 2:
        return torch.stack([cos[:, 0], -sin[:, 0], sin[:, 0], cos[:, 0]], dim=1).view(n_samples, 2, 2)
    rotation = torch.eye(3, device=angles.device).repeat(n_samples, 1, 1)
    for axis in range(3):
        plane = [a for a in range(3) if a != axis]
        single = torch.eye(3, device=angles.device).repeat(n_samples, 1, 1)
        single[:, plane[0], plane[0]] = cos[:, axis]
        single[:, plane[0], plane[1]] = -sin[:, axis]
        single[:, plane[1], plane[0]] = sin[:, axis]
        single[:, plane[1], plane[1]] = cos[:, axis]
        rotation = rotation @ single
    return rotation


def gaussian_filter_separable(x: torch.Tensor, kernels: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Filter every sample with its own 1D kernel along each spatial axis (all channels alike).

    Borders are mirrored about the edge (``d c b a | a b c d``, scipy.ndimage's ``reflect``), so a
    constant image stays constant. Along each axis the (mirror-padded) line is cut into blocks of
    ``block`` outputs with their ``K - 1`` neighbours, and every block of every sample is filtered
    by one batched matrix product with that sample's ``(block + K - 1, block)`` banded matrix: one
    dense BLAS/cuBLAS call per axis, ``2 (block + K - 1)`` multiply-adds per voxel. On a CPU this
    measured faster than a grouped depthwise convolution, than K shifted multiply-adds, and than
    one product with a whole-axis ``(L, L)`` matrix.

    Parameters
    ----------
    x : (N, C, *S) tensor
    kernels : (N, K) tensor, K odd
        Kernel of sample ``n`` in row ``n``, centred on tap ``K // 2``.
    block : int
        Outputs per block (the matrix product's inner size is ``block + K - 1``).
    """
    n_samples, n_taps = kernels.shape
    radius = n_taps // 2
    # band[n, j, i] = kernels[n, j - i]: output i of a block reads inputs i .. i + K - 1 of its window.
    offsets = torch.arange(block + n_taps - 1, device=x.device)[:, None] - torch.arange(block, device=x.device)
    inside = (offsets >= 0) & (offsets < n_taps)
    band = kernels.to(x.dtype)[:, offsets.clamp(0, n_taps - 1)] * inside.to(x.dtype)
    out = x
    for dim in range(2, x.ndim):
        length = out.shape[dim]
        n_blocks = -(-length // block)
        moved = out.movedim(dim, -1)
        padded = _mirror_pad_last(moved, radius, n_blocks * block - length)
        windows = padded.unfold(-1, block + n_taps - 1, block)  # (N, ..., n_blocks, block + K - 1), a view
        rows = windows.reshape(n_samples, -1, block + n_taps - 1)
        filtered = torch.bmm(rows, band).view(*moved.shape[:-1], n_blocks * block)
        out = filtered[..., :length].movedim(-1, dim)
    return out.contiguous()


def _mirror_pad_last(x: torch.Tensor, radius: int, extra: int) -> torch.Tensor:
    """``x`` with ``radius`` mirrored voxels before, ``radius + extra`` after along the last axis.

    Mirroring is edge-inclusive (``d c b a | a b c d``); positions past the mirror image (filter
    outputs that are discarded, or a radius longer than the axis) come from the periodic mirror
    extension.
    """
    length = x.shape[-1]
    after = radius + extra
    if radius <= length and after <= length:  # the usual case: two slabs around the line
        return torch.cat([x[..., :radius].flip(-1), x, x[..., length - after:].flip(-1)], dim=-1)
    positions = torch.arange(-radius, length + after, device=x.device)
    return x.index_select(-1, _mirror_index(positions, length))


def _mirror_index(position: torch.Tensor, length: int) -> torch.Tensor:
    """Indices of ``position`` (any integers) in the edge-inclusive mirror extension of ``0..length-1``."""
    period = 2 * length  # the mirrored signal repeats every 2 * length voxels
    position = position % period
    return torch.where(position >= length, period - 1 - position, position)
