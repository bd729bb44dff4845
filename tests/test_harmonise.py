"""Tests for neurocl.harmonise: ComBat against plainly written references, and on cohorts with site effects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neurocl.errors import ConfigError
from neurocl.harmonise import ComBat


def site_data(seed: int = 0, n_per_site=(30, 40, 25), n_features: int = 50):
    """Features with an age effect kept, plus site shifts and scales to remove."""
    rng = np.random.default_rng(seed)
    site = np.repeat(["a", "b", "c"], n_per_site)
    age = rng.uniform(20, 80, len(site))
    slope = rng.normal(0, 0.05, n_features)
    shift = {"a": 0.0, "b": 2.0, "c": -1.5}
    scale = {"a": 1.0, "b": 2.5, "c": 0.6}
    noise = rng.normal(0, 1, (len(site), n_features))
    X = 5 + age[:, None] * slope + np.array([shift[s] for s in site])[:, None] \
        + noise * np.array([scale[s] for s in site])[:, None]
    return X, site, age


def reference_combat(X, site, covariates, empirical_bayes=True):
    """ComBat written feature by feature, with loops, from Johnson et al. (2007)."""
    n, V = X.shape
    sites = sorted(set(site))
    design = np.column_stack([[1.0 if s == k else 0.0 for s in site] for k in sites] + [covariates])
    out = np.empty_like(X)
    coefficients = [np.linalg.solve(design.T @ design, design.T @ X[:, v]) for v in range(V)]
    z = np.empty_like(X)
    alpha, sigma, cov_part = np.empty(V), np.empty(V), np.empty((n, V))
    for v in range(V):
        b = coefficients[v]
        alpha[v] = sum(b[k] * sum(1 for s in site if s == name) / n for k, name in enumerate(sites))
        residual = X[:, v] - design @ b
        sigma[v] = np.sqrt(np.mean(residual**2))
        cov_part[:, v] = covariates @ b[len(sites):]
        z[:, v] = (X[:, v] - alpha[v] - cov_part[:, v]) / sigma[v]
    for name in sites:
        rows = [i for i in range(n) if site[i] == name]
        g_hat = np.array([np.mean(z[rows, v]) for v in range(V)])
        d_hat = np.array([np.var(z[rows, v], ddof=1) for v in range(V)])
        g, d = g_hat.copy(), d_hat.copy()
        if empirical_bayes:
            g_bar, t2 = np.mean(g_hat), np.var(g_hat, ddof=1)
            m, s2 = np.mean(d_hat), np.var(d_hat, ddof=1)
            a, b = (2 * s2 + m * m) / s2, (m * s2 + m**3) / s2
            for v in range(V):
                gv, dv = g_hat[v], d_hat[v]
                for _ in range(1000):
                    g_new = (len(rows) * t2 * g_hat[v] + dv * g_bar) / (len(rows) * t2 + dv)
                    d_new = (b + 0.5 * sum((z[i, v] - g_new) ** 2 for i in rows)) / (len(rows) / 2 + a - 1)
                    done = abs(g_new - gv) / abs(gv) < 1e-8 and abs(d_new - dv) / abs(dv) < 1e-8
                    gv, dv = g_new, d_new
                    if done:
                        break
                g[v], d[v] = gv, dv
        for i in rows:
            for v in range(V):
                out[i, v] = (z[i, v] - g[v]) / np.sqrt(d[v]) * sigma[v] + alpha[v] + cov_part[i, v]
    return out


@pytest.mark.parametrize("empirical_bayes", [True, False])
def test_combat_matches_a_feature_by_feature_reference(empirical_bayes):
    X, site, age = site_data(n_features=12)
    ours = ComBat(empirical_bayes).fit_transform(X, site, age[:, None])
    # Ours stops at a relative change of 1e-4 (as neuroCombat does), the reference at 1e-8.
    np.testing.assert_allclose(ours, reference_combat(X, site, age[:, None], empirical_bayes), rtol=1e-4, atol=1e-4)


def test_combat_matches_neurocombat_when_fitted_on_everyone():
    neurocombat = pytest.importorskip("neuroCombat")
    X, site, age = site_data()
    covars = pd.DataFrame({"site": site, "age": age})
    theirs = neurocombat.neuroCombat(X.T, covars, "site", continuous_cols=["age"])["data"].T
    np.testing.assert_allclose(ComBat().fit_transform(X, site, age[:, None]), theirs, rtol=1e-3, atol=1e-3)


def test_fitted_on_some_subjects_it_removes_the_site_effect_of_the_others_and_keeps_age():
    X, site, age = site_data(n_per_site=(60, 60, 60), n_features=30)
    fit = np.arange(len(X)) % 2 == 0
    harmonised = ComBat().fit(X[fit], site[fit], age[fit, None]).transform(X[~fit], site[~fit], age[~fit, None])
    held_out_site = site[~fit]
    means = np.stack([harmonised[held_out_site == s].mean(axis=0) for s in "abc"])
    stds = np.stack([harmonised[held_out_site == s].std(axis=0) for s in "abc"])
    raw_means = np.stack([X[~fit][held_out_site == s].mean(axis=0) for s in "abc"])
    # Site shifts of up to 3.5 remain only as the sampling noise of 30-subject means (SE about 0.2-0.5).
    assert np.ptp(raw_means, axis=0).mean() > 3 and np.ptp(means, axis=0).mean() < 1.0
    assert np.ptp(stds, axis=0).mean() < 0.5
    # The age slope survives: regress each harmonised feature on age within the held-out subjects.
    design = np.column_stack([np.ones((~fit).sum()), age[~fit]])
    slopes = np.linalg.lstsq(design, harmonised, rcond=None)[0][1]
    true_slopes = np.linalg.lstsq(np.column_stack([np.ones(len(X)), age, site == "b", site == "c"]), X, rcond=None)[0][1]
    assert np.corrcoef(slopes, true_slopes)[0, 1] > 0.9


def test_unseen_sites_and_degenerate_designs_are_refused_by_name():
    X, site, age = site_data()
    with pytest.raises(ConfigError, match=r"not fitted on site\(s\) \['d'\]"):
        ComBat().fit(X, site).transform(X[:2], ["a", "d"])
    with pytest.raises(ConfigError, match="at least 2 sites"):
        ComBat().fit(X[:10], site[:10])
    with pytest.raises(ConfigError, match="collinear"):
        ComBat().fit(X, site, (site == "a").astype(float)[:, None])


# ---------------------------------------------------------------- a synthetic cohort with strong site effects


@pytest.fixture(scope="module")
def site_cohort(tmp_path_factory):
    from neurocl.synth import SynthConfig, make_synthetic_cohort

    config = SynthConfig(n_subjects=60, subtypes=2, sites=3, resolution=8.0, site_effect=5.0, seed=1)
    return make_synthetic_cohort(tmp_path_factory.mktemp("sites") / "cohort", config, workers=1)


@pytest.fixture(scope="module")
def site_store(site_cohort, tmp_path_factory):
    from neurocl.cohort import Cohort
    from neurocl.store import VolumeStore

    return VolumeStore.build(Cohort.from_yaml(site_cohort), tmp_path_factory.mktemp("store"), workers=1, progress=False)


def site_accuracy(embedding: np.ndarray, site: np.ndarray) -> float:
    """Balanced accuracy of site from an embedding, 5-fold logistic regression (independent of neurocl's probes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    predicted = cross_val_predict(LogisticRegression(max_iter=5000), embedding, site, cv=folds)
    return balanced_accuracy_score(site, predicted)


def test_site_leaves_the_voxel_space_after_combat_but_not_after_pca(site_cohort, site_store):
    from neurocl.baselines import voxel_embeddings
    from neurocl.cohort import Cohort

    cohort = Cohort.from_yaml(site_cohort)
    site = cohort.table["site"].to_numpy()
    pca = voxel_embeddings(site_store, cohort, "pca", n_components=8).filter(like="emb_").to_numpy()
    combat = voxel_embeddings(site_store, cohort, "combat", n_components=8, protect=["age", "sex"])
    combat = combat.filter(like="emb_").to_numpy()
    before, after = site_accuracy(pca, site), site_accuracy(combat, site)
    # Chance is 1/3. ComBat removes each voxel's site mean and variance; the synthetic sites also
    # differ in smoothness and noise texture (spatial covariance), which it cannot undo, so site
    # stays somewhat decodable (measured 1.00 -> 0.67 at seed 1).
    assert before > 0.9 and after < 0.8, (before, after)


def test_harmonised_store_is_fitted_on_training_background_and_keeps_grid_mask_and_keys(site_cohort, site_store, tmp_path):
    from neurocl.cohort import Cohort, make_splits
    from neurocl.harmonise import HarmoniseConfig, harmonise_run_store, training_background

    cohort = Cohort.from_yaml(site_cohort)
    splits = make_splits(cohort, seed=0)
    fit = training_background(cohort, splits)
    train = np.zeros(len(cohort), bool)
    train[splits.rows(cohort, "train")] = True
    assert fit.sum() > 10 and np.array_equal(fit, train & (cohort.table["group"] == "background").to_numpy())
    harmonised = harmonise_run_store(site_store, cohort, splits, HarmoniseConfig(protect=["age"]), tmp_path / "h")
    assert harmonised.volumes.shape == site_store.volumes.shape
    np.testing.assert_array_equal(harmonised.mask, site_store.mask)
    np.testing.assert_array_equal(harmonised.affine, site_store.affine)
    pd.testing.assert_frame_equal(harmonised.manifest, site_store.manifest)
    assert harmonised.record["harmonise"]["n_fit"] == int(fit.sum())
    assert not np.any(np.asarray(harmonised.volumes[:, 0])[:, ~harmonised.mask])
    # Fitted on 1/3 of the subjects (training background), it still takes site out of everyone's voxels.
    from neurocl.baselines import PCABaseline

    site = cohort.table["site"].to_numpy()

    def site_from_pca(volumes):
        voxels = np.asarray(volumes[:, 0], dtype=np.float64)[:, site_store.mask]
        return site_accuracy(PCABaseline(8).fit_transform(voxels), site)

    before, after = site_from_pca(site_store.volumes), site_from_pca(harmonised.volumes)
    assert before > 0.9 and after < 0.8, (before, after)


def test_harmonise_needs_every_subjects_site_and_covariates(site_cohort):
    from neurocl.cohort import Cohort
    from neurocl.errors import CohortError
    from neurocl.harmonise import cohort_design

    cohort = Cohort.from_yaml(site_cohort)
    with pytest.raises(CohortError, match="harmonise needs \\['site', 'severity'\\] for every subject; missing for sub-"):
        cohort_design(cohort, "site", ["severity"])  # severity is patients-only
    with pytest.raises(ConfigError, match="'scanner' is not an attribute"):
        cohort_design(cohort, "scanner", [])
