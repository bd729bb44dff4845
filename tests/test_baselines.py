"""PCA, contrastive PCA and the linear two-space baseline on (high-dimensional) voxels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from neurocl.baselines import ContrastivePCA, LinearTwoSpace, PCABaseline, masked_voxels, voxel_embeddings
from neurocl.cohort import Cohort, make_splits
from neurocl.errors import ConfigError

N_FEATURES = 200


def _planted(n_per_group=150, seed=0):
    """Background direction e0 (SD 10) in everyone; target-only direction e1 (SD 5); unit noise."""
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(2 * n_per_group, N_FEATURES))
    data[:, 0] += 10 * rng.normal(size=2 * n_per_group)
    is_target = np.arange(2 * n_per_group) < n_per_group
    data[is_target, 1] += 5 * rng.normal(size=n_per_group)
    return data, is_target


def test_cpca_finds_the_target_only_direction_where_pca_finds_the_background_one():
    data, is_target = _planted()
    pca_axis = PCABaseline(1).fit(data).components_[0]
    cpca = ContrastivePCA(1, random_state=0).fit(data, is_target)
    cpca_axis = cpca.components_[0]
    assert abs(pca_axis[0]) > 0.95 and abs(pca_axis[1]) < 0.1
    assert abs(cpca_axis[1]) > 0.7 and abs(cpca_axis[0]) < 0.1
    # The automatic alpha is one that cancels the shared direction (alpha = 0 would be PCA of the targets).
    scores = cpca.alpha_scores_.set_index("alpha")["held_out_contrast"]
    assert cpca.alpha_ >= 1.0 and scores[cpca.alpha_] > scores[0.0]


def test_pca_matches_sklearn():
    data, _ = _planted(40)
    ours = PCABaseline(3).fit(data)
    reference = PCA(3).fit(data)
    np.testing.assert_allclose(np.abs(ours.components_ @ reference.components_.T), np.eye(3), atol=1e-6)
    np.testing.assert_allclose(ours.explained_variance_, reference.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(np.abs(ours.transform(data)), np.abs(reference.transform(data)), atol=1e-6)


def test_cpca_with_fixed_alpha_matches_the_dense_eigenproblem():
    data, is_target = _planted(30)
    target = data[is_target] - data[is_target].mean(0)
    background = data[~is_target] - data[~is_target].mean(0)
    contrast = target.T @ target / (len(target) - 1) - 2.0 * background.T @ background / (len(background) - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(contrast)
    cpca = ContrastivePCA(2, alpha=2.0).fit(data, is_target)
    np.testing.assert_allclose(cpca.eigenvalues_, eigenvalues[::-1][:2], rtol=1e-8)
    np.testing.assert_allclose(np.abs(cpca.components_ @ eigenvectors[:, ::-1][:, :2]), np.eye(2), atol=1e-6)


def test_cpca_runs_on_more_voxels_than_a_dense_covariance_could_hold():
    rng = np.random.default_rng(1)
    n_voxels = 100_000  # a dense voxel x voxel covariance would take 80 GB
    data = rng.normal(size=(24, n_voxels)).astype(np.float64)
    is_target = np.arange(24) < 12
    data[is_target, 7] += 20 * rng.normal(size=12)
    cpca = ContrastivePCA(2, random_state=0).fit(data, is_target)
    assert cpca.components_.shape == (2, n_voxels)
    assert np.argmax(np.abs(cpca.components_[0])) == 7


def test_bad_inputs_are_clear_errors():
    data, is_target = _planted(10)
    with pytest.raises(ConfigError, match="n_components=50"):
        PCABaseline(50).fit(data[:20])
    with pytest.raises(ConfigError, match="background"):
        ContrastivePCA(2).fit(data, np.ones(len(data), dtype=bool))
    with pytest.raises(ConfigError, match="alpha"):
        ContrastivePCA(2, alpha=-1.0)


@pytest.mark.parametrize("method", ["pca", "cpca"])
def test_voxel_embeddings_of_a_store(tiny_cohort, tiny_store, method):
    cohort, store = Cohort.from_yaml(tiny_cohort), tiny_store
    splits = make_splits(cohort, test_fraction=0.25, val_fraction=0.0, seed=0)
    table = voxel_embeddings(store, cohort, method=method, n_components=4, splits=splits)
    assert list(table.columns) == ["participant_id", "split", "group", "emb_0", "emb_1", "emb_2", "emb_3"]
    assert len(table) == len(cohort) and np.isfinite(table[[f"emb_{i}" for i in range(4)]].to_numpy()).all()
    assert set(table["split"]) == {"train", "test"}
    # Fitted on the train split only: test subjects do not change the embedding of anyone.
    train_only = cohort.select(np.flatnonzero(table["split"] == "train"))
    refit = voxel_embeddings(store, train_only, method=method, n_components=4)
    np.testing.assert_allclose(refit[[f"emb_{i}" for i in range(4)]].to_numpy(),
                               table.loc[table["split"] == "train", [f"emb_{i}" for i in range(4)]].to_numpy(), atol=1e-6)


def test_lin2_salient_recovers_a_target_only_direction_that_pca_misses():
    rng = np.random.default_rng(3)
    n = 120
    data = rng.normal(size=(2 * n, 40))
    data[:, :3] += rng.normal(size=(2 * n, 3)) * [10.0, 8.0, 6.0]  # shared by everyone
    planted = np.zeros(40)
    planted[[5, 6]] = 1 / np.sqrt(2)
    is_target = np.arange(2 * n) < n
    data[is_target] += 4.0 * rng.normal(size=(n, 1)) * planted  # targets only, less variance than any shared one
    pca_axes = PCA(3).fit(data).components_
    assert np.linalg.norm(pca_axes @ planted) < 0.2
    lin2 = LinearTwoSpace(common_dim=3, salient_dim=1, random_state=0).fit(data, is_target)
    assert abs(lin2.salient_.components_[0] @ planted) > 0.95
    # The common space holds the shared directions, not the target-only one.
    assert np.linalg.norm(lin2.common_.components_ @ planted) < 0.2
    assert lin2.transform(data).shape == (2 * n, 4)


def test_lin2_parameters_are_checked_when_fitted():
    data, is_target = _planted(10)
    lin2 = LinearTwoSpace(common_dim=0)
    assert lin2.common_dim == 0  # stored as given
    with pytest.raises(ConfigError, match="common_dim must be >= 1"):
        lin2.fit(data, is_target)


def test_lin2_common_space_is_pca_of_the_training_controls_and_ignores_test_rows(tiny_cohort, tiny_store):
    cohort, store = Cohort.from_yaml(tiny_cohort), tiny_store
    splits = make_splits(cohort, test_fraction=0.25, val_fraction=0.0, seed=0)
    table = voxel_embeddings(store, cohort, method="lin2", splits=splits, common_dim=2, salient_dim=2)
    assert list(table.columns[3:]) == ["common_0", "common_1", "salient_0", "salient_1"]
    voxels = masked_voxels(store, store.rows_for(cohort))
    train_controls = (table["split"].eq("train") & table["group"].eq("background")).to_numpy()
    reference = PCA(2).fit(voxels[train_controls]).transform(voxels)
    np.testing.assert_allclose(np.abs(table[["common_0", "common_1"]].to_numpy()), np.abs(reference), rtol=1e-6, atol=1e-6)
    # Fitted without the test rows (alpha's cross-validation included): refitting on the train rows alone agrees.
    train_only = cohort.select(np.flatnonzero(table["split"] == "train"))
    refit = voxel_embeddings(store, train_only, method="lin2", common_dim=2, salient_dim=2)
    columns = ["common_0", "common_1", "salient_0", "salient_1"]
    np.testing.assert_allclose(refit[columns].to_numpy(), table.loc[table["split"] == "train", columns].to_numpy(), atol=1e-6)
