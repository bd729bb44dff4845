"""Tests for neurocl.harmonise: ComBat against plainly written references, and on cohorts with site effects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neurocl.errors import ConfigError
from neurocl.harmonise import ComBat, HarmoniseConfig
from conftest import brute_force_otsu


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


# ---------------------------------------------------------------- covariate residualisation


def covariate_data(seed: int = 0, n: int = 90, n_features: int = 40):
    """Voxels with age, sex and site effects on everyone, and a patients-only loss on features 0-9.

    Patients are older on average, so their raw difference from controls mixes age and disease.
    """
    rng = np.random.default_rng(seed)
    patient = np.arange(n) % 3 == 0
    age = np.where(patient, rng.uniform(50, 80, n), rng.uniform(20, 80, n))
    sex = rng.integers(0, 2, n).astype(float)
    site = rng.integers(0, 3, n)
    site_onehot = np.stack([site == 1, site == 2], axis=1).astype(float)
    covariates = np.column_stack([age, sex, site_onehot])
    effects = rng.normal(0, [[0.05], [1.0], [1.5], [1.5]], (4, n_features))
    disease = np.zeros(n_features)
    disease[:10] = -2.0
    X = 10 + covariates @ effects + patient[:, None] * disease + rng.normal(0, 0.5, (n, n_features))
    return X, covariates, patient, disease


def test_residualised_training_controls_are_uncorrelated_with_every_removed_covariate():
    from neurocl.harmonise import Residualiser

    X, covariates, patient, _ = covariate_data()
    fit = ~patient & (np.arange(len(X)) < 60)
    residualised = Residualiser().fit(X[fit], covariates[fit]).transform(X, covariates)
    # Independent check: regress the fit subjects' residualised voxels on the covariates again.
    design = np.column_stack([np.ones(fit.sum()), covariates[fit]])
    slopes = np.linalg.lstsq(design, residualised[fit], rcond=None)[0][1:]
    assert np.abs(slopes).max() < 1e-9
    for column in covariates[fit].T:
        correlations = [np.corrcoef(column, voxel)[0, 1] for voxel in residualised[fit].T]
        assert np.abs(correlations).max() < 1e-9
    # The intercept stays: the fit subjects' mean image is unchanged.
    np.testing.assert_allclose(residualised[fit].mean(0), X[fit].mean(0), atol=1e-9)
    raw_correlation = np.corrcoef(covariates[fit, 0], X[fit, 0])[0, 1]
    assert abs(raw_correlation) > 0.3


def test_residualisation_is_not_influenced_by_the_subjects_it_is_not_fitted_on():
    from neurocl.harmonise import Residualiser

    X, covariates, patient, _ = covariate_data()
    fit = ~patient & (np.arange(len(X)) < 60)
    changed = X.copy()
    changed[~fit] = np.random.default_rng(5).normal(0, 100, changed[~fit].shape)
    first = Residualiser().fit(X[fit], covariates[fit])
    second = Residualiser().fit(changed[fit], covariates[fit])
    np.testing.assert_array_equal(first.beta_, second.beta_)
    np.testing.assert_array_equal(first.transform(X[fit], covariates[fit]), second.transform(X[fit], covariates[fit]))
    # The effect removed from a held-out subject is its own covariates' times the training slopes.
    held_out = np.flatnonzero(~fit)[0]
    expected = X[held_out] - (covariates[held_out] - covariates[fit].mean(0)) @ first.beta_
    np.testing.assert_allclose(first.transform(X[held_out:held_out + 1], covariates[held_out:held_out + 1])[0], expected)


def test_a_target_only_effect_survives_residualisation_while_the_age_confound_goes():
    from neurocl.harmonise import Residualiser

    X, covariates, patient, disease = covariate_data(n=300)
    residualised = Residualiser().fit(X[~patient], covariates[~patient]).transform(X, covariates)
    difference = residualised[patient].mean(0) - residualised[~patient].mean(0)
    raw_difference = X[patient].mean(0) - X[~patient].mean(0)
    # Patients are older: before, every feature differs by the age gap times its age slope.
    assert np.abs(raw_difference[10:]).mean() > 0.5
    np.testing.assert_allclose(difference[:10], disease[:10], atol=0.3)
    assert np.abs(difference[10:]).max() < 0.3


def test_residualise_protects_a_covariate_correlated_with_a_removed_one():
    from neurocl.harmonise import Residualiser

    rng = np.random.default_rng(2)
    age = rng.uniform(20, 80, 200)
    site = (age + rng.normal(0, 10, 200) > 50).astype(float)  # older subjects scanned at one site
    X = (0.1 * age + 3.0 * site)[:, None] + rng.normal(0, 0.2, (200, 1))
    kept = Residualiser().fit(X, site[:, None], age[:, None]).transform(X, site[:, None])
    age_slope = np.linalg.lstsq(np.column_stack([np.ones(200), age]), kept, rcond=None)[0][1, 0]
    assert age_slope == pytest.approx(0.1, abs=0.01)


def test_residualise_refuses_collinear_or_too_few_subjects():
    from neurocl.harmonise import Residualiser

    X, covariates, _, _ = covariate_data()
    with pytest.raises(ConfigError, match="collinear"):
        Residualiser().fit(X, np.column_stack([covariates, covariates[:, 0] * 2]))
    with pytest.raises(ConfigError, match="5 design columns .* on 4 subjects"):
        Residualiser().fit(X[:4], covariates[:4])
    with pytest.raises(ConfigError, match="finite"):
        Residualiser().fit(X, np.where(np.arange(len(X)) == 3, np.nan, covariates[:, 0])[:, None])


def test_residualise_config_keeps_each_field_to_its_method():
    from pydantic import ValidationError

    from neurocl.harmonise import HarmoniseConfig

    config = HarmoniseConfig(method="residualise", remove=["age", "site", "head_size"], protect=["sex"])
    assert config.attribute_names() == ["age", "site", "sex"]
    with pytest.raises(ValidationError, match="needs `remove`"):
        HarmoniseConfig(method="residualise")
    with pytest.raises(ValidationError, match="belong to method combat"):
        HarmoniseConfig(method="residualise", remove=["age"], site="scanner")
    with pytest.raises(ValidationError, match="both removed and protected"):
        HarmoniseConfig(method="residualise", remove=["age"], protect=["age"])
    with pytest.raises(ValidationError, match="belongs to method residualise"):
        HarmoniseConfig(remove=["age"])


def test_residualise_names_unknown_missing_and_unfitted_covariates(site_cohort):
    from neurocl.cohort import Cohort
    from neurocl.errors import CohortError
    from neurocl.harmonise import residualise_design

    cohort = Cohort.from_yaml(site_cohort)
    everyone = np.ones(len(cohort), bool)
    with pytest.raises(ConfigError, match="'scanner' is not an attribute"):
        residualise_design(cohort, ["scanner"], [], everyone)
    with pytest.raises(CohortError, match=r"needs \['severity'\] for every subject; missing for sub-"):
        residualise_design(cohort, ["severity"], [], everyone)
    one_site = (cohort.table["site"] != "site-3").to_numpy()
    with pytest.raises(ConfigError, match=r"site \['site-3'\] has no subject among the"):
        residualise_design(cohort, ["site"], [], one_site)
    remove, protect = residualise_design(cohort, ["site", "sex"], ["age"], everyone)
    sites = cohort.table["site"].to_numpy()
    expected = np.column_stack([sites == "site-2", sites == "site-3", cohort.table["sex"] == "M"]).astype(float)
    np.testing.assert_array_equal(remove, expected)
    np.testing.assert_array_equal(protect[:, 0], cohort.table["age"].to_numpy(float))


def test_head_size_proxy_is_the_volume_above_otsu_and_larger_in_the_larger_sex(site_cohort):
    import nibabel as nib

    from neurocl.cohort import Cohort
    from neurocl.harmonise import head_size_proxy

    cohort = Cohort.from_yaml(site_cohort)
    sizes = head_size_proxy(cohort)
    image = nib.load(cohort.image_paths[0])
    voxels = np.asarray(image.dataobj, dtype=np.float64)
    expected = np.count_nonzero(voxels > brute_force_otsu(voxels[::2, ::2, ::2])) * abs(np.linalg.det(image.affine[:3, :3])) / 1000
    assert sizes[0] == pytest.approx(expected, rel=0.05)
    male = (cohort.table["sex"] == "M").to_numpy()
    # The synthetic cohort scales male heads by about +5 % and female by -5 % (volume: about 15 % apart).
    assert sizes[male].mean() > 1.05 * sizes[~male].mean()


def test_residualised_store_removes_age_from_the_training_background_voxels(site_cohort, site_store, tmp_path):
    from neurocl.cohort import Cohort, make_splits
    from neurocl.harmonise import HarmoniseConfig, harmonise_run_store, training_background

    cohort = Cohort.from_yaml(site_cohort)
    splits = make_splits(cohort, seed=0)
    fit = training_background(cohort, splits)
    config = HarmoniseConfig(method="residualise", remove=["age", "sex", "site", "head_size"])
    residualised = harmonise_run_store(site_store, cohort, splits, config, tmp_path / "r")
    assert residualised.volumes.shape == site_store.volumes.shape
    np.testing.assert_array_equal(residualised.mask, site_store.mask)
    assert residualised.record["harmonise"]["method"] == "residualise"
    assert residualised.record["harmonise"]["n_fit"] == int(fit.sum())
    rows = site_store.rows_for(cohort)
    mask = site_store.mask

    def age_correlations(volumes) -> np.ndarray:
        voxels = np.asarray(volumes[rows[fit], 0], dtype=np.float64)[:, mask]
        age = cohort.table["age"].to_numpy(float)[fit]
        centred = voxels - voxels.mean(0)
        return (centred.T @ (age - age.mean())) / (np.linalg.norm(centred, axis=0) * np.linalg.norm(age - age.mean()) + 1e-12)

    before, after = age_correlations(site_store.volumes), age_correlations(residualised.volumes)
    # float16 storage rounds the residuals (about 1e-3 of a z-score), hence not exactly 0.
    assert np.abs(before).max() > 0.5 and np.abs(after).max() < 0.05, (np.abs(before).max(), np.abs(after).max())


def test_a_residualise_section_reads_back_from_its_resolved_dump():
    # config.yaml spells every field (site, empirical_bayes at their defaults): resume and maps read it back.
    section = HarmoniseConfig(method="residualise", remove=["sex", "site"])
    assert HarmoniseConfig.model_validate(section.model_dump(mode="json")) == section
    with pytest.raises(ValueError, match="belong to method combat"):
        HarmoniseConfig(method="residualise", remove=["sex"], site="scanner")
