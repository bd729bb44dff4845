"""Tests of neurocl.methods: batch construction, resumable batch order and the method modules."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
import torch

from neurocl import losses
from neurocl.errors import ConfigError, TrainingError
from neurocl.methods import (
    METHODS,
    EpochBatches,
    MethodConfig,
    OptimConfig,
    build_method,
    method_from_checkpoint,
)
from neurocl.methods.base import _lr_factor


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


# ---------------------------------------------------------------- the method modules

ENCODER = {"name": "small_cnn", "width": 2}
BATCH = 6
SHAPE = (1, 8, 8, 8)
EXPECTED_TERMS = {
    "sepclr": {"common", "salient", "null", "mi"},
    "simclr": {"info_nce"},
    "yaware": {"yaware"},
    "decoupled_uniformity": {"uniformity"},
}


def _module(name: str, **method):
    from neurocl.methods import TrainingData

    torch.manual_seed(0)
    config = {"name": name, "common_dim": 3, "salient_dim": 3, "proj_dim": 5, **method}
    if name in ("yaware", "decoupled_uniformity"):
        config.setdefault("attributes", ["age"])
        config.setdefault("sigma", 10.0)
    config = {key: value for key, value in config.items() if key == "name" or key in METHODS[name].settings}
    module = build_method(config, ENCODER, seed=0)
    module.data = TrainingData(
        store=None, sampler=None, train_indices=np.arange(BATCH), val_indices=np.arange(0),
        is_target=torch.tensor([True, False] * (BATCH // 2)),
        attributes=torch.tensor([[20.0], [25.0], [40.0], [41.0], [60.0], [80.0]]), attribute_kinds=["continuous"],
        batch_size=BATCH,
    )
    return module.eval()


def _views(n_views: int = 2) -> torch.Tensor:
    return torch.randn(n_views, BATCH, *SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_each_method_returns_its_named_loss_terms(name):
    total, terms = _module(name).compute_loss(_views(), np.arange(BATCH))
    assert set(terms) == EXPECTED_TERMS[name]
    assert total.dim() == 0 and torch.isfinite(total) and total.requires_grad


def test_sepclr_total_is_the_weighted_sum_of_its_terms():
    module = _module("sepclr", beta_salient=2.0, beta_null=3.0, lam_mi=0.5)
    total, terms = module.compute_loss(_views(), np.arange(BATCH))
    weighted = terms["common"] + 2.0 * terms["salient"] + 3.0 * terms["null"] + 0.5 * terms["mi"]
    torch.testing.assert_close(total, weighted)


def test_simclr_loss_is_info_nce_of_the_projections_of_every_view():
    module = _module("simclr", temperature=0.2, n_views=3)
    views = _views(3)
    total, _ = module.compute_loss(views, np.arange(BATCH))
    projections = torch.stack([module.net(view)["proj"] for view in views])
    torch.testing.assert_close(total, losses.info_nce(projections, temperature=0.2))


def test_yaware_prior_is_the_rbf_kernel_of_the_batch_attributes():
    module = _module("yaware", sigma=10.0)
    indices = np.array([0, 2, 5])
    ages = np.array([20.0, 40.0, 80.0])
    expected = np.exp(-((ages[:, None] - ages[None, :]) ** 2) / (2 * 10.0**2))
    np.testing.assert_allclose(module.attribute_prior(indices).numpy(), expected, rtol=1e-6)


def test_embed_gives_the_representations_before_the_heads():
    module = _module("sepclr")
    x = _views()[0]
    spaces = module.embed(x)
    outputs = module.net(x)
    assert set(spaces) == {"common", "salient"}
    torch.testing.assert_close(spaces["common"], outputs["common_rep"])
    torch.testing.assert_close(spaces["salient"], outputs["salient_rep"])
    assert spaces["common"].shape == (BATCH, 3)
    assert set(_module("simclr").embed(x)) == {"emb"}


@pytest.mark.parametrize("common_objective", ["sepclr", "yaware", "decoupled_uniformity"])
def test_attribute_aware_sepclr_passes_the_batch_covariates_to_the_loss(common_objective):
    module = _module("sepclr", attributes=["age"], sigma=10.0, common_objective=common_objective, lam_cov=2.0,
                     temperature=0.3, null_weighting="reference", n_views=3)
    views, indices = _views(3), np.array([5, 0, 3, 2, 1, 4])
    total, terms = module.compute_loss(views, indices)
    assert set(terms) == {"common", "salient", "null", "mi", "cov"}
    outputs = [module.net(view) for view in views]
    expected, _ = losses.sepclr_loss(
        torch.stack([o["common"] for o in outputs]), torch.stack([o["salient"] for o in outputs]),
        module.data.is_target[indices], attributes=module.data.attributes[indices], attribute_kinds=["continuous"],
        sigma=10.0, common_objective=common_objective, temperature=0.3, lam_cov=2.0, null_weighting="reference",
    )
    torch.testing.assert_close(total, expected)


def test_sepclr_covariate_options_need_attributes():
    with pytest.raises(ValueError, match="lam_cov"):
        MethodConfig(name="sepclr", lam_cov=1.0)
    with pytest.raises(ValueError, match="common_objective 'yaware'"):
        MethodConfig(name="sepclr", common_objective="yaware")
    MethodConfig(name="sepclr", common_objective="decoupled_uniformity")  # no prior: plain decoupled uniformity


def test_sepclr_can_embed_the_representation_before_the_mlp():
    module = _module("sepclr", embed="representation")
    x = _views()[0]
    spaces, outputs = module.embed(x), module.net(x)
    features = module.net.common_encoder(x)
    torch.testing.assert_close(spaces["common"], module.net.common_branch.to_rep(features))
    assert not torch.allclose(spaces["common"], outputs["common"])  # the loss still sees the MLP's output
    torch.testing.assert_close(module.net.space(x, "salient"), spaces["salient"])


def test_method_from_checkpoint_restores_config_and_weights(tmp_path):
    module = _module("yaware", temperature=0.3)
    with torch.no_grad():
        next(module.parameters()).add_(1.0)  # differ from a fresh initialisation
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, tmp_path / "m.ckpt")
    restored = method_from_checkpoint(torch.load(tmp_path / "m.ckpt", weights_only=True))
    assert type(restored).__name__ == "YAware" and restored.method_config.temperature == 0.3
    x = _views()[0]
    torch.testing.assert_close(restored.embed(x)["emb"], module.embed(x)["emb"])


def test_non_finite_term_is_reported_with_its_name_and_the_step():
    module = _module("sepclr")
    terms = {"common": torch.tensor(1.0), "mi": torch.tensor(float("inf"))}
    with pytest.raises(TrainingError, match=r"step 0 \(epoch 0\): term 'mi' = inf"):
        module._check_finite(torch.tensor(float("inf")), terms)


def test_a_non_finite_gradient_stops_training_before_the_optimiser_step(tmp_path):
    """A finite loss with a NaN gradient (as torch's bf16 CPU convolution backward can give) must not
    reach the weights: the step raises, naming the parameter, and the weights stay as they were."""
    import lightning as L

    from neurocl.store import VolumeStore
    from neurocl.views import ViewConfig, ViewSampler

    volumes = np.random.default_rng(0).normal(size=(BATCH, *SHAPE)).astype(np.float32)
    store = VolumeStore.from_array(volumes, tmp_path / "store")
    module = _module("simclr")
    module.data.store = store
    module.data.sampler = ViewSampler(ViewConfig(), spatial_dims=3, store=store)
    name, poisoned = next((n, p) for n, p in module.named_parameters() if n.endswith("weight") and p.dim() == 5)
    poisoned.register_hook(lambda grad: grad * float("nan"))
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(TrainingError, match=rf"non-finite gradient at step 0 \(epoch 0\) in 1 parameter\(s\), "
                                            rf"first '{name}'; the loss was finite"):
        trainer.fit(module.train())
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, module.parameters()))


def test_step_seeds_differ_between_positions_epochs_ranks_and_streams():
    from neurocl.methods import step_seed

    seeds = {step_seed(0, 1, 2), step_seed(0, 1, 3), step_seed(0, 2, 2), step_seed(0, 1, 2, rank=1),
             step_seed(0, 1, 2, stream=1), step_seed(1, 1, 2)}
    assert len(seeds) == 6
    assert step_seed(0, 1, 2) == step_seed(0, 1, 2)


def test_optimiser_config_refuses_a_negative_learning_rate():
    with pytest.raises(ValueError, match="lr"):
        OptimConfig(lr=-1.0)


def test_batches_larger_than_a_group_are_refused_rather_than_repeating_subjects():
    with pytest.raises(ConfigError, match="takes 6 target subjects per step but there are 5"):
        EpochBatches(np.arange(30), batch_size=12, is_target=_groups(5, 25), target_fraction=0.5)
    with pytest.raises(ConfigError, match="exceeds the 10 subjects"):
        EpochBatches(np.arange(10), batch_size=6, world_size=2)


# ---------------------------------------------------------------- one training step in bf16

def _shipped_view_recipes() -> dict[str, dict]:
    """The ``views`` section of every shipped pipeline, by file name; patches made tiny (4^3) for SHAPE."""
    import yaml

    root = Path(__file__).parents[1]
    paths = sorted((root / "pipelines").glob("*.yaml")) + [root / "neurocl" / "pipelines" / "demo.yaml"]
    recipes = {f"{path.parent.name}/{path.stem}": yaml.safe_load(path.read_text()).get("views", {}) for path in paths}
    return {name: {**views, "patches": {**views["patches"], "size": 4}} if views.get("patches") else views
            for name, views in recipes.items()}


VIEW_RECIPES = {
    **_shipped_view_recipes(),
    "defaults": {},
    # Every transform on, crop at a varying scale (one grid_sample) and a blur every time.
    "every_transform": dict(p_crop=1.0, crop_scale=(0.6, 0.9), p_flip=1.0, p_affine=1.0, p_intensity=1.0,
                            p_gamma=1.0, p_noise=1.0, p_blur=1.0, p_cutout=1.0),
    "crop_without_resize": dict(p_crop=1.0, crop_scale=(0.75, 0.75), crop_resize=False, p_blur=1.0),
}


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")
@pytest.mark.parametrize("recipe", sorted(VIEW_RECIPES))
@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_one_training_step_runs_under_cpu_bf16_autocast(name, recipe, tmp_path):
    """bf16-mixed is the study template's precision and what ``precision: auto`` picks on GPUs:
    a training step must run under autocast for every method and every shipped view recipe."""
    import lightning as L

    from neurocl.store import VolumeStore
    from neurocl.views import ViewConfig, ViewSampler

    volumes = np.random.default_rng(0).normal(size=(BATCH, *SHAPE)).astype(np.float32)
    store = VolumeStore.from_array(volumes, tmp_path / "store")
    module = _module(name)
    module.data.store = store
    module.data.sampler = ViewSampler(ViewConfig(**VIEW_RECIPES[recipe]), spatial_dims=3, store=store)
    before = [p.detach().clone() for p in module.parameters()]
    autocast_in_forward = []
    module.net.register_forward_hook(lambda *_: autocast_in_forward.append(torch.is_autocast_enabled("cpu")))
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module.train())
    assert trainer.global_step == 1 and autocast_in_forward == [True]
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, module.parameters()))


@pytest.mark.parametrize(("name", "foreign"), [("simclr", {"beta_null": 5.0}), ("sepclr", {"proj_dim": 64}),
                                              ("decoupled_uniformity", {"temperature": 0.5}),
                                              ("yaware", {"attributes": ["age"], "common_dim": 8})])
def test_a_method_refuses_a_setting_it_does_not_read(name, foreign):
    field = next(iter(foreign.keys() - {"attributes"}))
    with pytest.raises(ValidationError, match=rf"{field}: not a setting of method '{name}'"):
        MethodConfig(name=name, **foreign)


def test_a_method_takes_its_own_settings_and_every_default():
    assert MethodConfig(name="simclr", temperature=0.2, proj_dim=64).temperature == 0.2
    assert MethodConfig(name="sepclr", common_dim=8, tau=0.3).tau == 0.3
    full = MethodConfig(name="yaware", attributes=["age"]).model_dump()  # a saved config holds every field
    assert MethodConfig.model_validate(full).name == "yaware"


# ---------------------------------------------------------------- patch-batched training


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")
@pytest.mark.parametrize("positives", ["same_location", "same_subject"])
@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_patch_training_feeds_every_patch_to_the_encoder_with_its_subjects_group(name, positives, tmp_path):
    """views.patches: K patches of each of the B subjects go through the encoder in one batch, and
    the loss receives the subject of every sample (its group for SepCLR, its attributes for the kernels)."""
    import lightning as L

    from neurocl.patches import PatchConfig
    from neurocl.store import VolumeStore
    from neurocl.views import ViewConfig, ViewSampler

    volumes = np.random.default_rng(0).normal(size=(BATCH, *SHAPE)).astype(np.float32)
    store = VolumeStore.from_array(volumes, tmp_path / "store")
    module = _module(name)
    module.data.store = store
    k = 3
    recipe = ViewConfig(patches=PatchConfig(size=4, per_subject=k, positives=positives))
    module.data.sampler = ViewSampler(recipe, spatial_dims=3, store=store)
    inputs, rows_seen = [], []
    module.net.register_forward_hook(lambda _, args, __: inputs.append(tuple(args[0].shape)))
    compute_loss = module.compute_loss

    def spy(views, rows):
        rows_seen.append(np.asarray(rows))
        return compute_loss(views, rows)

    module.compute_loss = spy
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module.train())
    assert trainer.global_step == 1
    n_views = module.method_config.n_views
    if positives == "same_location":
        assert inputs == [(n_views * BATCH * k, 1, 4, 4, 4)]
        assert len(rows_seen[0]) == BATCH * k and (np.bincount(rows_seen[0]) == k).all()  # each subject K times
    else:
        assert inputs == [(k * BATCH, 1, 4, 4, 4)]  # K patch views of B subjects
        assert sorted(rows_seen[0].tolist()) == list(range(BATCH))


def test_patch_trained_model_embeds_by_the_mean_of_grid_patch_features_or_whole(tmp_path):
    from neurocl.patches import PatchConfig, grid_corners
    from neurocl.store import VolumeStore

    volumes = np.random.default_rng(1).normal(size=(BATCH, *SHAPE)).astype(np.float32)
    store = VolumeStore.from_array(volumes, tmp_path / "store", dtype="float32")
    module = _module("sepclr")
    module.patches = PatchConfig(size=4, per_subject=2, embed_stride=0.5)
    sliding = module.embed_store(store, np.arange(3), batch_size=2)
    x = torch.from_numpy(volumes[:3])
    with torch.no_grad():
        for subject in range(3):
            patches = torch.stack([x[subject, :, a:a + 4, b:b + 4, c:c + 4] for a, b, c in grid_corners((8, 8, 8), 4, 2).tolist()])
            expected = module.embed(patches)["salient"].double().mean(0).numpy()
            np.testing.assert_allclose(sliding["salient"][subject], expected, rtol=1e-4, atol=1e-5)
        module.patches = PatchConfig(size=4, per_subject=2, embed="whole")
        np.testing.assert_allclose(module.embed_store(store, np.arange(3))["salient"],
                                   module.embed(x)["salient"].double().numpy(), rtol=1e-4, atol=1e-5)


def test_checkpoint_keeps_the_patch_recipe_for_embedding(tmp_path):
    from neurocl.patches import PatchConfig

    module = _module("simclr")
    module.patches = PatchConfig(size=(4, 4, 2), per_subject=2, embed="whole")
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "m.ckpt")
    restored = method_from_checkpoint(torch.load(tmp_path / "m.ckpt", weights_only=True))
    assert restored.patches == module.patches
    assert method_from_checkpoint({"hyper_parameters": dict(module.hparams),
                                   "state_dict": module.state_dict()}).patches is None
