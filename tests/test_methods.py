"""Tests of neurocl.methods: batch construction, resumable batch order and the method modules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neurocl import losses
from neurocl.errors import ConfigError, TrainingError
from neurocl.methods import EpochBatches, MethodConfig, OptimConfig, _lr_factor, build_method, method_from_checkpoint


def _groups(n_target: int, n_background: int) -> np.ndarray:
    return np.array([True] * n_target + [False] * n_background)


def test_balanced_batches_hold_the_requested_target_count_and_both_groups():
    is_target = _groups(10, 30)
    batches = EpochBatches(np.arange(40), batch_size=8, seed=3, is_target=is_target, target_fraction=0.25)
    for batch in batches.epoch(0):
        assert len(batch) == 8
        assert is_target[batch].sum() == 2


def test_balanced_epoch_covers_the_larger_group_once():
    is_target = _groups(10, 30)
    batches = EpochBatches(np.arange(40), batch_size=8, seed=0, is_target=is_target, target_fraction=0.25)
    background_seen = np.concatenate([batch[~is_target[batch]] for batch in batches.epoch(1)])
    # 30 background subjects, 6 per batch: 5 batches, each subject exactly once.
    assert len(batches) == 5
    assert sorted(background_seen.tolist()) == list(range(10, 40))


def test_target_fraction_never_leaves_a_group_out():
    batches = EpochBatches(np.arange(20), batch_size=4, is_target=_groups(10, 10), target_fraction=0.01)
    assert batches.n_target == 1
    batches = EpochBatches(np.arange(20), batch_size=4, is_target=_groups(10, 10), target_fraction=0.99)
    assert batches.n_target == 3


def test_balanced_batches_without_a_group_are_refused():
    with pytest.raises(ConfigError, match="0 target"):
        EpochBatches(np.arange(10), batch_size=4, is_target=np.zeros(10, bool))


def test_batch_order_depends_only_on_seed_and_epoch():
    first = EpochBatches(np.arange(50), batch_size=10, seed=7)
    second = EpochBatches(np.arange(50), batch_size=10, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(first.epoch(4), second.epoch(4)))
    assert not all(np.array_equal(a, b) for a, b in zip(first.epoch(4), first.epoch(5)))


def test_unbalanced_batches_drop_the_incomplete_last_batch():
    batches = EpochBatches(np.arange(23), batch_size=5, seed=0)
    epoch = batches.epoch(0)
    assert len(batches) == len(epoch) == 4
    assert len(np.unique(np.concatenate(epoch))) == 20


def test_ranks_get_distinct_subjects_that_together_form_the_global_batch():
    is_target = _groups(16, 16)
    ranks = [EpochBatches(np.arange(32), 4, seed=1, is_target=is_target, rank=r, world_size=2) for r in range(2)]
    for batch_0, batch_1 in zip(ranks[0].epoch(2), ranks[1].epoch(2)):
        assert not set(batch_0) & set(batch_1)
        assert is_target[batch_0].sum() == is_target[batch_1].sum() == 2
    assert len(ranks[0]) == len(ranks[1]) == 4


def test_iteration_serves_one_epoch_per_iter_call():
    batches = EpochBatches(np.arange(12), batch_size=4, seed=2)
    first, second = list(batches), list(batches)
    assert [b["epoch"] for b in first] == [0, 0, 0] and [b["epoch"] for b in second] == [1, 1, 1]
    assert [b["position"] for b in second] == [0, 1, 2]
    assert np.array_equal(second[1]["indices"], batches.epoch(1)[1])


def test_loaded_state_resumes_after_the_last_finished_batch():
    batches = EpochBatches(np.arange(20), batch_size=4, seed=5)
    batches.mark_done(epoch=2, position=1)
    resumed = EpochBatches(np.arange(20), batch_size=4, seed=5)
    resumed.load_state_dict(batches.state_dict())
    served = list(resumed)
    assert [(b["epoch"], b["position"]) for b in served] == [(2, 2), (2, 3), (2, 4)]
    assert np.array_equal(served[0]["indices"], batches.epoch(2)[2])
    assert [b["epoch"] for b in resumed][0] == 3


def test_state_at_an_epoch_end_resumes_with_the_next_epoch():
    batches = EpochBatches(np.arange(8), batch_size=4)
    batches.load_state_dict({"epoch": 0, "batches_done": 2})
    assert [(b["epoch"], b["position"]) for b in batches] == [(1, 0), (1, 1)]


def test_cosine_schedule_warms_up_then_decays_to_zero():
    factor = _lr_factor(total_steps=110, warmup_steps=10, schedule="cosine")
    assert factor(0) == pytest.approx(0.01)
    assert factor(5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(110) == pytest.approx(0.0, abs=1e-12)
    assert _lr_factor(100, 0, "constant")(70) == 1.0


def test_yaware_config_without_attributes_names_the_field():
    with pytest.raises(ValueError, match="method.attributes"):
        MethodConfig(name="yaware")


def test_sigma_list_must_match_the_attributes():
    with pytest.raises(ValueError, match="2 values for 1 attributes"):
        MethodConfig(name="decoupled_uniformity", attributes=["age"], sigma=[1.0, 2.0])
