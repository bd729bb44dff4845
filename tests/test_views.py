"""Tests for neurocl.views: each batched transform against a plain reference, seeds, 2D."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from scipy import ndimage, optimize

from neurocl.errors import ConfigError
from neurocl.views import ViewConfig, ViewSampler

SHAPE = (10, 12, 9)
OFF = dict(p_crop=0.0, p_flip=0.0, p_affine=0.0, p_intensity=0.0, p_gamma=0.0, p_noise=0.0, p_blur=0.0, p_cutout=0.0)


def only(**settings) -> ViewConfig:
    """A recipe with every transform off except ``settings``."""
    return ViewConfig(**{**OFF, **settings})


def volumes(batch: int = 4, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 1, *shape), generator=generator) + 0.5


def views_of(config: ViewConfig, x: torch.Tensor, n_views: int = 2, seed: int = 0, spatial_dims: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return ViewSampler(config, spatial_dims=spatial_dims)(x, n_views=n_views, generator=generator)


def ramp(shape, axis: int) -> torch.Tensor:
    """(1, 1, *shape) volume whose value is the voxel index along ``axis``."""
    index = torch.arange(shape[axis], dtype=torch.float32)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return index.view(view).expand(shape).clone()[None, None]


# ---------------------------------------------------------------- shapes, seeds, defaults


def test_default_views_have_input_shape_dtype_and_device():
    x = volumes()
    views = views_of(ViewConfig(), x, n_views=3)
    assert views.shape == (3, *x.shape)
    assert views.dtype == torch.float32 and views.device == x.device
    assert torch.isfinite(views).all()


def test_defaults_are_the_yaware_recipe():
    config = ViewConfig()
    assert (config.p_crop, config.p_flip, config.p_noise, config.p_blur, config.p_cutout) == (0.5,) * 5
    assert config.crop_scale == (0.75, 0.75) and config.crop_resize
    assert config.blur_sigma == (0.1, 1.0) and config.noise_sigma == (0.1, 1.0)
    assert config.cutout_fraction == 0.25 and config.flip_mode == "one"
    assert config.p_affine == config.p_intensity == config.p_gamma == 0.0


def test_same_seed_same_views_other_seed_other_views():
    x = volumes()
    first, again, other = (views_of(ViewConfig(), x, seed=s) for s in (3, 3, 4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_per_sample_parameters_differ_across_the_batch():
    """One volume repeated 16 times must give 16 different views (parameters are drawn per sample)."""
    x = volumes(batch=1).expand(16, -1, -1, -1, -1).contiguous()
    views = views_of(ViewConfig(p_crop=1.0, p_noise=1.0, p_cutout=1.0), x, n_views=2).flatten(0, 1)
    distinct = {tuple(view.flatten()[:50].tolist()) for view in views}
    assert len(distinct) == 32


def test_probability_zero_is_identity():
    x = volumes()
    views = views_of(ViewConfig(**OFF), x, n_views=2)
    assert torch.equal(views[0], x) and torch.equal(views[1], x)


def test_two_dimensional_images_work_with_the_default_recipe():
    x = volumes(batch=3, shape=(16, 20))
    views = views_of(ViewConfig(p_affine=0.5), x, n_views=2, spatial_dims=2)
    assert views.shape == (2, 3, 1, 16, 20) and torch.isfinite(views).all()


def test_wrong_input_rank_is_a_clear_error():
    with pytest.raises(ConfigError, match="3 spatial dims"):
        ViewSampler(ViewConfig())(torch.zeros(2, 1, 8, 8))


def test_bad_recipes_are_refused():
    with pytest.raises(ValidationError, match="p_flip"):
        ViewConfig(p_flip=1.5)
    with pytest.raises(ValidationError, match="noise_sigma"):
        ViewConfig(noise_sigma=(1.0, 0.1))
    with pytest.raises(ValidationError, match="crop_scale"):
        ViewConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ConfigError, match="flip_axes"):
        ViewSampler(ViewConfig(flip_axes=(3,)), spatial_dims=3)
    with pytest.raises(ConfigError, match="crop_size"):
        ViewSampler(ViewConfig(crop_size=(4, 4)), spatial_dims=3)


# ---------------------------------------------------------------- flips


def test_flip_each_axis_with_p1_equals_torch_flip_of_every_axis():
    x = volumes()
    views = views_of(only(p_flip=1.0, flip_mode="each"), x)
    assert torch.equal(views[0], torch.flip(x, dims=(2, 3, 4)))


def test_flip_twice_is_identity():
    x = volumes()
    sampler = ViewSampler(only(p_flip=1.0, flip_mode="each"))
    once = sampler(x, n_views=1)[0]
    assert torch.equal(sampler(once, n_views=1)[0], x)


def test_flip_one_axis_flips_exactly_one_axis_of_the_selected_samples():
    x = volumes(batch=1).expand(200, -1, -1, -1, -1)
    views = views_of(only(p_flip=0.5), x, n_views=1)[0]
    outcomes = []
    for view in views:
        matches = [axis for axis in range(3) if torch.equal(view, torch.flip(x[0], dims=(1 + axis,)))]
        assert torch.equal(view, x[0]) or len(matches) == 1
        outcomes.append(matches[0] if matches else None)
    flipped = [axis for axis in outcomes if axis is not None]
    assert 0.38 < len(flipped) / 200 < 0.62  # p = 0.5
    assert set(flipped) == {0, 1, 2}


def test_flip_axes_restricts_the_flipped_axes():
    x = volumes()
    views = views_of(only(p_flip=1.0, flip_axes=(1,)), x)
    assert torch.equal(views[0], torch.flip(x, dims=(3,)))


# ---------------------------------------------------------------- crops and geometry


def find_box(view: torch.Tensor, volume: torch.Tensor, size, transform=lambda box: box):
    """Start corners whose box of ``size`` in ``volume`` (after ``transform``) equals ``view``."""
    found = []
    ranges = [range(s - c + 1) for s, c in zip(volume.shape[1:], size)]
    for start in itertools.product(*ranges):
        box = volume[(slice(None),) + tuple(slice(a, a + c) for a, c in zip(start, size))]
        candidate = transform(box)
        if candidate.shape == view.shape and torch.allclose(candidate, view, atol=1e-6):
            found.append(start)
    return found


def test_crop_without_resize_equals_slicing_at_per_sample_corners():
    x = volumes(batch=6)
    views = views_of(only(p_crop=1.0, crop_scale=(0.5, 0.5), crop_resize=False), x, n_views=1)[0]
    size = tuple(math.ceil(0.5 * s) for s in SHAPE)
    assert views.shape == (6, 1, *size)
    corners = [find_box(view, volume, size) for view, volume in zip(views, x)]
    assert all(len(found) == 1 for found in corners)
    assert len({found[0] for found in corners}) > 1


def test_crop_with_resize_equals_slice_then_trilinear_resize():
    x = volumes(batch=4)
    views = views_of(only(p_crop=1.0), x, n_views=1)[0]
    size = tuple(math.ceil(0.75 * s) for s in SHAPE)  # y-Aware: ceil(0.75 * side)

    def resize(box):
        return F.interpolate(box[None], size=SHAPE, mode="trilinear", align_corners=False)[0]

    assert all(len(find_box(view, volume, size, resize)) == 1 for view, volume in zip(views, x))


def test_unselected_samples_are_not_cropped():
    x = volumes(batch=40)
    views = views_of(only(p_crop=0.5), x, n_views=1)[0]
    unchanged = [torch.equal(view, volume) for view, volume in zip(views, x)]
    assert 0.25 < np.mean(unchanged) < 0.75


def interior_slope(view: torch.Tensor, axis: int) -> float:
    """Mean step of a (resampled) ramp along ``axis`` away from the borders."""
    steps = view.diff(dim=axis)
    inner = tuple(slice(3, -3) for _ in range(view.ndim))
    return float(steps[inner].mean())


def test_varying_crop_scale_zooms_by_the_drawn_scale():
    """A crop of fraction f resized back turns a unit ramp into a ramp of slope f (grid_sample path)."""
    shape = (24, 24, 24)
    x = ramp(shape, axis=0).expand(8, -1, -1, -1, -1)
    views = views_of(only(p_crop=1.0, crop_scale=(0.5, 1.0)), x, n_views=1)[0]
    slopes = [interior_slope(view[0], 0) for view in views]
    assert all(0.5 - 1e-4 <= slope <= 1.0 + 1e-4 for slope in slopes)
    assert max(slopes) - min(slopes) > 0.05


def test_scaling_by_two_halves_a_ramp_slope():
    shape = (24, 24, 24)
    x = ramp(shape, axis=2)
    views = views_of(only(p_affine=1.0, rotation_deg=0.0, scaling=(2.0, 2.0)), x, n_views=1)[0]
    assert interior_slope(views[0, 0], 2) == pytest.approx(0.5, abs=1e-4)


def test_rotation_keeps_a_centred_ball():
    shape = (21, 21, 21)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) - n // 2 for n in shape], indexing="ij"))
    ball = ((grid.float() ** 2).sum(0) <= 36).float()[None, None].expand(6, -1, -1, -1, -1)
    views = views_of(only(p_affine=1.0, rotation_deg=45.0, scaling=(1.0, 1.0)), ball, n_views=1)[0]
    for view in views:
        assert view.sum().item() == pytest.approx(ball[0].sum().item(), rel=0.03)
        assert view[0, 10, 10, 10].item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.equal(views[0], views[1])


# ---------------------------------------------------------------- voxel-wise transforms


def test_blur_with_one_sigma_equals_scipy_gaussian_filter():
    x = volumes(batch=3)
    views = views_of(only(p_blur=1.0, blur_sigma=(0.7, 0.7)), x, n_views=1)[0]
    for view, volume in zip(views, x):
        reference = ndimage.gaussian_filter(volume[0].double().numpy(), sigma=0.7)  # reflect, truncate 4
        np.testing.assert_allclose(view[0].numpy(), reference, atol=1e-5)


def test_blur_sigmas_are_drawn_per_sample_in_range():
    """Each view is scipy's filter at some sigma in the range (fitted), and the sigmas differ."""
    x = volumes(batch=1).expand(6, -1, -1, -1, -1)
    views = views_of(only(p_blur=1.0, blur_sigma=(0.2, 1.0)), x, n_views=1)[0]
    volume = x[0, 0].double().numpy()
    radius = int(4 * 1.0 + 0.5)  # one radius for the batch, from the largest sigma
    sigmas = []
    for view in views:
        def error(sigma, target=view[0].double().numpy()):
            return np.abs(ndimage.gaussian_filter(volume, sigma, radius=radius) - target).max()

        fit = optimize.minimize_scalar(error, bounds=(0.1, 1.1), method="bounded", options={"xatol": 1e-7})
        assert fit.fun < 1e-5 and 0.2 - 1e-4 <= fit.x <= 1.0 + 1e-4
        sigmas.append(fit.x)
    assert np.ptp(sigmas) > 0.1


def test_noise_has_the_drawn_standard_deviation():
    x = volumes(batch=4, shape=(24, 24, 24))
    views = views_of(only(p_noise=1.0, noise_sigma=(0.5, 0.5)), x, n_views=1)[0]
    residual = (views - x).flatten(1)
    assert residual.std(dim=1).numpy() == pytest.approx([0.5] * 4, rel=0.05)
    assert residual.mean(dim=1).abs().max() < 0.02
    varied = views_of(only(p_noise=1.0, noise_sigma=(0.1, 1.0)), x, n_views=1)[0]
    stds = (varied - x).flatten(1).std(dim=1)
    assert ((stds > 0.09) & (stds < 1.05)).all() and stds.max() - stds.min() > 0.05


def test_noise_with_p_half_leaves_some_samples_exactly_unchanged():
    x = volumes(batch=40)
    views = views_of(only(p_noise=0.5), x, n_views=1)[0]
    unchanged = [torch.equal(view, volume) for view, volume in zip(views, x)]
    assert 0.25 < np.mean(unchanged) < 0.75


def test_cutout_zeroes_one_box_of_the_fraction_of_each_side():
    x = volumes(batch=8)
    views = views_of(only(p_cutout=1.0, cutout_fraction=0.25), x, n_views=1)[0]
    size = [math.ceil(0.25 * s) for s in SHAPE]
    corners = set()
    for view, volume in zip(views, x):
        zeros = (view[0] == 0).nonzero()
        low, high = zeros.min(0).values, zeros.max(0).values
        assert (high - low + 1).tolist() == size and len(zeros) == math.prod(size)
        keep = view[0] != 0
        assert torch.equal(view[0][keep], volume[0][keep])
        corners.add(tuple(low.tolist()))
    assert len(corners) > 1


def test_intensity_is_a_per_sample_affine_map_in_range():
    x = volumes(batch=6)
    views = views_of(only(p_intensity=1.0, intensity_scale=(0.5, 2.0), intensity_shift=(-1.0, 1.0)), x, n_views=1)[0]
    scales = []
    for view, volume in zip(views, x):
        scale, shift = np.polyfit(volume.flatten().numpy(), view.flatten().numpy(), 1)
        assert 0.5 <= scale <= 2.0 and -1.0 <= shift <= 1.0
        np.testing.assert_allclose(view.numpy(), scale * volume.numpy() + shift, atol=1e-5)
        scales.append(scale)
    assert np.ptp(scales) > 0.1


def test_gamma_raises_the_rescaled_volume_to_the_power():
    x = volumes(batch=2)
    views = views_of(only(p_gamma=1.0, gamma=(2.0, 2.0)), x, n_views=1)[0]
    for view, volume in zip(views, x):
        low, high = volume.min(), volume.max()
        expected = ((volume - low) / (high - low)) ** 2 * (high - low) + low
        np.testing.assert_allclose(view.numpy(), expected.numpy(), atol=1e-5, rtol=1e-5)


def test_sample_reads_the_store_and_follows_the_seed():
    class FakeStore:  # the sampler needs only .batch(indices)
        data = volumes(batch=5)

        def batch(self, indices):
            return self.data[torch.as_tensor(indices)]

    sampler = ViewSampler(only(p_flip=1.0, flip_mode="each"), store=FakeStore())
    views = sampler.sample([4, 1], n_views=2, seed=0)
    assert torch.equal(views[1], torch.flip(FakeStore.data[[4, 1]], dims=(2, 3, 4)))
    assert torch.equal(ViewSampler(ViewConfig(), store=FakeStore()).sample([0, 2], seed=1),
                       ViewSampler(ViewConfig(), store=FakeStore()).sample([0, 2], seed=1))
    with pytest.raises(ConfigError, match="needs a store"):
        ViewSampler(ViewConfig()).sample([0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_views_under_autocast_are_the_float32_views(dtype):
    """Autocast (bf16-mixed training) must not change the views' precision: the blur's matrix
    products would otherwise come back in half precision."""
    config = ViewConfig(p_crop=1.0, crop_scale=(0.6, 0.9), p_affine=1.0, p_intensity=1.0, p_gamma=1.0,
                        p_noise=1.0, p_blur=1.0, p_cutout=1.0)
    x = volumes()
    expected = views_of(config, x, seed=3)
    with torch.autocast(device_type="cpu", dtype=dtype):
        under_autocast = views_of(config, x, seed=3)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected, rtol=0, atol=0)
