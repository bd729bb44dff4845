"""Tests for neurocl.patches: every batched gather against a plainly written loop over patches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from neurocl.errors import ConfigError
from neurocl.patches import (
    PatchConfig,
    PatchSampler,
    aggregate_patches,
    extract_patches,
    gather_boxes,
    grid_corners,
    random_corners,
    sliding_window_features,
    store_patches,
)
from neurocl.store import VolumeStore
from neurocl.views import ViewConfig, ViewSampler

SHAPE = (10, 12, 9)
IDENTITY = ViewConfig(p_crop=0.0, p_flip=0.0, p_noise=0.0, p_blur=0.0, p_cutout=0.0)


def volumes(batch: int = 4, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 1, *shape), generator=generator) + 0.5


def loop_boxes(x: torch.Tensor, rows, corners, size) -> torch.Tensor:
    """The reference: one slice per patch."""
    return torch.stack([x[(row, slice(None), *(slice(c, c + p) for c, p in zip(corner, size)))]
                        for row, corner in zip(list(rows), corners.tolist())])


def corner_of(volume: torch.Tensor, patch: torch.Tensor) -> list[tuple[int, ...]]:
    """Every corner where ``patch`` (C, *size) equals a box of ``volume`` (C, *S), by exhaustive search."""
    size = patch.shape[1:]
    ranges = [range(s - p + 1) for s, p in zip(volume.shape[1:], size)]
    return [start for start in itertools.product(*ranges)
            if torch.equal(volume[(slice(None),) + tuple(slice(a, a + p) for a, p in zip(start, size))], patch)]


@pytest.fixture
def store(tmp_path) -> VolumeStore:
    """Six random volumes of SHAPE in a float32 memory-mapped store (CPU, not resident)."""
    return VolumeStore.from_array(volumes(batch=6, seed=3).numpy(), tmp_path / "store", dtype="float32")


# ---------------------------------------------------------------- random patches


def test_random_corners_reach_every_valid_position_and_no_other():
    generator = torch.Generator().manual_seed(0)
    corners = random_corners(4000, (7, 5), (3, 5), generator)
    assert corners.dtype == torch.long and corners.shape == (4000, 2)
    assert sorted(set(corners[:, 0].tolist())) == [0, 1, 2, 3, 4]  # 7 - 3 + 1 positions
    assert set(corners[:, 1].tolist()) == {0}  # the patch spans the axis
    counts = np.bincount(corners[:, 0].numpy(), minlength=5)
    assert counts.min() > 650 and counts.max() < 950  # uniform: 800 expected per position


def test_random_corners_follow_the_generator_and_refuse_a_patch_too_large():
    first = random_corners(10, SHAPE, (4, 4, 4), torch.Generator().manual_seed(1))
    assert torch.equal(first, random_corners(10, SHAPE, (4, 4, 4), torch.Generator().manual_seed(1)))
    assert not torch.equal(first, random_corners(10, SHAPE, (4, 4, 4), torch.Generator().manual_seed(2)))
    with pytest.raises(ConfigError, match="larger than the volume"):
        random_corners(1, SHAPE, (11, 4, 4))


def test_gather_boxes_equals_one_slice_per_patch():
    x = volumes(batch=3)
    size = (4, 5, 3)
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor([2, 0, 2, 1, 1, 0, 2])
    corners = random_corners(len(rows), SHAPE, size, generator)
    assert torch.equal(gather_boxes(x, rows, corners, size), loop_boxes(x, rows.tolist(), corners, size))


def test_gather_boxes_handles_channels_2d_and_non_contiguous_input():
    # The gather reads rows through the tensor's strides: check 2 channels, a 2D batch, a transposed
    # (non-contiguous) batch and boxes flush with the far border.
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, *SHAPE, generator=generator)
    size = (SHAPE[0], 2, 3)
    rows = torch.tensor([1, 2, 0])
    corners = random_corners(len(rows), SHAPE, size, generator)
    corners[0] = torch.tensor([0, SHAPE[1] - 2, SHAPE[2] - 3])
    assert torch.equal(gather_boxes(x, rows, corners, size), loop_boxes(x, rows.tolist(), corners, size))
    image = torch.randn(4, 1, 9, 7, generator=generator)
    corners = random_corners(5, (9, 7), (3, 7), generator)
    rows = torch.tensor([3, 3, 0, 1, 2])
    assert torch.equal(gather_boxes(image, rows, corners, (3, 7)), loop_boxes(image, rows.tolist(), corners, (3, 7)))
    transposed = torch.randn(3, 1, SHAPE[2], SHAPE[1], SHAPE[0], generator=generator).transpose(2, 4)
    corners = random_corners(2, SHAPE, (3, 3, 3), generator)
    assert torch.equal(gather_boxes(transposed, torch.tensor([2, 0]), corners, (3, 3, 3)),
                       loop_boxes(transposed, [2, 0], corners, (3, 3, 3)))


def test_store_patches_from_the_memory_map_equal_slices_of_the_stored_volumes(store):
    size = (5, 6, 4)
    rows = np.array([5, 1, 1, 3])
    corners = random_corners(len(rows), SHAPE, size, torch.Generator().manual_seed(4))
    patches = store_patches(store, rows, corners, size)
    reference = loop_boxes(torch.from_numpy(np.array(store.volumes)), rows, corners, size)
    assert patches.dtype == torch.float32 and torch.equal(patches, reference)


def test_store_patches_from_a_resident_store_equal_the_memory_map_ones(store):
    size = (4, 4, 4)
    rows = np.array([0, 4, 2])
    corners = random_corners(len(rows), SHAPE, size, torch.Generator().manual_seed(5))
    from_map = store_patches(store, rows, corners, size)
    # A resident store on the CPU stands for the GPU copy that VolumeStore.to("cuda") makes: the
    # float16 tensor that store_patches then cuts on its device.
    store._resident = torch.from_numpy(np.array(store.volumes)).half()
    resident = store_patches(store, rows, corners, size)
    assert torch.equal(resident, from_map.half().float())


def test_store_patches_refuse_bad_rows_and_sizes(store):
    corners = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="out of range"):
        store_patches(store, [6], corners, (2, 2, 2))
    with pytest.raises(ConfigError, match="views.patches.size"):
        store_patches(store, [0], corners, (11, 2, 2))


# ---------------------------------------------------------------- the training views


def test_same_location_views_are_views_of_one_box_of_their_subject(store):
    sampler = PatchSampler(PatchConfig(size=(4, 5, 3), per_subject=3), ViewSampler(IDENTITY), store)
    views, rows = sampler([4, 0], n_views=2, generator=torch.Generator().manual_seed(0))
    assert views.shape == (2, 6, 1, 4, 5, 3)
    assert rows.tolist() == [4, 4, 4, 0, 0, 0]
    stored = torch.from_numpy(np.array(store.volumes))
    assert torch.equal(views[0], views[1])  # identity recipe: both views are the same location
    for sample, row in enumerate(rows):
        assert corner_of(stored[row], views[0, sample]), f"sample {sample} is not a box of volume {row}"
    assert sampler.samples_per_subject() == 3


def test_same_subject_views_are_k_boxes_of_the_same_subject(store):
    sampler = PatchSampler(PatchConfig(size=4, per_subject=3, positives="same_subject"), ViewSampler(IDENTITY), store)
    views, rows = sampler([2, 5], n_views=2, generator=torch.Generator().manual_seed(1))
    assert views.shape == (3, 2, 1, 4, 4, 4)  # K views of B subjects; n_views does not apply
    assert rows.tolist() == [2, 5]
    stored = torch.from_numpy(np.array(store.volumes))
    for view in range(3):
        for subject, row in enumerate(rows):
            assert corner_of(stored[row], views[view, subject])
    assert not torch.equal(views[0], views[1])  # different places of the same brains
    assert sampler.samples_per_subject() == 1


def test_grid_placement_cuts_patches_at_the_sliding_window_grid_only(store):
    """placement: grid (the default): every patch sits at a corner of the grid that embed: sliding averages over,
    and over many draws every grid position is used (uniformly drawn, with replacement)."""
    config = PatchConfig(size=(4, 5, 3), per_subject=8, placement="grid", embed_stride=1.0)
    grid = {tuple(corner) for corner in grid_corners(store.spatial_shape, (4, 5, 3), config.grid_strides(3)).tolist()}
    assert config.grid_strides(3) == (4, 5, 3) and len(grid) == 27  # starts 0, 4, 6 x 0, 5, 7 x 0, 3, 6
    sampler = PatchSampler(config, ViewSampler(IDENTITY), store)
    stored = torch.from_numpy(np.array(store.volumes))
    seen = set()
    for seed in range(12):
        views, rows = sampler([0, 3, 5], n_views=2, generator=torch.Generator().manual_seed(seed))
        assert views.shape == (2, 24, 1, 4, 5, 3)
        for sample, row in enumerate(rows):
            corners = corner_of(stored[row], views[0, sample])
            assert len(corners) == 1 and corners[0] in grid, f"sample {sample}: {corners} is not a grid corner"
            seen.add(corners[0])
    assert seen == grid
    again, _ = sampler([0, 3, 5], n_views=2, generator=torch.Generator().manual_seed(11))
    assert torch.equal(views, again)
    # placement: random cuts anywhere the patch fits, mostly off the grid.
    anywhere = PatchSampler(config.model_copy(update={"placement": "random"}), ViewSampler(IDENTITY), store)
    views, rows = anywhere([0, 3, 5], n_views=1, generator=torch.Generator().manual_seed(0))
    corners = [corner_of(stored[row], views[0, sample])[0] for sample, row in enumerate(rows)]
    assert sum(corner not in grid for corner in corners) > len(corners) // 2


def test_patch_views_apply_the_recipe_and_follow_the_seed(store):
    flip = ViewConfig(p_crop=0.0, p_flip=1.0, flip_mode="each", p_noise=0.0, p_blur=0.0, p_cutout=0.0)
    sampler = PatchSampler(PatchConfig(size=(4, 5, 3), per_subject=2), ViewSampler(flip), store)
    views, _ = sampler([1, 3], n_views=1, generator=torch.Generator().manual_seed(2))
    plain, _ = PatchSampler(PatchConfig(size=(4, 5, 3), per_subject=2), ViewSampler(IDENTITY), store)(
        [1, 3], n_views=1, generator=torch.Generator().manual_seed(2))
    # Same seed, same corners (drawn first); the flip recipe then flips every axis of every patch.
    assert torch.equal(views[0], plain[0].flip(2, 3, 4))
    again, _ = sampler([1, 3], n_views=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(views, again)


def test_patch_config_is_validated(store):
    with pytest.raises(ValidationError, match="per_subject must be >= 2"):
        PatchConfig(per_subject=1, positives="same_subject")
    with pytest.raises(ValidationError, match="positive"):
        PatchConfig(size=(4, 0, 4))
    with pytest.raises(ValidationError):
        PatchConfig(positives="same_site")
    with pytest.raises(ConfigError, match=r"views.patches.size \(11, 4, 4\) is larger"):
        PatchSampler(PatchConfig(size=(11, 4, 4)), ViewSampler(IDENTITY), store)
    assert ViewConfig.model_validate({"patches": {"size": 8, "per_subject": 2}}).patches.sizes(3) == (8, 8, 8)


# ---------------------------------------------------------------- sliding-window features


def test_sliding_window_features_are_the_mean_of_the_grid_patches_features():
    x = volumes(batch=3)
    weights = torch.randn(2, 4 * 4 * 4, generator=torch.Generator().manual_seed(0))

    def encode(patches):
        flat = patches.flatten(1)
        return {"a": flat @ weights.T, "b": flat.mean(1, keepdim=True)}

    features = sliding_window_features(encode, x, size=4, stride=3, batch_size=5)
    corners = grid_corners(SHAPE, 4, 3)
    for subject in range(3):
        patches = loop_boxes(x, [subject] * len(corners), corners, (4, 4, 4))
        reference = encode(patches)
        for name in ("a", "b"):
            torch.testing.assert_close(features[name][subject], reference[name].mean(0), rtol=1e-5, atol=1e-5)


def test_sliding_window_of_one_patch_the_size_of_the_volume_is_the_whole_volume():
    x = volumes(batch=2)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten())
    features = sliding_window_features(lambda p: {"rep": net(p)}, x, size=SHAPE, stride=1)
    torch.testing.assert_close(features["rep"], net(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- grid patches


def test_patches_equal_slices_at_their_coordinates_and_cover_the_border():
    x = volumes(batch=2, shape=(10, 12, 9))
    patches, coords = extract_patches(x, size=4, stride=3)
    starts = [sorted({int(c) for c in coords[:, axis]}) for axis in range(3)]
    assert starts == [[0, 3, 6], [0, 3, 6, 8], [0, 3, 5]]  # the last patch is flush with the border
    assert coords.dtype == torch.long and patches.shape == (2, len(coords), 1, 4, 4, 4)
    assert coords.tolist() == [list(c) for c in itertools.product(*starts)]  # last axis fastest
    for position, (a, b, c) in enumerate(coords.tolist()):
        assert torch.equal(patches[:, position], x[:, :, a:a + 4, b:b + 4, c:c + 4])


def test_patches_match_unfold_when_the_stride_tiles_the_volume():
    x = volumes(batch=2, shape=(8, 12, 10))
    patches, _ = extract_patches(x, size=(4, 4, 2), stride=(4, 4, 2))
    unfolded = x.unfold(2, 4, 4).unfold(3, 4, 4).unfold(4, 2, 2)  # (B, C, nD, nH, nW, 4, 4, 2)
    expected = unfolded.flatten(2, 4).transpose(1, 2)
    assert torch.equal(patches, expected)


def test_aggregate_of_extract_reconstructs_the_volume_exactly():
    x = volumes(batch=2, shape=(10, 12, 9))
    for size, stride in [(4, 3), (3, 3), ((5, 4, 3), (2, 3, 1))]:
        patches, coords = extract_patches(x, size, stride)
        assert torch.equal(aggregate_patches(patches, coords, size, x.shape[2:]), x)


def test_aggregate_of_patch_values_is_the_mean_over_overlaps():
    shape = (7, 6)
    patches, coords = extract_patches(torch.zeros(1, 1, *shape), size=3, stride=2)
    values = torch.arange(len(coords), dtype=torch.float32)[None] + 1
    total, count = np.zeros(shape), np.zeros(shape)
    for value, (a, b) in zip(values[0].tolist(), coords.tolist()):
        total[a:a + 3, b:b + 3] += value
        count[a:a + 3, b:b + 3] += 1
    result = aggregate_patches(values, coords, 3, shape)
    assert result.shape == (1, 1, *shape)
    np.testing.assert_allclose(result[0, 0].numpy(), total / count, rtol=1e-6)


def test_patches_larger_than_the_volume_are_refused():
    with pytest.raises(ConfigError, match="larger than the volume"):
        extract_patches(torch.zeros(1, 1, 4, 4, 4), size=5, stride=1)
