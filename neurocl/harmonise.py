"""Site harmonisation: ComBat fitted on training background subjects, applied to everyone.

ComBat (Johnson, Li & Rabinovic, 2007, https://doi.org/10.1093/biostatistics/kxj037; for imaging
Fortin et al., 2018, https://doi.org/10.1016/j.neuroimage.2017.11.024) models each feature v
(a voxel inside the brain mask) of subject i at site k as

    x_iv = alpha_v + c_i . beta_v + gamma_kv + sqrt(delta_kv) * eps_iv

with c_i the protected covariates (age, sex, ... kept as they are), gamma_kv / delta_kv the
site's additive / multiplicative effects. Fitting: ordinary least squares of x on [site one-hot,
covariates]; alpha_v = sum_k (n_k / n) * site coefficient (the grand mean); sigma_v^2 = mean_i of
the squared residuals; z_iv = (x_iv - alpha_v - c_i . beta_v) / sigma_v; per site, gamma_hat and
delta_hat (the mean and variance of z over the site's subjects) are shrunk towards their
across-feature priors (normal for gamma with mean gamma_bar_k and variance tau_k^2, inverse gamma
for delta with moments-matched a_k, b_k) by the empirical-Bayes iteration

    gamma*_kv = (n_k tau_k^2 gamma_hat_kv + delta*_kv gamma_bar_k) / (n_k tau_k^2 + delta*_kv)
    delta*_kv = (b_k + sum_i (z_iv - gamma*_kv)^2 / 2) / (n_k / 2 + a_k - 1)

until no value changes by more than 1e-4 (relative). Harmonised:
x*_iv = sigma_v (z_iv - gamma*_kv) / sqrt(delta*_kv) + alpha_v + c_i . beta_v.

Unlike ``neuroCombat`` (whose ``neuroCombatFromTraining`` is marked "under development" and
replaces every new subject's covariate effects by their training mean) the fitted estimator is
applied to any subject of a seen site with its own covariates, which is what fitting on the
training background and applying to everyone needs. ``neuroHarmonize`` was not used: installing
it downgrades numpy and pandas.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from neurocl.errors import CohortError, ConfigError
from neurocl.io import atomic_path, write_json, write_tsv
from neurocl.store import VolumeStore

if TYPE_CHECKING:
    from neurocl.cohort import Cohort

CONVERGENCE = 1e-4
MAX_ITERATIONS = 1000


class HarmoniseConfig(BaseModel):
    """The pipeline's ``harmonise`` section: ComBat on the store's voxels, after the splits."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["combat"] = Field("combat", description="combat: empirical-Bayes ComBat (neurocl/harmonise.py).")
    site: str = Field("site", description="Categorical attribute holding the acquisition site.")
    protect: list[str] = Field(
        default_factory=list, description="Attributes whose effects are kept (e.g. [age, sex]); none may be missing."
    )
    empirical_bayes: bool = Field(True, description="Shrink the site effects towards their priors (false: plain L/S).")


class ComBat:
    """Empirical-Bayes ComBat as an estimator: ``fit`` on some subjects, ``transform`` any subject.

    Parameters
    ----------
    empirical_bayes : bool
        Shrink per-feature site effects towards their across-feature priors (ComBat); ``False``
        uses the raw per-site means and variances (location/scale adjustment).

    Attributes
    ----------
    sites_ : ndarray of str
        Sites seen in ``fit`` (sorted).
    grand_mean_, beta_, sigma_ : ndarray
        (V,), (P, V) and (V,): alpha, covariate coefficients and pooled standard deviation.
    gamma_, delta_ : ndarray
        (K, V): the (shrunk) additive and multiplicative site effects.
    """

    def __init__(self, empirical_bayes: bool = True) -> None:
        self.empirical_bayes = empirical_bayes

    def fit(self, X, site: Sequence, covariates=None) -> "ComBat":
        """Fit on X (n, V) with each subject's site (n,) and protected covariates (n, P) as numbers."""
        X = np.asarray(X, dtype=np.float64)
        site = np.asarray(site).astype(str)
        covariates = _covariate_matrix(covariates, len(X))
        self.sites_, site_index = np.unique(site, return_inverse=True)
        if len(self.sites_) < 2:
            raise ConfigError(f"ComBat needs at least 2 sites among the subjects it is fitted on, got {[str(name) for name in self.sites_]}")
        counts = np.bincount(site_index)
        if counts.min() < 2:
            raise ConfigError(f"ComBat needs at least 2 subjects per site; site {self.sites_[counts.argmin()]!r} has 1")
        design = np.column_stack([np.eye(len(self.sites_))[site_index], covariates])
        if np.linalg.matrix_rank(design) < design.shape[1]:
            raise ConfigError("ComBat: the protected covariates are collinear with the sites (e.g. one site per sex)")
        coefficients = np.linalg.lstsq(design, X, rcond=None)[0]
        site_coefficients, self.beta_ = coefficients[: len(self.sites_)], coefficients[len(self.sites_):]
        self.grand_mean_ = (counts / len(X)) @ site_coefficients
        residuals = X - design @ coefficients
        self.sigma_ = np.sqrt((residuals**2).mean(axis=0))
        z = self._standardise(X, covariates)
        gamma_hat = np.stack([z[site_index == k].mean(axis=0) for k in range(len(self.sites_))])
        delta_hat = np.stack([z[site_index == k].var(axis=0, ddof=1) for k in range(len(self.sites_))])
        if self.empirical_bayes:
            self.gamma_, self.delta_ = _shrink(z, site_index, gamma_hat, delta_hat)
        else:
            self.gamma_, self.delta_ = gamma_hat, delta_hat
        self.delta_ = np.where(self.delta_ > 0, self.delta_, 1.0)  # a constant feature has no scale to undo
        return self

    def transform(self, X, site: Sequence, covariates=None) -> np.ndarray:
        """Harmonised X (n, V); every site must have been seen in ``fit``."""
        X = np.asarray(X, dtype=np.float64)
        site = np.asarray(site).astype(str)
        unseen = sorted(str(name) for name in set(site) - set(self.sites_))
        if unseen:
            raise ConfigError(f"ComBat was not fitted on site(s) {unseen} (fitted: {[str(name) for name in self.sites_]})")
        site_index = np.searchsorted(self.sites_, site)
        covariates = _covariate_matrix(covariates, len(X))
        z = self._standardise(X, covariates)
        adjusted = (z - self.gamma_[site_index]) / np.sqrt(self.delta_[site_index])
        return adjusted * self.sigma_ + self.grand_mean_ + covariates @ self.beta_

    def fit_transform(self, X, site, covariates=None) -> np.ndarray:
        return self.fit(X, site, covariates).transform(X, site, covariates)

    def _standardise(self, X: np.ndarray, covariates: np.ndarray) -> np.ndarray:
        scale = np.where(self.sigma_ > 0, self.sigma_, 1.0)
        return (X - self.grand_mean_ - covariates @ self.beta_) / scale


def _covariate_matrix(covariates, n: int) -> np.ndarray:
    if covariates is None:
        return np.empty((n, 0))
    matrix = np.asarray(covariates, dtype=np.float64).reshape(n, -1)
    if not np.all(np.isfinite(matrix)):
        raise ConfigError("ComBat: protected covariates must be finite numbers for every subject")
    return matrix


def _shrink(z, site_index, gamma_hat, delta_hat) -> tuple[np.ndarray, np.ndarray]:
    """The empirical-Bayes estimates gamma*, delta* of every site (the iteration in the module docstring)."""
    gamma_star, delta_star = np.empty_like(gamma_hat), np.empty_like(delta_hat)
    for k in range(len(gamma_hat)):
        rows = z[site_index == k]
        n_k = len(rows)
        gamma_bar, tau2 = gamma_hat[k].mean(), gamma_hat[k].var(ddof=1)
        mean_delta, var_delta = delta_hat[k].mean(), delta_hat[k].var(ddof=1)
        a = (2 * var_delta + mean_delta**2) / var_delta
        b = (mean_delta * var_delta + mean_delta**3) / var_delta
        gamma, delta = gamma_hat[k].copy(), delta_hat[k].copy()
        for _ in range(MAX_ITERATIONS):
            gamma_new = (n_k * tau2 * gamma_hat[k] + delta * gamma_bar) / (n_k * tau2 + delta)
            sum2 = ((rows - gamma_new) ** 2).sum(axis=0)
            delta_new = (b + sum2 / 2) / (n_k / 2 + a - 1)
            change = max(np.max(np.abs(gamma_new - gamma) / np.maximum(np.abs(gamma), 1e-12)),
                         np.max(np.abs(delta_new - delta) / np.maximum(np.abs(delta), 1e-12)))
            gamma, delta = gamma_new, delta_new
            if change < CONVERGENCE:
                break
        gamma_star[k], delta_star[k] = gamma, delta
    return gamma_star, delta_star


# ---------------------------------------------------------------- cohorts and stores


def cohort_design(cohort: "Cohort", site: str, protect: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's site (str) and protected covariates (continuous as is, categorical one-hot
    without its first category), with one error naming every subject that lacks a value."""
    kinds = cohort.attribute_kinds
    for name in [site, *protect]:
        if name not in kinds:
            raise ConfigError(f"harmonise: {name!r} is not an attribute of cohort {cohort.name!r} ({sorted(kinds)})")
    if kinds[site] != "categorical":
        raise ConfigError(f"harmonise: site {site!r} must be a categorical attribute")
    table = cohort.table
    missing = table[[site, *protect]].isna().any(axis=1)
    if missing.any():
        ids = table.loc[missing, "participant_id"].astype(str).tolist()
        raise CohortError(
            f"{cohort.source}: harmonise needs {[site, *protect]} for every subject; missing for "
            f"{', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}"
        )
    columns = []
    for name in protect:
        if kinds[name] == "continuous":
            columns.append(table[name].to_numpy(dtype=float)[:, None])
        else:
            categories = cohort.categories[name]
            columns.append(np.stack([(table[name] == c).to_numpy(dtype=float) for c in categories[1:]], axis=1)
                           if len(categories) > 1 else np.empty((len(table), 0)))
    covariates = np.concatenate(columns, axis=1) if columns else np.empty((len(table), 0))
    return table[site].astype(str).to_numpy(), covariates


def harmonise_voxels(voxels: np.ndarray, cohort: "Cohort", fit_rows: np.ndarray, config: HarmoniseConfig) -> np.ndarray:
    """ComBat fitted on ``fit_rows`` of (n, V) voxels (cohort order), applied to every row."""
    site, covariates = cohort_design(cohort, config.site, config.protect)
    combat = ComBat(config.empirical_bayes).fit(voxels[fit_rows], site[fit_rows], covariates[fit_rows])
    return combat.transform(voxels, site, covariates)


def harmonise_store(store: "VolumeStore", cohort: "Cohort", fit_rows: np.ndarray, config: HarmoniseConfig,
                    cache_dir: str | os.PathLike) -> "VolumeStore":
    """A copy of ``store`` (same grid, mask, manifest) with ComBat-harmonised voxels inside the mask.

    ``fit_rows`` are cohort rows (the training split's background subjects); every row of the
    store that belongs to ``cohort`` is harmonised. Written like a store build: token-named files
    committed by replacing ``store.json`` atomically.
    """
    rows = store.rows_for(cohort)
    mask = np.asarray(store.mask, dtype=bool)
    voxels = np.stack([np.asarray(store.volumes[row, 0], dtype=np.float64)[mask] for row in rows])
    harmonised = harmonise_voxels(voxels, cohort, fit_rows, config)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    names = {"volumes": f"volumes-{token}.npy", "mask": f"mask-{token}.npy", "manifest": f"manifest-{token}.tsv"}
    with atomic_path(cache_dir / names["volumes"]) as tmp:
        volumes = np.lib.format.open_memmap(tmp, mode="w+", dtype=store.volumes.dtype, shape=store.volumes.shape)
        volumes[:] = store.volumes
        for position, row in enumerate(rows):
            volume = np.zeros(mask.shape, dtype=np.float64)
            volume[mask] = harmonised[position]
            volumes[row, 0] = volume
        volumes.flush()
        del volumes
    with atomic_path(cache_dir / names["mask"]) as tmp:
        np.save(tmp, mask)
    write_tsv(cache_dir / names["manifest"], store.manifest)
    record = {key: value for key, value in store.record.items() if key not in ("resampled", "scales")}
    record.update(names, resampled=None, harmonise={
        **config.model_dump(mode="json"), "source": str(store.cache_dir), "n_fit": int(np.sum(fit_rows))})
    write_json(cache_dir / "store.json", record)
    return VolumeStore(cache_dir)


def training_background(cohort: "Cohort", splits) -> np.ndarray:
    """Boolean mask of the cohort rows ComBat is fitted on: background subjects of the training split."""
    if splits is None or splits.column != "split":
        raise ConfigError("harmonise needs a holdout split (splits.method: holdout) to know the training subjects")
    train = np.zeros(len(cohort), dtype=bool)
    train[splits.rows(cohort, "train")] = True
    return train & (cohort.table["group"] == "background").to_numpy()


def harmonise_run_store(store: "VolumeStore", cohort: "Cohort", splits, config: HarmoniseConfig,
                        cache_dir: str | os.PathLike) -> "VolumeStore":
    """The pipeline's harmonise step: ComBat fitted on the training background, applied to every subject."""
    return harmonise_store(store, cohort, training_background(cohort, splits), config, cache_dir)


__all__ = ["ComBat", "HarmoniseConfig", "cohort_design", "harmonise_run_store", "harmonise_store", "harmonise_voxels",
           "training_background"]
