"""Site and covariate harmonisation: ComBat or covariate residualisation, fitted on training
background subjects, applied to everyone.

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

Residualisation (``method: residualise``; e.g. Dukart et al., 2011,
https://doi.org/10.1371/journal.pone.0017904) fits, per feature v, the ordinary least squares

    x_iv = b0_v + r_i . beta_v + p_i . theta_v + e_iv

on the fit subjects, with r_i the covariates to remove (continuous as is, categorical one-hot
against their first category) and p_i the protected ones, and returns
x*_iv = x_iv - (r_i - r_bar) . beta_v for everyone, r_bar the fit subjects' mean of r: the
intercept and the fit subjects' mean stay, the covariates' linear effect goes, and a protected
covariate's effect is kept even where it correlates with a removed one. ``head_size`` may be
removed without being an attribute: :func:`head_size_proxy` measures it on each image.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from neurocl.errors import CohortError, ConfigError
from neurocl.io import atomic_path, write_json, write_tsv
from neurocl.images import read_grid, read_voxels
from neurocl.store import VolumeStore
from neurocl.store.preprocess import otsu_threshold

if TYPE_CHECKING:
    from neurocl.cohort import Cohort

CONVERGENCE = 1e-4
MAX_ITERATIONS = 1000
# The covariate residualisation can remove without the cohort having it (head_size_proxy).
HEAD_SIZE = "head_size"


class HarmoniseConfig(BaseModel):
    """The pipeline's ``harmonise`` section: ComBat or covariate residualisation of the store's
    voxels, after the splits."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["combat", "residualise"] = Field(
        "combat", description="`combat`: empirical-Bayes ComBat of `site`; `residualise`: voxel-wise linear "
        "regression of the `remove` covariates (neurocl/harmonise.py)."
    )
    site: str = Field("site", description="`combat`: categorical attribute holding the acquisition site.")
    protect: list[str] = Field(
        default_factory=list, description="Attributes whose effects are kept (e.g. [age, sex]); none may be missing."
    )
    empirical_bayes: bool = Field(
        True, description="`combat`: shrink the site effects towards their priors (false: plain L/S)."
    )
    remove: list[str] = Field(
        default_factory=list, description="`residualise`: attributes whose linear effect is removed (e.g. [age, sex, "
        "site, head_size]; categorical one-hot against the first category); `head_size` is measured on each image "
        "unless the cohort has that attribute ([data.md](data.md)); none may be missing."
    )

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> "HarmoniseConfig":
        if self.method == "residualise":
            # Set to something other than their defaults: a resolved config.yaml (or a --set merged
            # into one) spells every field, and those must read back.
            foreign = sorted(name for name in {"site", "empirical_bayes"} & self.model_fields_set
                             if getattr(self, name) != type(self).model_fields[name].default)
            if foreign:
                raise ValueError(f"{foreign} belong to method combat; residualise removes the `remove` covariates "
                                 "(list the site there)")
            if not self.remove:
                raise ValueError("method residualise needs `remove`: the covariates to regress out")
            both = sorted(set(self.remove) & set(self.protect))
            if both:
                raise ValueError(f"{both} are both removed and protected")
        elif self.remove:
            raise ValueError("`remove` belongs to method residualise (combat removes `site`)")
        return self

    def attribute_names(self) -> list[str]:
        """The cohort attributes this section names (``head_size`` may be measured instead)."""
        if self.method == "combat":
            return [self.site, *self.protect]
        return [name for name in [*self.remove, *self.protect] if name != HEAD_SIZE]

    def describe(self) -> str:
        if self.method == "combat":
            return f"{self.site} with ComBat (protecting {self.protect})"
        return f"{self.remove} by residualisation (protecting {self.protect})"


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
        raise ConfigError("harmonise: covariates must be finite numbers for every subject")
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


class Residualiser:
    """Covariate residualisation as an estimator (the module docstring's equations).

    Attributes
    ----------
    remove_mean_ : ndarray
        (P,) mean of the removed covariates over the fit subjects (r_bar).
    beta_ : ndarray
        (P, V) fitted effect of each removed covariate column on each feature.
    """

    def fit(self, X, remove, protect=None) -> "Residualiser":
        """Fit on X (n, V) with each subject's covariates to remove (n, P) and to protect (n, Q), as numbers."""
        X = np.asarray(X, dtype=np.float64)
        remove = _covariate_matrix(remove, len(X))
        protect = _covariate_matrix(protect, len(X))
        design = np.column_stack([np.ones(len(X)), remove, protect])
        if len(X) <= design.shape[1] or np.linalg.matrix_rank(design) < design.shape[1]:
            raise ConfigError(
                f"residualise: {design.shape[1]} design columns (intercept and covariates) cannot be fitted on "
                f"{len(X)} subjects: too few subjects, or the covariates are collinear among them (a constant one, "
                "or one that another determines)"
            )
        coefficients = np.linalg.lstsq(design, X, rcond=None)[0]
        self.beta_ = coefficients[1: 1 + remove.shape[1]]
        self.remove_mean_ = remove.mean(axis=0)
        return self

    def transform(self, X, remove) -> np.ndarray:
        """X (n, V) with the removed covariates' fitted effect taken out, relative to the fit subjects' mean."""
        X = np.asarray(X, dtype=np.float64)
        return X - (_covariate_matrix(remove, len(X)) - self.remove_mean_) @ self.beta_

    def fit_transform(self, X, remove, protect=None) -> np.ndarray:
        return self.fit(X, remove, protect).transform(X, remove)


# ---------------------------------------------------------------- cohorts and stores


def cohort_design(cohort: "Cohort", site: str, protect: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's site (str) and protected covariates (continuous as is, categorical one-hot
    without its first category), with one error naming every subject that lacks a value."""
    kinds = cohort.attribute_kinds
    _check_names(cohort, [site, *protect])
    if kinds[site] != "categorical":
        raise ConfigError(f"harmonise: site {site!r} must be a categorical attribute")
    _check_complete(cohort, [site, *protect])
    covariates, _ = covariate_columns(cohort, protect)
    return cohort.table[site].astype(str).to_numpy(), covariates


def _check_names(cohort: "Cohort", names: Sequence[str]) -> None:
    kinds = cohort.attribute_kinds
    for name in names:
        if name not in kinds:
            raise ConfigError(f"harmonise: {name!r} is not an attribute of cohort {cohort.name!r} ({sorted(kinds)})")


def _check_complete(cohort: "Cohort", names: Sequence[str]) -> None:
    """Missing covariates are refused rather than imputed: an imputed value's effect would be
    removed from a subject as if it were measured."""
    table = cohort.table
    missing = table[list(names)].isna().any(axis=1)
    if missing.any():
        ids = table.loc[missing, "participant_id"].astype(str).tolist()
        raise CohortError(
            f"{cohort.source}: harmonise needs {list(names)} for every subject; missing for "
            f"{', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}"
        )


def covariate_columns(cohort: "Cohort", names: Sequence[str],
                      measured: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, list[str]]:
    """(n, P) numbers of ``names`` for every row and each column's label: continuous as is,
    categorical one-hot without its first category (``site=site-2``), ``measured`` values as given."""
    kinds, table = cohort.attribute_kinds, cohort.table
    columns, labels = [], []
    for name in names:
        if measured and name in measured:
            columns.append(np.asarray(measured[name], dtype=float)[:, None])
            labels.append(name)
        elif kinds[name] == "continuous":
            columns.append(table[name].to_numpy(dtype=float)[:, None])
            labels.append(name)
        else:
            categories = cohort.categories[name]
            columns.append(np.stack([(table[name] == c).to_numpy(dtype=float) for c in categories[1:]], axis=1)
                           if len(categories) > 1 else np.empty((len(table), 0)))
            labels.extend(f"{name}={c}" for c in categories[1:])
    matrix = np.concatenate(columns, axis=1) if columns else np.empty((len(table), 0))
    return matrix, labels


def head_size_proxy(cohort: "Cohort") -> np.ndarray:
    """Each row's head size in mL, measured on its own image: the volume of the voxels above the
    image's Otsu threshold (:func:`neurocl.store.preprocess.otsu_threshold`).

    On a T1-weighted image Otsu separates head from background, so this is the head's volume; on
    a tissue map (grey matter) it is that tissue's volume, which also shrinks with atrophy. A
    total intracranial volume from a segmentation is better: give it as an attribute and remove
    that instead.
    """
    sizes = []
    for row, path in zip(cohort.table["participant_id"], cohort.image_paths):
        grid = read_grid(path, cohort.spec.kind, cohort.spec.grid) if path is not None else "no image"
        if isinstance(grid, str):
            raise CohortError(f"{cohort.source}: {row}: head_size needs the image: {grid}")
        voxels = np.asarray(read_voxels(path, cohort.spec.kind), dtype=np.float64)
        affine = np.asarray(grid.affine, dtype=float)
        voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
        sizes.append(float(np.count_nonzero(voxels > otsu_threshold(voxels))) * voxel_ml)
    return np.asarray(sizes)


def residualise_design(cohort: "Cohort", remove: Sequence[str], protect: Sequence[str],
                       fit_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, P) covariates to remove and (n, Q) to protect for every row, checked against the fit rows."""
    measured = {HEAD_SIZE: head_size_proxy(cohort)} if HEAD_SIZE in remove and \
        HEAD_SIZE not in cohort.attribute_kinds else {}
    attributes = [name for name in [*remove, *protect] if name not in measured]
    _check_names(cohort, attributes)
    _check_complete(cohort, attributes)
    for name in attributes:
        if cohort.attribute_kinds[name] == "categorical":
            seen = set(cohort.table[name].astype(str).to_numpy()[fit_rows])
            unseen = [str(c) for c in cohort.categories[name] if str(c) not in seen]
            if unseen:
                raise ConfigError(f"harmonise: {name} {unseen} has no subject among the {int(np.sum(fit_rows))} "
                                  "the residualisation is fitted on (training background), so its effect is unknown")
    return covariate_columns(cohort, remove, measured)[0], covariate_columns(cohort, protect)[0]


def harmonise_voxels(voxels: np.ndarray, cohort: "Cohort", fit_rows: np.ndarray, config: HarmoniseConfig) -> np.ndarray:
    """ComBat or residualisation fitted on ``fit_rows`` of (n, V) voxels (cohort order), applied to every row."""
    if config.method == "residualise":
        remove, protect = residualise_design(cohort, config.remove, config.protect, fit_rows)
        residualiser = Residualiser().fit(voxels[fit_rows], remove[fit_rows], protect[fit_rows])
        return residualiser.transform(voxels, remove)
    site, covariates = cohort_design(cohort, config.site, config.protect)
    combat = ComBat(config.empirical_bayes).fit(voxels[fit_rows], site[fit_rows], covariates[fit_rows])
    return combat.transform(voxels, site, covariates)


def harmonise_store(store: "VolumeStore", cohort: "Cohort", fit_rows: np.ndarray, config: HarmoniseConfig,
                    cache_dir: str | os.PathLike) -> "VolumeStore":
    """A copy of ``store`` (same grid, mask, manifest) with harmonised voxels inside the mask.

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
    """Boolean mask of the cohort rows harmonisation is fitted on: background subjects of the training split."""
    if splits is None or splits.column != "split":
        raise ConfigError("harmonise needs a holdout split (splits.method: holdout) to know the training subjects")
    train = np.zeros(len(cohort), dtype=bool)
    train[splits.rows(cohort, "train")] = True
    return train & (cohort.table["group"] == "background").to_numpy()


def harmonise_run_store(store: "VolumeStore", cohort: "Cohort", splits, config: HarmoniseConfig,
                        cache_dir: str | os.PathLike) -> "VolumeStore":
    """The pipeline's harmonise step: fitted on the training background, applied to every subject."""
    return harmonise_store(store, cohort, training_background(cohort, splits), config, cache_dir)


__all__ = ["ComBat", "HarmoniseConfig", "Residualiser", "cohort_design", "covariate_columns", "harmonise_run_store",
           "harmonise_store", "harmonise_voxels", "head_size_proxy", "residualise_design", "training_background"]
