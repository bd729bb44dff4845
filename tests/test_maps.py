"""Tests for neurocl.maps: attribution maps, regions, subtypes, associations and ground-truth scores."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from scipy import stats
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from neurocl.errors import ConfigError
from neurocl.synthdir import SynthDir
from neurocl.maps import (
    MapsConfig,
    SubtypeClustering,
    one_cluster_test,
    seed_consensus,
    cluster_associations,
    coarse_parcellation,
    fdr_bh,
    gradient_x_input,
    map_auc,
    match_clusters,
    occlusion,
    rank_regions,
)

SHAPE = (12, 12, 12)


class RegionModel(torch.nn.Module):
    """Test fixture: a network whose salient representation reads only the voxels of ``region``.

    salient_rep = W · x[region] (linear, so gradients and occlusion effects have closed forms);
    common_rep reads every voxel, to show that the salient map ignores it.
    """

    def __init__(self, region: np.ndarray, dim: int = 3, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("region", torch.as_tensor(region, dtype=torch.bool))
        self.register_buffer("weights", torch.randn(dim, int(region.sum()), generator=generator))

    def forward(self, x: torch.Tensor) -> dict:
        inside = x[:, 0][:, self.region]
        return {"salient_rep": inside @ self.weights.T, "common_rep": x.flatten(1).mean(1, keepdim=True)}


def octant_atlas(shape=SHAPE) -> np.ndarray:
    """Labels 1..8: the eight octants of the grid."""
    labels = np.zeros(shape, dtype=np.int32)
    half = [s // 2 for s in shape]
    for i, j, k in np.ndindex(2, 2, 2):
        labels[i * half[0] : (i + 1) * half[0], j * half[1] : (j + 1) * half[1], k * half[2] : (k + 1) * half[2]] = (
            1 + i * 4 + j * 2 + k
        )
    return labels


def planted_region() -> np.ndarray:
    """A 3x3x3 cube inside octant 7 (i=1, j=1, k=0)."""
    region = np.zeros(SHAPE, dtype=bool)
    region[7:10, 7:10, 2:5] = True
    return region


def random_volumes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, *SHAPE, generator=torch.Generator().manual_seed(seed)) + 1.0


# ---------------------------------------------------------------------------------------------- attribution


def test_gradient_x_input_matches_the_analytic_gradient_of_a_linear_model():
    region = planted_region()
    model = RegionModel(region)
    volumes = random_volumes(3)
    center = torch.tensor([0.5, -1.0, 2.0])
    baseline = torch.full((1, *SHAPE), 0.25)
    attribution = gradient_x_input(model, volumes, center=center, baseline=baseline).numpy()

    weights = model.weights.numpy().astype(np.float64)
    for n in range(3):
        x = volumes[n, 0].numpy().astype(np.float64)
        offset = weights @ x[region] - center.numpy()
        # d‖Wx_R − c‖/dx_R = Wᵀ(Wx_R − c)/‖Wx_R − c‖, and 0 off the region.
        expected = np.zeros(SHAPE)
        expected[region] = weights.T @ offset / np.linalg.norm(offset)
        expected *= x - 0.25
        np.testing.assert_allclose(attribution[n, 0], expected, rtol=1e-4, atol=1e-6)


def test_gradient_x_input_restores_the_model_training_mode():
    model = RegionModel(planted_region()).train()
    gradient_x_input(model, random_volumes(1))
    assert model.training


def test_gradient_x_input_of_a_region_model_ranks_that_region_first():
    model = RegionModel(planted_region())
    attribution = gradient_x_input(model, random_volumes(4)).mean(0)[0].numpy()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    table = rank_regions(nib.Nifti1Image(attribution, affine), nib.Nifti1Image(octant_atlas(), affine))
    assert table["index"].iloc[0] == 7
    assert table["mean_relevance"].iloc[1] == 0


def test_occlusion_equals_the_representation_shift_of_each_patch():
    region = planted_region()
    model = RegionModel(region)
    volumes = random_volumes(2, seed=1)
    volumes[1, :, :, :6] = 0.0  # patches equal to the (zero) reference are skipped: their effect must still be exact
    effect = occlusion(model, volumes, patch=4, stride=4, batch_size=5).numpy()

    weights = model.weights.numpy().astype(np.float64)
    assert effect.shape == (2, 1, *SHAPE)
    for n in range(2):
        x = volumes[n, 0].numpy().astype(np.float64)
        for corner in np.ndindex(3, 3, 3):
            cube = tuple(slice(4 * c, 4 * c + 4) for c in corner)
            occluded = x.copy()
            occluded[cube] = 0.0
            expected = np.linalg.norm(weights @ (occluded[region] - x[region]))
            np.testing.assert_allclose(effect[n, 0][cube], expected, rtol=1e-4, atol=1e-5)


def test_occlusion_with_overlapping_patches_ranks_the_planted_region_first_like_gradients():
    model = RegionModel(planted_region())
    volumes = random_volumes(2, seed=2)
    baseline = volumes.mean(0)
    effect = occlusion(model, volumes, patch=3, stride=1, baseline=baseline, batch_size=64).mean(0)[0].numpy()
    affine = np.eye(4)
    atlas = nib.Nifti1Image(octant_atlas(), affine)
    by_occlusion = rank_regions(nib.Nifti1Image(effect, affine), atlas)
    by_gradient = rank_regions(
        nib.Nifti1Image(gradient_x_input(model, volumes, baseline=baseline).mean(0)[0].numpy(), affine), atlas
    )
    assert by_occlusion["index"].iloc[0] == by_gradient["index"].iloc[0] == 7
    assert effect[planted_region()].min() > 0


# ---------------------------------------------------------------------------------------------- regions


def test_rank_regions_orders_by_mean_relevance_with_names_and_shares():
    values = np.zeros(SHAPE)
    atlas = octant_atlas()
    values[atlas == 3] = 2.0
    values[atlas == 5] = -5.0  # a negative map value is relevant too (|map|)
    values[(atlas == 1)] = 0.5
    names = pd.DataFrame({"index": np.arange(1, 9), "name": [f"region {k}" for k in range(1, 9)]})
    table = rank_regions(nib.Nifti1Image(values, np.eye(4)), nib.Nifti1Image(atlas, np.eye(4)), names)
    assert table["name"].tolist()[:3] == ["region 5", "region 3", "region 1"]
    assert table["rank"].tolist() == list(range(1, 9))
    np.testing.assert_allclose(table["share"].iloc[:3], [5 / 7.5, 2 / 7.5, 0.5 / 7.5])
    assert (table["n_voxels"] == 216).all()


def test_rank_regions_resamples_an_atlas_on_another_grid():
    values = np.zeros(SHAPE)
    values[planted_region()] = 1.0
    fine_atlas = np.repeat(np.repeat(np.repeat(octant_atlas(), 2, 0), 2, 1), 2, 2)
    fine_affine = np.diag([0.5, 0.5, 0.5, 1.0])
    fine_affine[:3, 3] = -0.25  # voxel centres of the 2x finer grid covering the same field of view
    table = rank_regions(nib.Nifti1Image(values, np.eye(4)), nib.Nifti1Image(fine_atlas, fine_affine))
    assert table["index"].iloc[0] == 7
    assert table["n_voxels"].sum() == np.prod(SHAPE)


def test_rank_regions_names_the_atlas_labels_without_a_name():
    names = pd.DataFrame({"index": [1, 2, 3], "name": ["a", "b", "c"]})
    with pytest.raises(ConfigError, match=r"\[4, 5, 6, 7, 8\]"):
        rank_regions(nib.Nifti1Image(np.ones(SHAPE), np.eye(4)), nib.Nifti1Image(octant_atlas(), np.eye(4)), names)


def test_coarse_parcellation_tiles_the_mask_with_compact_numbered_parcels():
    mask = np.zeros((16, 16, 16), dtype=bool)
    mask[2:14, 3:13, 4:12] = True
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -16.0
    labels, names = coarse_parcellation(mask, affine, n_regions=6, seed=0)
    assert set(np.unique(labels[mask])) == set(range(1, 7))
    assert (labels[~mask] == 0).all()
    assert names["index"].tolist() == list(range(1, 7))
    # Each named centroid is the mean world coordinate of its parcel's voxels; names carry the hemisphere.
    for _, parcel in names.iterrows():
        world = np.argwhere(labels == parcel["index"]) * 2.0 - 16.0
        np.testing.assert_allclose(world.mean(0), parcel[["x", "y", "z"]].to_numpy(float), atol=0.06)
        assert ("left" in parcel["name"]) == (parcel["x"] < 0)
    again, _ = coarse_parcellation(mask, affine, n_regions=6, seed=0)
    np.testing.assert_array_equal(labels, again)


# ---------------------------------------------------------------------------------------------- subtypes


def planted_clusters(k: int = 3, per_cluster: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(k, 5))
    truth = np.repeat(np.arange(k), per_cluster)
    return centres[truth] + rng.normal(size=(len(truth), 5)), truth


@pytest.mark.parametrize("method,criterion", [("kmeans", "silhouette"), ("gmm", "bic")])
def test_subtype_clustering_recovers_planted_clusters_and_their_number(method, criterion):
    X, truth = planted_clusters()
    clustering = SubtypeClustering(k_range=(2, 6), method=method, criterion=criterion, n_bootstrap=10, n_init=3).fit(X)
    assert clustering.n_clusters_ == 3
    assert adjusted_rand_score(truth, clustering.labels_) > 0.9
    assert clustering.scores_["k"].tolist() == [2, 3, 4, 5, 6]
    assert clustering.stability_ > 0.9
    np.testing.assert_array_equal(clustering.predict(X), clustering.labels_)


def test_subtype_clustering_numbers_clusters_by_size_and_is_reproducible():
    X, _ = planted_clusters(k=2, per_cluster=20)
    X = np.vstack([X, X[:20] + np.random.default_rng(1).normal(scale=0.1, size=(20, 5))])
    first = SubtypeClustering(k_range=(2, 3), n_bootstrap=5, random_state=3).fit(X)
    second = SubtypeClustering(k_range=(2, 3), n_bootstrap=5, random_state=3).fit(X)
    sizes = np.bincount(first.labels_)
    assert (np.diff(sizes) <= 0).all()
    np.testing.assert_array_equal(first.labels_, second.labels_)
    assert first.stability_ == second.stability_


def test_subtype_clustering_bootstrap_stability_is_lower_without_structure():
    noise = np.random.default_rng(0).normal(size=(90, 5))
    planted, _ = planted_clusters()
    unstable = SubtypeClustering(k_range=(3, 3), n_bootstrap=20, n_init=3).fit(noise)
    stable = SubtypeClustering(k_range=(3, 3), n_bootstrap=20, n_init=3).fit(planted)
    assert unstable.stability_ < 0.8 < stable.stability_


def test_subtype_clustering_rejects_a_k_range_it_cannot_fit():
    X, _ = planted_clusters(per_cluster=2)
    with pytest.raises(ConfigError, match=r"k_range = \(2, 6\).*\(6\)"):
        SubtypeClustering(k_range=(2, 6)).fit(X)
    with pytest.raises(ConfigError, match="k_max >= 2 with the silhouette"):
        SubtypeClustering(k_range=(1, 1), criterion="silhouette").fit(X)


def test_match_clusters_pairs_each_subtype_with_its_majority_cluster():
    truth = np.array([1, 1, 1, 2, 2, 2, 3, 3])
    clusters = np.array([2, 2, 1, 3, 3, 3, 1, 1])
    assert match_clusters(clusters, truth) == {1: 2, 2: 3, 3: 1}


def test_maps_config_checks_the_k_range():
    with pytest.raises(ValidationError, match="k_min"):
        MapsConfig(k_min=5, k_max=3)
    with pytest.raises(ValidationError, match="silhouette"):
        MapsConfig(k_min=1, k_max=1)
    assert MapsConfig(k_min=1, k_max=1, criterion="bic").k_max == 1
    assert MapsConfig().k_min == 1  # "no subtypes" is a possible answer by default


# ---------------------------------------------------------------------------------------------- "no subtypes"


def test_one_cluster_test_keeps_one_cluster_for_unimodal_data_and_rejects_it_for_planted_clusters():
    rng = np.random.default_rng(0)
    elongated = rng.normal(size=(120, 4)) * [5.0, 1.0, 0.5, 0.5]  # a severity axis, no clusters
    continuum = np.c_[rng.uniform(0, 10, 120), rng.normal(scale=0.5, size=(120, 3))]
    planted, _ = planted_clusters()
    for unimodal in (elongated, continuum):
        assert not one_cluster_test(unimodal, 4, n_reference=19, n_init=2)["reject"]
    result = one_cluster_test(planted, 4, n_reference=19, n_init=2)
    assert result["reject"] and result["p_value"] == pytest.approx(1 / 20)
    assert len(result["gap"]) == 4 and len(result["z"]) == 3


def test_subtype_clustering_says_one_cluster_for_an_elongated_gaussian_where_k_from_2_says_2():
    # The failure this guards against: with k >= 2 only, a severity axis splits into two "subtypes"
    # that a bootstrap calls stable.
    X = np.random.default_rng(1).normal(size=(120, 4)) * [5.0, 1.0, 0.5, 0.5]
    forced = SubtypeClustering(k_range=(2, 4), n_bootstrap=10, n_init=2).fit(X)
    assert forced.n_clusters_ == 2 and forced.stability_ > 0.6  # above the docs' caution line
    free = SubtypeClustering(k_range=(1, 4), n_bootstrap=10, n_init=2, n_reference=19).fit(X)
    assert free.n_clusters_ == 1 and (free.labels_ == 0).all()
    assert np.isnan(free.stability_) and free.scores_["k"].tolist() == [1, 2, 3, 4]
    planted, truth = planted_clusters()
    found = SubtypeClustering(k_range=(1, 4), n_bootstrap=0, n_init=2, n_reference=19).fit(planted)
    assert found.n_clusters_ == 3 and adjusted_rand_score(truth, found.labels_) > 0.9


def test_seed_consensus_scores_agreement_between_partitions():
    a = np.array([0, 0, 0, 1, 1, 1])
    relabelled = np.array([1, 1, 1, 0, 0, 0])
    result = seed_consensus([a, relabelled, a])
    assert result["mean_pairwise_ari"] == pytest.approx(1.0) and result["unanimous_pair_fraction"] == 1.0
    split = np.array([0, 0, 1, 1, 2, 2])
    mixed = seed_consensus([a, split])
    # Of 15 pairs, a joins 6 and split 3; both join (0,1), (4,5) and both separate 15 − 7 = 8: 10 unanimous.
    assert mixed["unanimous_pair_fraction"] == pytest.approx(10 / 15)
    assert mixed["n_clusters"] == [2, 3]
    with pytest.raises(ConfigError, match="same subjects"):
        seed_consensus([a, a[:4]])


# ---------------------------------------------------------------------------------------------- associations


def test_cluster_associations_detect_planted_associations_with_reference_statistics():
    rng = np.random.default_rng(0)
    clusters = np.repeat([1, 2, 3], 40)
    attributes = pd.DataFrame(
        {
            "sex": np.where(rng.random(120) < np.where(clusters == 1, 0.9, 0.2), "F", "M"),
            "site": rng.choice(["a", "b"], size=120),
            "severity": clusters * 1.0 + rng.normal(scale=0.5, size=120),
            "age": rng.normal(50, 10, size=120),
        }
    )
    attributes.loc[[0, 5], "age"] = np.nan
    kinds = {"sex": "categorical", "site": "categorical", "severity": "continuous", "age": "continuous"}
    table = cluster_associations(clusters, attributes, kinds, continuous_test="anova").set_index("attribute")

    observed = pd.crosstab(clusters, attributes["sex"]).to_numpy().astype(float)
    expected = observed.sum(1, keepdims=True) * observed.sum(0, keepdims=True) / observed.sum()
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert table.loc["sex", "statistic"] == pytest.approx(chi2)
    assert table.loc["sex", "effect_size"] == pytest.approx(np.sqrt(chi2 / (120 * 1)))

    severity = attributes["severity"].to_numpy()
    between = sum(40 * (severity[clusters == c].mean() - severity.mean()) ** 2 for c in (1, 2, 3))
    assert table.loc["severity", "effect_size"] == pytest.approx(between / ((severity - severity.mean()) ** 2).sum())
    assert table.loc["age", "n"] == 118

    assert table.loc["sex", "p_fdr"] < 1e-6 and table.loc["severity", "p_fdr"] < 1e-6
    assert table.loc["site", "p_fdr"] > 0.05 and table.loc["age", "p_fdr"] > 0.05
    assert (table["p_fdr"] >= table["p_value"]).all()


def test_cluster_associations_kruskal_effect_size_is_eta_squared_h():
    rng = np.random.default_rng(1)
    clusters = np.repeat([1, 2], 25)
    values = pd.DataFrame({"score": clusters + rng.normal(size=50)})
    row = cluster_associations(clusters, values, {"score": "continuous"}).iloc[0]
    h = stats.kruskal(values["score"][clusters == 1], values["score"][clusters == 2]).statistic
    assert row["test"] == "kruskal_wallis"
    assert row["effect_size"] == pytest.approx((h - 2 + 1) / (50 - 2))


def test_fdr_bh_matches_a_plain_step_up_procedure_and_skips_missing():
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.2, 0.001])
    finite = p[~np.isnan(p)]
    m = len(finite)
    order = np.argsort(finite)
    reference = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):  # step-up: q_(i) = min_{j >= i} p_(j) m / j
        running = min(running, finite[order[rank - 1]] * m / rank)
        reference[order[rank - 1]] = running
    adjusted = fdr_bh(p)
    assert np.isnan(adjusted[2])
    np.testing.assert_allclose(adjusted[~np.isnan(p)], reference)


# ---------------------------------------------------------------------------------------------- ground truth


def test_map_auc_matches_sklearn_with_ties_inside_the_brain_mask():
    rng = np.random.default_rng(0)
    values = np.round(rng.normal(size=SHAPE), 1)  # rounding creates ties
    true_mask = rng.random(SHAPE) < 0.2
    values[true_mask] += 0.8
    brain = np.zeros(SHAPE, dtype=bool)
    brain[1:11, 2:10, 1:11] = True
    expected = roc_auc_score(true_mask[brain], values[brain])
    assert map_auc(values, true_mask, brain) == pytest.approx(expected)
    assert map_auc(values, true_mask) == pytest.approx(roc_auc_score(true_mask.ravel(), values.ravel()))


def test_map_auc_refuses_a_mask_without_positives():
    with pytest.raises(ConfigError, match="0 voxels"):
        map_auc(np.ones(SHAPE), np.zeros(SHAPE, dtype=bool))


def test_evaluate_subtypes_scores_matched_maps_and_references_inside_the_brain_mask():
    from neurocl.maps import evaluate_subtypes

    rng = np.random.default_rng(0)
    brain = np.zeros(SHAPE, dtype=bool)
    brain[2:10, 2:10, 2:10] = True
    true_masks = {1: np.zeros(SHAPE, dtype=bool), 2: np.zeros(SHAPE, dtype=bool)}
    true_masks[1][3:6, 3:6, 3:6] = True
    true_masks[2][6:9, 6:9, 6:9] = True
    noisy = {name: rng.normal(size=SHAPE) for name in ("cluster-1", "cluster-2", "true-subtype-1", "true-subtype-2")}
    noisy["cluster-2"][true_masks[1]] -= 2.0  # cluster 2 holds subtype 1; a negative effect is relevant too
    noisy["true-subtype-2"][true_masks[2]] += 1.0
    anatomy, difference = rng.normal(size=SHAPE), {"true-subtype-1": rng.normal(size=SHAPE)}
    clusters, truth = np.array([2, 2, 2, 1, 1]), np.array([1, 1, 1, 2, 2])

    result = evaluate_subtypes(clusters, truth, true_masks, {"m": noisy}, brain, difference, anatomy)

    def reference(values, subtype):
        return roc_auc_score(true_masks[subtype][brain], np.abs(values)[brain])

    assert result["ari"] == 1.0 and result["matching"] == {"1": 2, "2": 1}
    rows = {row["subtype"]: row for row in result["map_auc"]}
    assert rows[1]["auc_cluster_map"] == pytest.approx(reference(noisy["cluster-2"], 1))
    assert rows[2]["auc_subtype_map"] == pytest.approx(reference(noisy["true-subtype-2"], 2))
    assert rows[1]["n_mask_voxels"] == 27 and result["n_brain_voxels"] == 512
    refs = {row["subtype"]: row for row in result["reference_auc"]}
    assert refs[2]["auc_anatomy_map"] == pytest.approx(reference(anatomy, 2))
    assert refs[1]["auc_difference_map"] == pytest.approx(reference(difference["true-subtype-1"], 1))
    assert refs[2]["auc_difference_map"] is None  # no difference map given for subtype 2


def test_evaluate_subtypes_scores_null_networks_beside_the_trained_one_and_applies_the_relative_pass_line():
    from neurocl.maps import evaluate_subtypes

    shape = (8, 8, 8)
    brain = np.ones(shape, dtype=bool)
    true_mask = np.zeros(shape, dtype=bool)
    true_mask[1:4, 1:4, 1:4] = True
    rng = np.random.default_rng(0)
    good = rng.normal(size=shape) + 3.0 * true_mask
    weak = rng.normal(size=shape) + 0.8 * true_mask  # a null that already finds part of the region
    clusters, truth = np.array([1, 1, 0]), np.array([1, 1, 0])
    maps = {"m": {"cluster-1": good, "true-subtype-1": good}}
    null = {"untrained": {"m": {"cluster-1": weak, "true-subtype-1": weak}}}
    result = evaluate_subtypes(clusters, truth, {1: true_mask}, maps, brain, null_maps=null)

    def reference(values):
        return roc_auc_score(true_mask[brain], np.abs(values)[brain])

    row = result["map_auc"][0]
    assert row["auc_subtype_map_untrained"] == pytest.approx(reference(weak))
    assert row["auc_cluster_map_untrained"] == pytest.approx(reference(weak))
    summary = result["summary"]["m"]
    assert summary["margin_over_untrained"] == pytest.approx(reference(good) - reference(weak))
    assert summary["passes"] == (reference(good) - reference(weak) >= 0.1)
    assert result["null_references"] == ["untrained"]
    # The same map as its own null cannot pass, however high its AUC.
    same = evaluate_subtypes(clusters, truth, {1: true_mask}, maps, brain, null_maps={"untrained": maps})
    assert same["summary"]["m"]["mean_auc_subtype_map"] > 0.9 and not same["summary"]["m"]["passes"]


def test_paired_sign_flip_test_finds_a_planted_difference_and_controls_false_positives():
    from neurocl.maps.significance import paired_sign_flip_test, relevance_shares

    rng = np.random.default_rng(0)
    n, voxels = 20, 400
    null = rng.normal(size=(n, voxels))
    trained = null + rng.normal(size=(n, voxels))
    trained[:, :10] += 2.0  # ten voxels where the trained map is truly higher
    for correction in ("fwe", "fdr"):
        result = paired_sign_flip_test(trained, null, n_permutations=199, correction=correction)
        assert (result["p"][:10] <= 0.05).all(), result["p"][:10]
        assert (result["p"][10:] <= 0.05).sum() <= 3
    assert paired_sign_flip_test(trained, null, n_permutations=199)["p"].min() == pytest.approx(1 / 200)  # FWE
    identical = paired_sign_flip_test(null, null, n_permutations=19)
    assert (identical["t"] == 0).all() and (identical["p"] == 1).all()
    shares = relevance_shares(np.array([[1.0, -3.0], [0.0, 0.0]]))
    np.testing.assert_allclose(shares, [[0.25, 0.75], [0.0, 0.0]])
    with pytest.raises(ConfigError, match="fwe"):
        paired_sign_flip_test(trained, null, correction="bonferroni")


def test_untrained_method_rebuilds_the_initial_weights_and_leaves_the_generators_alone():
    from neurocl.maps.stage import untrained_method
    from neurocl.methods import build_method

    config = {"name": "sepclr", "common_dim": 3, "salient_dim": 2}
    encoder = {"name": "small_cnn", "width": 2}
    torch.manual_seed(7)
    trained = build_method(config, encoder, seed=7)
    initial = {key: value.clone() for key, value in trained.state_dict().items()}
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(1.0)  # "training"
    before = torch.random.get_rng_state()
    fresh = untrained_method(trained)
    assert torch.equal(torch.random.get_rng_state(), before)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, initial[key]), key
    assert not any(torch.equal(a, b) for a, b in zip(fresh.parameters(), trained.parameters()))


# ---------------------------------------------------------------------------------------------- the maps stage


class SubtypeRegionModel(torch.nn.Module):
    """Test fixture: salient_rep[k] = mean intensity inside true subtype k's region (the ideal salient encoder)."""

    def __init__(self, masks: dict[int, np.ndarray]):
        super().__init__()
        stacked = np.stack([masks[k] / masks[k].sum() for k in sorted(masks)]).astype(np.float32)
        self.register_buffer("readout", torch.as_tensor(stacked))

    def forward(self, x: torch.Tensor) -> dict:
        salient = torch.einsum("bxyz,kxyz->bk", x[:, 0], self.readout)
        return {"salient_rep": salient, "common_rep": x.flatten(1).mean(1, keepdim=True)}


@pytest.fixture(scope="module")
def tiny_run(tiny_cohort, tmp_path_factory):
    """The tiny cohort's store, an ideal salient model, and embeddings that plant the true subtypes."""
    from neurocl.cohort import Cohort
    from neurocl.maps import load_ground_truth
    from neurocl.store import PreprocessConfig, VolumeStore

    cohort = Cohort.from_yaml(tiny_cohort)
    store = VolumeStore.build(cohort, tmp_path_factory.mktemp("store"), PreprocessConfig(), workers=1, progress=False)
    truth, masks = load_ground_truth(tiny_cohort.parent, store)
    subtype = cohort.table[["participant_id"]].merge(truth, on="participant_id")["subtype"].to_numpy()
    rng = np.random.default_rng(0)
    salient = 4.0 * np.eye(3)[subtype] + rng.normal(scale=0.3, size=(len(subtype), 3))
    embeddings = pd.DataFrame(
        {
            "participant_id": cohort.table["participant_id"],
            "split": "train",
            "group": np.where(cohort.is_target, "target", "background"),
            **{f"salient_{d}": salient[:, d] for d in range(3)},
        }
    )
    return cohort, store, SubtypeRegionModel(masks), embeddings, masks


def test_analyse_salient_writes_maps_on_the_store_grid_and_recovers_planted_subtypes(tiny_run, tiny_cohort, tmp_path):
    from neurocl.maps import analyse_salient

    cohort, store, model, embeddings, masks = tiny_run
    config = MapsConfig(k_min=2, k_max=3, n_bootstrap=5, n_regions=12, occlusion_stride_mm=16.0,
                        occlusion_max_subjects=3, plots=False)
    result = analyse_salient(model, store, cohort, embeddings, tmp_path, config, ground_truth=tiny_cohort.parent)

    index = pd.read_csv(tmp_path / "index.tsv", sep="\t")
    assert sorted(index["map"]) == sorted(
        f"{method}_{group}" for method in ("gradient_x_input", "occlusion") for group in ("all", "cluster-1", "cluster-2")
    )
    for name in index["map"]:
        image = nib.load(tmp_path / f"{name}.nii.gz")
        assert image.shape == store.spatial_shape
        np.testing.assert_allclose(image.affine, store.affine)
        assert (np.asarray(image.dataobj)[~store.mask] == 0).all()
        assert (tmp_path / f"regions_{name}.tsv").is_file()

    clusters = pd.read_csv(tmp_path / "clusters.tsv", sep="\t")
    assert len(clusters) == int(cohort.is_target.sum()) and set(clusters["cluster"]) == {1, 2}
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert result["n_clusters"] == 2 and evaluation["ari"] == 1.0
    for row in evaluation["map_auc"]:
        assert row["auc_cluster_map"] > 0.9, row
    subtypes = json.loads((tmp_path / "subtypes.json").read_text())
    assert [row["k"] for row in subtypes["scores"]] == [2, 3]
    associations = pd.read_csv(tmp_path / "associations.tsv", sep="\t")
    assert set(associations["attribute"]) == set(cohort.attribute_kinds)


def test_analyse_salient_scores_a_null_network_and_writes_voxelwise_significance_against_it(tiny_run, tiny_cohort, tmp_path):
    from neurocl.maps import analyse_salient

    cohort, store, model, embeddings, masks = tiny_run
    # A network that learned nothing about the subtypes: it reads the mean over the whole volume.
    uniform = {k: np.ones_like(mask) for k, mask in masks.items()}
    config = MapsConfig(k_min=2, k_max=2, n_bootstrap=0, methods=["gradient_x_input"], plots=False, n_regions=4,
                        significance="fwe", n_permutations=99)
    result = analyse_salient(model, store, cohort, embeddings, tmp_path, config, ground_truth=tiny_cohort.parent,
                             null_models={"untrained": SubtypeRegionModel(uniform)})
    summary = result["evaluation"]["summary"]["gradient_x_input"]
    assert summary["mean_auc_subtype_map"] > summary["mean_auc_subtype_map_untrained"] + 0.1, summary
    assert summary["passes"] is True
    table = pd.read_csv(tmp_path / "significance.tsv", sep="\t")
    assert table["null"].tolist() == ["untrained"] and table["correction"].tolist() == ["fwe"]
    image = nib.load(tmp_path / table["nifti"].iloc[0])
    assert image.shape == store.spatial_shape
    minus_log_p = np.asarray(image.dataobj)
    in_regions = np.any([mask for mask in masks.values()], axis=0) & store.mask
    # Every target's relevance sits in its subtype's region for the trained model and spreads for the
    # null, so region voxels of both subtypes reach p <= 0.05 and voxels outside both regions do not.
    assert (minus_log_p[in_regions] > -np.log10(0.05)).mean() > 0.5
    assert (minus_log_p[store.mask & ~in_regions] > -np.log10(0.05)).sum() == 0
    # A rerun without the test removes its files.
    analyse_salient(model, store, cohort, embeddings, tmp_path, config.model_copy(update={"significance": "none"}))
    assert not (tmp_path / "significance.tsv").exists() and not (tmp_path / table["nifti"].iloc[0]).exists()


def test_analyse_salient_ranks_each_subtype_region_first_in_a_user_atlas(tiny_run, tiny_cohort, tmp_path):
    from neurocl.maps import analyse_salient

    cohort, store, model, embeddings, _ = tiny_run
    # An atlas on the source (uncropped) grid: label k = subtype k's true region; the store grid is cropped.
    source_masks = [nib.load(SynthDir(tiny_cohort.parent).subtype_mask(k)) for k in (1, 2)]
    labels = np.zeros(source_masks[0].shape, dtype=np.int16)
    for k, mask in enumerate(source_masks, start=1):
        labels[np.asarray(mask.dataobj) > 0] = k
    nib.save(nib.Nifti1Image(labels, source_masks[0].affine), tmp_path / "atlas.nii.gz")
    pd.DataFrame({"index": [1, 2], "name": ["region one", "region two"]}).to_csv(
        tmp_path / "atlas.tsv", sep="\t", index=False
    )
    config = MapsConfig(k_min=2, k_max=2, n_bootstrap=0, methods=["gradient_x_input"], plots=False,
                        atlas=tmp_path / "atlas.nii.gz")
    result = analyse_salient(model, store, cohort, embeddings, tmp_path / "maps", config, ground_truth=tiny_cohort.parent)
    for subtype, name in ((1, "region one"), (2, "region two")):
        cluster = result["evaluation"]["matching"][str(subtype)]
        regions = pd.read_csv(tmp_path / "maps" / f"regions_gradient_x_input_cluster-{cluster}.tsv", sep="\t")
        assert regions["name"].iloc[0] == name


def test_analyse_salient_rerun_removes_the_maps_of_clusters_that_no_longer_exist(tiny_run, tmp_path):
    from neurocl.maps import analyse_salient

    cohort, store, model, embeddings, _ = tiny_run
    (tmp_path / "notes.txt").write_text("a user's file")
    for k in (3, 2):
        config = MapsConfig(k_min=k, k_max=k, n_bootstrap=0, methods=["gradient_x_input"], plots=False, n_regions=4)
        analyse_salient(model, store, cohort, embeddings, tmp_path, config)
    written = {path.name for path in tmp_path.iterdir()}
    assert "gradient_x_input_cluster-2.nii.gz" in written and "notes.txt" in written
    assert not any("cluster-3" in name for name in written)
    assert "evaluation.json" not in written  # no ground truth given


def test_analyse_salient_names_a_missing_atlas_names_table(tiny_run, tmp_path):
    from neurocl.maps import analyse_salient

    cohort, store, model, embeddings, _ = tiny_run
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), dtype=np.int16), np.eye(4)), tmp_path / "atlas.nii.gz")
    config = MapsConfig(k_min=2, k_max=2, n_bootstrap=0, methods=["gradient_x_input"], plots=False,
                        atlas=tmp_path / "atlas.nii.gz")
    with pytest.raises(ConfigError, match="atlas.tsv"):
        analyse_salient(model, store, cohort, embeddings, tmp_path / "maps", config)
    assert not (tmp_path / "maps").exists()


def test_analyse_salient_refuses_embeddings_without_a_salient_space(tiny_run, tmp_path):
    from neurocl.maps import analyse_salient

    cohort, store, model, embeddings, _ = tiny_run
    single_space = embeddings.rename(columns=lambda c: c.replace("salient_", "emb_"))
    with pytest.raises(ConfigError, match="no salient_\\* columns"):
        analyse_salient(model, store, cohort, single_space, tmp_path, MapsConfig(plots=False))


def test_read_atlas_names_reports_the_file_line_and_bad_index(tmp_path):
    from neurocl.maps import read_atlas_names

    path = tmp_path / "names.tsv"
    path.write_text("index\tname\n1\thippocampus\ntwo\tamygdala\n")
    with pytest.raises(ConfigError, match=r"names.tsv, line 3: index 'two'"):
        read_atlas_names(path)
    path.write_text("index\tname\n1\thippocampus\n1\tamygdala\n")
    with pytest.raises(ConfigError, match="index 1 appears more than once"):
        read_atlas_names(path)


# ---------------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def trained_run(tiny_cohort, tmp_path_factory):
    """A real run of the tiny cohort: SepCLR trained for one epoch by ``run_pipeline``, maps stage on.

    The store is not cropped, so its grid is the cohort's own grid.
    """
    import yaml

    from neurocl.pipeline import run_pipeline

    folder = tmp_path_factory.mktemp("trained_run")
    pipeline = {
        "name": "tiny-maps",
        "cohort": str(tiny_cohort),
        "preprocess": {"crop_to_mask": False},
        "method": {"name": "sepclr", "common_dim": 4, "salient_dim": 4},
        "encoder": {"name": "small_cnn", "width": 4},
        "training": {"epochs": 1, "batch_size": 16, "accelerator": "cpu", "precision": "32-true", "seed": 0},
        # No probes: this run only has to exist for the maps stage.
        "evaluation": {"attributes": [], "probe": {"n_splits": 2, "n_permutations": 0, "n_bootstrap": 0}},
        "maps": {"enabled": True, "k_min": 2, "k_max": 2, "n_bootstrap": 3, "occlusion_max_subjects": 1,
                 "occlusion_patch_mm": 32.0, "occlusion_stride_mm": 32.0, "n_regions": 8},
        "outputs": {"report": False},
    }
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    return run_pipeline(folder / "pipeline.yaml", folder / "run")


def test_the_maps_stage_of_a_run_writes_maps_on_the_cohort_grid_with_plots_and_subtypes(trained_run, tiny_cohort):
    from neurocl.cohort import Cohort

    cohort = Cohort.from_yaml(tiny_cohort)
    shape, affine, _ = cohort.reference_grid()
    maps_dir = trained_run / "maps"
    subtypes = json.loads((maps_dir / "subtypes.json").read_text())
    k = subtypes["n_clusters"]
    assert k == 2 and sum(subtypes["cluster_sizes"].values()) == int(cohort.is_target.sum())

    index = pd.read_csv(maps_dir / "index.tsv", sep="\t")
    groups = ["all"] + [f"cluster-{c}" for c in range(1, k + 1)]
    assert sorted(index["map"]) == sorted(f"{m}_{g}" for m in ("gradient_x_input", "occlusion") for g in groups)
    for row in index.itertuples():
        image = nib.load(maps_dir / row.nifti)
        assert image.shape == tuple(shape)
        np.testing.assert_allclose(image.affine, affine, atol=1e-5)
        assert np.isfinite(np.asarray(image.dataobj)).all() and np.abs(np.asarray(image.dataobj)).max() > 0
        assert (maps_dir / row.png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        regions = pd.read_csv(maps_dir / row.regions, sep="\t")
        assert regions["name"].iloc[0] == row.top_region and len(regions) == 8
        assert isinstance(row.peak_region, str) and len(row.peak_mm.split(",")) == 3

    clusters = pd.read_csv(maps_dir / "clusters.tsv", sep="\t")
    targets = cohort.table.loc[cohort.is_target, "participant_id"]
    assert sorted(clusters["participant_id"]) == sorted(targets) and set(clusters["cluster"]) == set(range(1, k + 1))
    evaluation = json.loads((maps_dir / "evaluation.json").read_text())  # strict JSON: no NaN
    assert -1 <= evaluation["ari"] <= 1
    assert {(row["method"], row["subtype"]) for row in evaluation["map_auc"]} == {
        (m, s) for m in ("gradient_x_input", "occlusion") for s in (1, 2)
    }
    for row in evaluation["map_auc"]:
        # Occlusion maps 1 subject per cluster here: a true subtype may have none (null AUC).
        if row["method"] == "gradient_x_input" or row["auc_subtype_map"] is not None:
            assert 0 <= row["auc_subtype_map"] <= 1
    # The model-free difference map finds the planted regions (well above chance, 0.5): the true
    # masks were resampled onto the grid the maps are scored on.
    assert evaluation["reference_summary"]["mean_auc_difference_map"] > 0.7


def test_run_maps_scores_untrained_and_permuted_label_networks_of_a_real_run(trained_run, tmp_path):
    import shutil

    from neurocl.maps import run_maps

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)  # the module's fixture stays as the other tests expect it
    config = MapsConfig(k_min=2, k_max=2, n_bootstrap=0, methods=["gradient_x_input"], plots=False, n_regions=8,
                        null_references=["untrained", "permuted_labels"])
    run_maps(run_dir, config=config, progress=False)
    evaluation = json.loads((run_dir / "maps" / "evaluation.json").read_text())
    assert evaluation["null_references"] == ["permuted_labels", "untrained"]
    for row in evaluation["map_auc"]:
        for null in ("untrained", "permuted_labels"):
            assert 0 <= row[f"auc_subtype_map_{null}"] <= 1
    summary = evaluation["summary"]["gradient_x_input"]
    assert summary["passes"] == (summary["margin_over_untrained"] >= 0.1 and summary["margin_over_permuted_labels"] > 0)
    from neurocl.rundir import RunDir

    maps = RunDir(run_dir).maps
    groups = pd.read_csv(maps.permuted_groups, sep="\t")
    original = pd.read_csv(run_dir / "embeddings.tsv", sep="\t").set_index("participant_id")["group"]
    assert (groups["group"].value_counts() == original.value_counts()).all()  # sizes kept
    assert (groups.set_index("participant_id")["group"] != original).any()  # labels moved
    checkpoint = RunDir(maps.permuted_labels_network).last_checkpoint
    written = checkpoint.stat().st_mtime_ns
    run_maps(run_dir, config=config, progress=False)  # the finished null network is reused
    assert checkpoint.stat().st_mtime_ns == written


# ---------------------------------------------------------------- map figures

# A 4 mm grid in MNI space (the template's field of view), as the demo's store.
MNI_4MM = np.array([[4.0, 0, 0, -90], [0, 4.0, 0, -126], [0, 0, 4.0, -72], [0, 0, 0, 1]])
MNI_4MM_SHAPE = (46, 55, 46)
LESION_MM = (-30.0, -18.0, -18.0)  # left medial temporal, where the demo's cluster-2 lesion is


def _voxel_of(point_mm) -> np.ndarray:
    return np.rint(np.linalg.solve(MNI_4MM, [*point_mm, 1.0])[:3]).astype(int)


def _lesion_map(seed: int = 0) -> tuple[nib.Nifti1Image, np.ndarray]:
    """What a gradient map of a trained model looks like: a focal peak (a 3-voxel-radius ball,
    value 1 at its centre), a broad weak patch (0.15 over a 10-voxel cube in the right frontal
    lobe: the largest area) and speckle of 1/250 of the peak everywhere. Returns the image and
    the ball's voxels."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in MNI_4MM_SHAPE], indexing="ij"), axis=-1)
    distance = np.linalg.norm(grid - _voxel_of(LESION_MM), axis=-1)
    ball = distance <= 3
    data = np.where(ball, 1.0 - distance / 4, 0.0)
    frontal = _voxel_of((30.0, 30.0, 20.0))
    data[tuple(slice(c - 5, c + 5) for c in frontal)] += 0.15
    data += np.random.default_rng(seed).choice([-1, 1], size=data.shape) / 250
    return nib.Nifti1Image(data.astype(np.float32), MNI_4MM), ball


def test_map_figure_cuts_through_the_peak_not_the_largest_area():
    from neurocl.maps.regions import map_figure

    image, _ = _lesion_map()
    figure, shown = map_figure(image, "test")
    np.testing.assert_allclose(shown["cut_mm"], LESION_MM, atol=4.0)  # within one voxel
    assert shown["clusters"][0]["peak_mm"] == shown["cut_mm"]


def test_map_display_shows_the_lesion_and_not_the_speckle():
    from scipy import ndimage

    from neurocl.maps.regions import display_map

    image, ball = _lesion_map()
    shown = display_map(image)
    relative = np.asarray(shown["image"].dataobj)
    visible = np.abs(relative) >= shown["threshold"]
    near_ball = ndimage.binary_dilation(ball, iterations=2)
    assert visible.sum() >= 10 and not (visible & ~near_ball).any()
    assert np.abs(relative).max() == pytest.approx(1.0)
    # The raw map is left as it was: smoothing is for the display only.
    assert np.asarray(image.dataobj).max() == pytest.approx(1.0, abs=0.01)


def test_map_figure_colour_bar_labels_do_not_overlap():
    import matplotlib.pyplot as plt

    from neurocl.maps.regions import map_figure

    figure, _ = map_figure(_lesion_map()[0], "test")
    figure.canvas.draw()
    colour_bars = [axes for axes in figure.axes if axes.get_ylabel() == "fraction of peak"]
    assert len(colour_bars) == 1
    labels = [label for label in colour_bars[0].get_yticklabels() if label.get_text()]
    boxes = sorted((label.get_window_extent() for label in labels), key=lambda box: box.y0)
    assert len(boxes) >= 3
    assert all(lower.y1 <= upper.y0 for lower, upper in zip(boxes, boxes[1:]))
    plt.close(figure)


def test_region_at_names_the_atlas_label_under_a_point():
    from neurocl.maps.regions import region_at

    labels = np.zeros(MNI_4MM_SHAPE, dtype=np.int32)
    lesion = _voxel_of(LESION_MM)
    labels[tuple(slice(c - 1, c + 2) for c in lesion)] = 7
    atlas = nib.Nifti1Image(labels, MNI_4MM)
    names = pd.DataFrame({"index": [7], "name": ["left hippocampus"]})
    assert region_at(atlas, names, LESION_MM) == "left hippocampus"
    assert region_at(atlas, names, (40.0, 30.0, 20.0)) is None
    assert region_at(atlas, names, (500.0, 0.0, 0.0)) is None


def test_one_cluster_test_on_leading_components_finds_two_clusters_at_twenty_subjects_the_full_space_misses():
    from neurocl.validation.subtypes import draw_scenario

    def rejections(scenario, separation, **options):
        return sum(one_cluster_test(draw_scenario(scenario, 20, 16, separation, np.random.default_rng(seed)), 3,
                                    n_reference=19, n_init=2, random_state=seed, **options)["reject"]
                   for seed in range(10))

    full_space = rejections("2 clusters", 6.0, reference="uniform", n_components=16)
    leading = rejections("2 clusters", 6.0, reference="gaussian")
    assert full_space <= 2 and leading >= 7, (full_space, leading)
    # One Gaussian cluster: rejected at about the test's level (0.05), not more.
    assert rejections("one Gaussian", 0.0, reference="gaussian") <= 2


def test_one_cluster_test_refuses_an_unknown_reference_and_reports_the_one_it_used():
    X = np.random.default_rng(0).normal(size=(30, 4))
    with pytest.raises(ConfigError, match="reference = 'poisson'"):
        one_cluster_test(X, 3, reference="poisson")
    result = one_cluster_test(X, 3, n_reference=5, n_init=1, reference="gaussian", n_components=9)
    assert result["reference"].startswith("Gaussian") and result["n_components"] == 4


def test_subtype_test_rates_reports_each_scenarios_rejection_and_correct_k_shares():
    from neurocl.validation.subtypes import subtype_test_rates

    rates = subtype_test_rates(n_values=(20,), dims=(8,), separations=(8.0,), cluster_counts=(2,), replicates=3,
                               k_max=3, n_reference=19, n_init=1, progress=False)
    assert rates["scenario"].tolist() == ["one Gaussian", "elongated Gaussian", "flat continuum", "2 clusters"]
    nulls = rates[rates["true_k"] == 1]
    np.testing.assert_allclose(nulls["correct"], 1 - nulls["rejected"])
    assert rates.loc[rates["true_k"] == 2, "correct"].item() == 1.0  # 8 SDs apart: found every time
