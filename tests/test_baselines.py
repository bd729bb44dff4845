"""PCA and contrastive PCA on (high-dimensional) voxels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from neurocl.baselines import ContrastivePCA, PCABaseline, voxel_embeddings
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
