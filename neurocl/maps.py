"""Where the patient-specific patterns are, and whether patients split into subtypes.

Four pieces, each usable on its own (model- and array-level) and chained by
:func:`run_maps` on a finished run directory:

* **Attribution maps** of the salient space: :func:`gradient_x_input` and
  :func:`occlusion` give one voxel map per subject; group maps are their means over
  the target subjects and over each subtype.
* **Regions**: :func:`rank_regions` ranks the parcels of a user atlas (or of
  :func:`coarse_parcellation` of the brain mask) by mean relevance.
* **Subtypes**: :class:`SubtypeClustering` clusters target subjects in salient space
  (k chosen over a range by silhouette or BIC, stability by bootstrap) and
  :func:`cluster_associations` tests clusters against clinical attributes.
* **Ground truth** (synthetic cohorts): :func:`map_auc` scores a map against a true
  mask; :func:`run_maps` matches clusters to true subtypes and reports map AUC and ARI.

See ``docs/maps.md`` for how to read the outputs.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from neurocl.errors import ConfigError
from neurocl.io import atomic_path, read_tsv, save_nifti, write_json, write_tsv

ATTRIBUTION_METHODS = ("gradient_x_input", "occlusion")


class MapsConfig(BaseModel):
    """The ``maps`` section of a pipeline: attribution maps, regions and subtypes.

    The pipeline runs :func:`run_maps` as a stage when ``enabled`` is true; ``neurocl maps RUN``
    runs it on any finished run with the run's section (or these defaults).
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Run the maps stage at the end of `neurocl run`.")
    methods: list[Literal["gradient_x_input", "occlusion"]] = Field(
        default_factory=lambda: list(ATTRIBUTION_METHODS), min_length=1, description="Attribution methods to compute."
    )
    baseline: Literal["background_mean", "zero"] = Field(
        "background_mean",
        description="Reference volume x0: the mean background (control) volume, or zeros. Gradient x input uses "
        "(x - x0); occlusion fills the occluded patch with x0.",
    )
    split: Literal["all", "train", "val", "test"] = Field(
        "all", description="Which rows of embeddings.tsv to analyse (their `split` column)."
    )
    batch_size: PositiveInt = Field(16, description="Volumes (or occluded copies) per forward pass.")
    occlusion_patch_mm: PositiveFloat = Field(16.0, description="Side of the occluded cube, in mm.")
    occlusion_stride_mm: PositiveFloat = Field(8.0, description="Step between occluded cubes, in mm.")
    occlusion_max_subjects: PositiveInt | None = Field(
        48, description="Occlusion uses at most this many target subjects per cluster (seeded draw); None: all."
    )
    k_min: PositiveInt = Field(2, description="Smallest number of subtypes tried.")
    k_max: PositiveInt = Field(6, description="Largest number of subtypes tried.")
    cluster_method: Literal["kmeans", "gmm"] = "kmeans"
    criterion: Literal["silhouette", "bic"] = Field("silhouette", description="How k is chosen over k_min..k_max.")
    n_bootstrap: NonNegativeInt = Field(100, description="Bootstrap resamples for cluster stability (0: skip).")
    continuous_test: Literal["kruskal", "anova"] = "kruskal"
    n_regions: int = Field(48, ge=2, description="Parcels of the coarse parcellation used when no atlas is given.")
    atlas: Path | None = Field(None, description="Atlas labels NIfTI (integer labels, 0 = background).")
    atlas_names: Path | None = Field(None, description="Atlas names TSV (columns index, name).")
    plots: bool = Field(True, description="Write PNG views over the MNI152 template.")
    seed: int = 0

    @model_validator(mode="after")
    def _check_k_range(self) -> "MapsConfig":
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must not exceed k_max ({self.k_max})")
        if self.criterion == "silhouette" and self.k_min < 2:
            raise ValueError(f"k_min = {self.k_min}: the silhouette needs at least 2 clusters (use criterion: bic)")
        return self


# ----------------------------------------------------------------------------------------------------------------
# Attribution


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Use the model in eval mode (BatchNorm running statistics, no dropout), then restore its mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _representation(model: torch.nn.Module, x: torch.Tensor, space: str) -> torch.Tensor:
    key = f"{space}_rep"
    outputs = model(x)
    if key not in outputs:
        raise ConfigError(f"space {space!r}: the model returns {sorted(outputs)}, not {key!r}")
    return outputs[key]


def _reference_like(x: torch.Tensor, baseline: torch.Tensor | None) -> torch.Tensor:
    """The reference volume broadcast to ``x``'s batch: zeros when no baseline is given."""
    if baseline is None:
        return torch.zeros_like(x)
    baseline = baseline.to(device=x.device, dtype=x.dtype)
    if baseline.shape != x.shape[1:]:
        raise ConfigError(f"baseline shape {tuple(baseline.shape)} differs from the volumes' {tuple(x.shape[1:])}")
    return baseline.expand_as(x)


def gradient_x_input(
    model: torch.nn.Module,
    volumes: torch.Tensor,
    space: str = "salient",
    center: torch.Tensor | None = None,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient x input attribution of the distance of each subject's representation to a centre.

    For a subject x with representation r(x) (``model(x)[f"{space}_rep"]``, before the heads),

        f(x) = ‖r(x) − c‖₂,        A(x) = (x − x₀) ⊙ ∂f/∂x,

    with c the centre (e.g. the mean background representation: how far the subject is from
    "typical control" in salient space) and x₀ the reference volume. With x₀ = 0 this is the
    gradient x input of Shrikumar et al. (2016, https://arxiv.org/abs/1605.01713); with x₀ the
    mean control volume, A is the first-order Taylor share of each voxel in f(x) − f(x₀)
    (Ancona et al., 2018, https://arxiv.org/abs/1711.06104): positive where the subject's
    departure from the controls moves it away from the centre.

    Parameters
    ----------
    model : torch.nn.Module
        Returns a dict holding ``f"{space}_rep"`` of shape (B, D); used in eval mode.
    volumes : torch.Tensor
        (B, C, *S) volumes on the model's device.
    space : str
        "salient" or "common".
    center : torch.Tensor, optional
        (D,) centre c; zeros when None.
    baseline : torch.Tensor, optional
        (C, *S) reference volume x₀; zeros when None.

    Returns
    -------
    torch.Tensor
        (B, C, *S) signed attribution, detached.
    """
    x = volumes.detach().clone().requires_grad_(True)
    with _eval_mode(model), torch.enable_grad():
        rep = _representation(model, x, space)
        if center is not None:
            rep = rep - center.to(device=rep.device, dtype=rep.dtype)
        # Each subject's distance depends on its own input only (eval mode), so the gradient of
        # the sum holds every subject's own gradient.
        distance = torch.linalg.vector_norm(rep, dim=1)
        (gradient,) = torch.autograd.grad(distance.sum(), x)
    return ((volumes - _reference_like(volumes, baseline)) * gradient).detach()


def _cube_masks(starts: torch.Tensor, size: Sequence[int], spatial_shape: Sequence[int]) -> torch.Tensor:
    """(L, *S) boolean masks of the cubes with corners ``starts`` (L, D) and side ``size``, built by broadcasting."""
    mask = None
    for dim, (extent, side) in enumerate(zip(spatial_shape, size)):
        axis = torch.arange(extent, device=starts.device)
        begin = starts[:, dim : dim + 1]
        inside = (axis >= begin) & (axis < begin + side)
        view = [starts.shape[0]] + [1] * len(spatial_shape)
        view[dim + 1] = extent
        inside = inside.reshape(view)
        mask = inside if mask is None else mask & inside
    return mask


def occlusion(
    model: torch.nn.Module,
    volumes: torch.Tensor,
    patch: int | Sequence[int],
    stride: int | Sequence[int],
    space: str = "salient",
    baseline: torch.Tensor | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Occlusion sensitivity of each subject's representation (Zeiler & Fergus, 2014).

    The grid patches of the data path (:func:`neurocl.views.extract_patches`, side ``patch``,
    step ``stride``) are replaced one at a time by the reference volume x₀; the effect of patch
    P on subject x is how far its representation moves,

        e(P) = ‖r(x with P ← x₀) − r(x)‖₂,

    and each voxel gets the mean effect of the patches that cover it
    (:func:`neurocl.views.aggregate_patches`). All occluded copies of a volume go through the
    network in batches of ``batch_size``.

    Parameters
    ----------
    model : torch.nn.Module
        Returns a dict holding ``f"{space}_rep"`` (B, D); used in eval mode.
    volumes : torch.Tensor
        (N, C, *S) volumes on the model's device.
    patch, stride : int or sequence of int
        Patch side and step in voxels (one value, or one per spatial axis).
    space : str
        "salient" or "common".
    baseline : torch.Tensor, optional
        (C, *S) reference volume x₀ that fills the occluded patch; zeros when None.
    batch_size : int
        Occluded copies per forward pass.

    Returns
    -------
    torch.Tensor
        (N, 1, *S) non-negative effect map.
    """
    from neurocl.views import aggregate_patches, extract_patches

    spatial_shape = tuple(volumes.shape[2:])
    _, starts, _ = extract_patches(volumes[:1], patch, stride)
    size = _as_sizes(patch, len(spatial_shape))
    reference = _reference_like(volumes[:1], baseline)[0]
    effects = torch.empty(volumes.shape[0], starts.shape[0], device=volumes.device)
    with _eval_mode(model), torch.no_grad():
        for n, volume in enumerate(volumes):
            own = _representation(model, volume[None], space)
            for first in range(0, starts.shape[0], batch_size):
                cubes = _cube_masks(starts[first : first + batch_size].to(volume.device), size, spatial_shape)
                occluded = torch.where(cubes[:, None], reference[None], volume[None])
                moved = _representation(model, occluded, space) - own
                effects[n, first : first + batch_size] = torch.linalg.vector_norm(moved, dim=1)
    return aggregate_patches(effects, starts, size, spatial_shape)


def _as_sizes(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value)


# ----------------------------------------------------------------------------------------------------------------
# Regions


def _as_image(img):
    import nibabel as nib

    return nib.load(str(img)) if isinstance(img, (str, Path)) else img


def coarse_parcellation(
    mask: np.ndarray, affine: np.ndarray, n_regions: int = 48, seed: int = 0
) -> tuple[np.ndarray, pd.DataFrame]:
    """Split a brain mask into ``n_regions`` compact parcels, for region tables without an atlas.

    k-means on the world (mm) coordinates of the mask's voxels gives parcels of similar volume
    and roughly spherical shape; they are numbered by their centroid (x, then y, then z) so the
    numbering does not depend on k-means' label order. Names give the hemisphere (x < 0 is
    left, assuming RAS world coordinates centred on the midline, as in MNI space) and the
    centroid in mm.

    Parameters
    ----------
    mask : np.ndarray
        (*S) boolean brain mask.
    affine : np.ndarray
        (4, 4) voxel-to-world affine of the mask's grid.
    n_regions : int
        Number of parcels (at most the number of mask voxels).
    seed : int
        k-means seed.

    Returns
    -------
    labels : np.ndarray
        (*S) int32, 0 outside the mask, parcels 1..n_regions.
    names : pd.DataFrame
        Columns index, name, x, y, z (centroid in mm).
    """
    from sklearn.cluster import KMeans

    voxels = np.argwhere(mask)
    if n_regions < 1 or n_regions > len(voxels):
        raise ConfigError(f"n_regions = {n_regions}: must be between 1 and the {len(voxels)} voxels of the mask")
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    kmeans = KMeans(n_clusters=n_regions, n_init=4, random_state=seed).fit(world)
    order = np.lexsort(kmeans.cluster_centers_[:, ::-1].T)
    new_label = np.empty(n_regions, dtype=np.int32)
    new_label[order] = np.arange(1, n_regions + 1)
    labels = np.zeros(mask.shape, dtype=np.int32)
    labels[tuple(voxels.T)] = new_label[kmeans.labels_]
    centroids = kmeans.cluster_centers_[order]
    names = pd.DataFrame(
        {
            "index": np.arange(1, n_regions + 1),
            "name": [
                f"parcel-{i:02d} {'left' if x < 0 else 'right'} ({x:+.0f}, {y:+.0f}, {z:+.0f}) mm"
                for i, (x, y, z) in enumerate(centroids, start=1)
            ],
            "x": centroids[:, 0].round(1),
            "y": centroids[:, 1].round(1),
            "z": centroids[:, 2].round(1),
        }
    )
    return labels, names


def read_atlas_names(path: str | Path) -> pd.DataFrame:
    """Read an atlas names TSV (columns ``index`` and ``name``; other columns are kept)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"atlas names {path}: no such file")
    names = read_tsv(path)
    missing = {"index", "name"} - set(names.columns)
    if missing:
        raise ConfigError(f"atlas names {path}: missing column(s) {sorted(missing)} (has {list(names.columns)})")
    bad = names["index"].isna() | (pd.to_numeric(names["index"], errors="coerce") % 1 != 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"atlas names {path}, line {row + 2}: index {names['index'].iloc[row]!r} is not an integer")
    names["index"] = names["index"].astype(int)
    return names


def rank_regions(map_img, atlas_img, names: pd.DataFrame | str | Path | None = None, brain_mask=None) -> pd.DataFrame:
    """Rank the regions of an atlas by the mean relevance of a map inside them.

    Relevance is the absolute value of the map (a signed gradient map counts both directions);
    the atlas is resampled onto the map's grid with nearest-neighbour interpolation when the
    grids differ. Ranking by the mean (not the sum) keeps large regions from winning by size.

    Parameters
    ----------
    map_img : nibabel image or path
        3D map.
    atlas_img : nibabel image or path
        Integer labels, 0 = background.
    names : DataFrame or path, optional
        Columns index, name; every label of the atlas must be named. None: "label-<k>".
    brain_mask : np.ndarray, optional
        (*S) boolean; voxels outside are ignored.

    Returns
    -------
    pd.DataFrame
        rank, index, name, n_voxels, mean_relevance, peak_relevance, share (fraction of the map's
        total relevance inside the region), sorted by mean_relevance, highest first.
    """
    from nilearn.image import resample_to_img

    map_img, atlas_img = _as_image(map_img), _as_image(atlas_img)
    if atlas_img.shape[:3] != map_img.shape[:3] or not np.allclose(atlas_img.affine, map_img.affine):
        atlas_img = resample_to_img(
            atlas_img, map_img, interpolation="nearest", force_resample=True, copy_header=True
        )
    relevance = np.abs(np.asarray(map_img.dataobj, dtype=np.float64))
    labels = np.rint(np.asarray(atlas_img.dataobj)).astype(np.int64)
    inside = labels > 0
    if brain_mask is not None:
        inside &= np.asarray(brain_mask, dtype=bool)
    present = np.unique(labels[inside])
    if names is None:
        names = pd.DataFrame({"index": present, "name": [f"label-{k}" for k in present]})
    elif not isinstance(names, pd.DataFrame):
        names = read_atlas_names(names)
    unnamed = sorted(set(present.tolist()) - set(names["index"].tolist()))
    if unnamed:
        raise ConfigError(f"atlas labels {unnamed[:10]} have no name in the atlas names table")
    counts = np.bincount(labels[inside], minlength=present.max() + 1 if len(present) else 1)
    sums = np.bincount(labels[inside], weights=relevance[inside], minlength=len(counts))
    peaks = np.zeros(len(counts))
    np.maximum.at(peaks, labels[inside], relevance[inside])
    total = relevance[inside].sum()
    table = pd.DataFrame(
        {
            "index": present,
            "n_voxels": counts[present],
            "mean_relevance": sums[present] / counts[present],
            "peak_relevance": peaks[present],
            "share": sums[present] / total if total > 0 else np.nan,
        }
    )
    table = table.merge(names[["index", "name"]], on="index", how="left")
    table = table.sort_values("mean_relevance", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table[["rank", "index", "name", "n_voxels", "mean_relevance", "peak_relevance", "share"]]


# ----------------------------------------------------------------------------------------------------------------
# Subtypes


class SubtypeClustering:
    """Cluster subjects into subtypes, choosing the number of clusters over a range.

    For every k in ``k_range`` the subjects are clustered (k-means or a Gaussian mixture) and
    scored by the silhouette of the partition (Rousseeuw, 1987; higher is better, needs k ≥ 2)
    and the Bayesian information criterion of a Gaussian mixture with k components,
    BIC = −2 log L + p log n (Schwarz, 1978; lower is better, allows k = 1: no subtypes).
    ``criterion`` picks k. Stability (Lange et al., 2004) is the mean adjusted Rand index
    between the full solution and solutions fitted on bootstrap resamples (and applied to
    all subjects): near 1 means the subtypes do not hinge on a few subjects.

    Parameters
    ----------
    k_range : tuple of int
        Inclusive (k_min, k_max).
    method : {"kmeans", "gmm"}
        Clustering algorithm.
    criterion : {"silhouette", "bic"}
        Selection rule for k.
    covariance_type : str
        Gaussian mixture covariance ("diag" suits few subjects in many dimensions).
    n_bootstrap : int
        Bootstrap resamples for stability (0: skip).
    n_init : int
        Restarts of each fit.
    random_state : int
        Seed: same data, same seed, same result.

    Attributes
    ----------
    labels_ : np.ndarray
        (n,) cluster of each subject, 0..k-1, numbered by decreasing size.
    n_clusters_ : int
    scores_ : pd.DataFrame
        k, silhouette, bic for every k tried.
    stability_ : float
        Mean bootstrap ARI (NaN without bootstrap).
    stability_ci_ : tuple of float
        2.5 and 97.5 percentiles of the bootstrap ARI.
    estimator_ : fitted sklearn estimator at the chosen k.
    """

    def __init__(
        self,
        k_range: tuple[int, int] = (2, 6),
        method: str = "kmeans",
        criterion: str = "silhouette",
        covariance_type: str = "diag",
        n_bootstrap: int = 100,
        n_init: int = 10,
        random_state: int = 0,
    ):
        self.k_range = k_range
        self.method = method
        self.criterion = criterion
        self.covariance_type = covariance_type
        self.n_bootstrap = n_bootstrap
        self.n_init = n_init
        self.random_state = random_state

    def _check_params(self, n_samples: int) -> tuple[int, int]:
        if self.method not in ("kmeans", "gmm"):
            raise ConfigError(f"method = {self.method!r}: must be 'kmeans' or 'gmm'")
        if self.criterion not in ("silhouette", "bic"):
            raise ConfigError(f"criterion = {self.criterion!r}: must be 'silhouette' or 'bic'")
        k_min, k_max = (int(k) for k in self.k_range)
        lowest = 2 if self.criterion == "silhouette" else 1
        if not lowest <= k_min <= k_max or k_max >= n_samples:
            raise ConfigError(
                f"k_range = {tuple(self.k_range)}: need {lowest} <= k_min <= k_max < number of subjects ({n_samples})"
            )
        return k_min, k_max

    def _estimator(self, k: int, seed: int):
        from sklearn.cluster import KMeans
        from sklearn.mixture import GaussianMixture

        if self.method == "kmeans":
            return KMeans(n_clusters=k, n_init=self.n_init, random_state=seed)
        return GaussianMixture(k, covariance_type=self.covariance_type, n_init=self.n_init, random_state=seed)

    def fit(self, X, y=None) -> "SubtypeClustering":
        from sklearn.metrics import adjusted_rand_score, silhouette_score
        from sklearn.mixture import GaussianMixture

        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or not np.isfinite(X).all():
            raise ConfigError(f"X: need a finite (subjects, features) array, got shape {X.shape}")
        k_min, k_max = self._check_params(len(X))
        rows, fits = [], {}
        for k in range(k_min, k_max + 1):
            estimator = self._estimator(k, self.random_state).fit(X)
            labels = estimator.predict(X)
            silhouette = silhouette_score(X, labels) if 1 < len(np.unique(labels)) < len(X) else np.nan
            mixture = estimator if self.method == "gmm" else GaussianMixture(
                k, covariance_type=self.covariance_type, n_init=self.n_init, random_state=self.random_state
            ).fit(X)
            rows.append({"k": k, "silhouette": silhouette, "bic": mixture.bic(X)})
            fits[k] = estimator
        self.scores_ = pd.DataFrame(rows)
        if self.criterion == "silhouette":
            best = self.scores_["silhouette"].fillna(-np.inf).idxmax()
        else:
            best = self.scores_["bic"].idxmin()
        self.n_clusters_ = int(self.scores_["k"].iloc[best])
        self.estimator_ = fits[self.n_clusters_]
        raw = self.estimator_.predict(X)
        # Number clusters by decreasing size so cluster 1 in the outputs is the largest subtype.
        sizes = np.bincount(raw, minlength=self.n_clusters_)
        self._relabel = np.empty(self.n_clusters_, dtype=int)
        self._relabel[np.argsort(-sizes, kind="stable")] = np.arange(self.n_clusters_)
        self.labels_ = self._relabel[raw]

        rng = np.random.default_rng(self.random_state)
        aris = []
        for b in range(self.n_bootstrap):
            sample = rng.choice(len(X), size=len(X), replace=True)
            resampled = self._estimator(self.n_clusters_, self.random_state + 1 + b).fit(X[sample])
            aris.append(adjusted_rand_score(self.labels_, resampled.predict(X)))
        self.bootstrap_ari_ = np.asarray(aris)
        self.stability_ = float(np.mean(aris)) if aris else float("nan")
        self.stability_ci_ = tuple(np.percentile(aris, [2.5, 97.5]).tolist()) if aris else (np.nan, np.nan)
        return self

    def predict(self, X) -> np.ndarray:
        """Cluster (0..k-1, same numbering as ``labels_``) of new subjects."""
        return self._relabel[self.estimator_.predict(np.asarray(X, dtype=np.float64))]

    def fit_predict(self, X, y=None) -> np.ndarray:
        return self.fit(X).labels_


def fdr_bh(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN entries stay NaN and are not counted)."""
    from scipy.stats import false_discovery_control

    p_values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p_values, np.nan)
    finite = np.isfinite(p_values)
    if finite.any():
        adjusted[finite] = false_discovery_control(p_values[finite], method="bh")
    return adjusted


def _categorical_association(clusters: np.ndarray, values: pd.Series) -> dict:
    """Chi-square test of independence, effect size Cramér's V = sqrt(χ² / (n (min(r, c) − 1)))."""
    from scipy.stats import chi2_contingency

    table = pd.crosstab(clusters, values.to_numpy())
    n = int(table.to_numpy().sum())
    if min(table.shape) < 2:
        return {"test": "chi2", "statistic": np.nan, "dof": np.nan, "p_value": np.nan, "effect_size": np.nan,
                "effect_measure": "cramers_v", "n": n}
    result = chi2_contingency(table.to_numpy(), correction=False)
    cramers_v = np.sqrt(result.statistic / (n * (min(table.shape) - 1)))
    return {"test": "chi2", "statistic": result.statistic, "dof": result.dof, "p_value": result.pvalue,
            "effect_size": cramers_v, "effect_measure": "cramers_v", "n": n}


def _continuous_association(clusters: np.ndarray, values: pd.Series, test: str) -> dict:
    """Kruskal-Wallis H with η²_H = (H − k + 1)/(n − k), or one-way ANOVA with η² = SS_between / SS_total."""
    from scipy.stats import f_oneway, kruskal

    values = values.to_numpy(dtype=np.float64)
    groups = [values[clusters == c] for c in np.unique(clusters)]
    n, k = len(values), len(groups)
    measure = "eta_squared_h" if test == "kruskal" else "eta_squared"
    name = "kruskal_wallis" if test == "kruskal" else "anova"
    if k < 2 or n <= k or np.ptp(values) == 0:
        return {"test": name, "statistic": np.nan, "dof": np.nan, "p_value": np.nan, "effect_size": np.nan,
                "effect_measure": measure, "n": n}
    if test == "kruskal":
        result = kruskal(*groups)
        effect = (result.statistic - k + 1) / (n - k)
    else:
        result = f_oneway(*groups)
        between = sum(len(g) * (g.mean() - values.mean()) ** 2 for g in groups)
        effect = between / ((values - values.mean()) ** 2).sum()
    return {"test": name, "statistic": result.statistic, "dof": k - 1, "p_value": result.pvalue,
            "effect_size": effect, "effect_measure": measure, "n": n}


def cluster_associations(
    clusters, attributes: pd.DataFrame, kinds: dict[str, str], continuous_test: str = "kruskal"
) -> pd.DataFrame:
    """Test each clinical attribute for differences between clusters, with FDR-corrected p-values.

    Categorical attributes: chi-square test of independence on the cluster x category table,
    effect size Cramér's V. Continuous attributes: Kruskal-Wallis H test (effect size
    η²_H = (H − k + 1)/(n − k), Tomczak & Tomczak 2014) or one-way ANOVA (η² = SS_between/SS_total).
    Subjects with a missing value are left out of that attribute's test only. p-values are
    corrected over all attributes with Benjamini-Hochberg (``p_fdr``).

    Parameters
    ----------
    clusters : array-like
        (n,) cluster of each subject.
    attributes : pd.DataFrame
        (n, A) attribute values, rows aligned with ``clusters``.
    kinds : dict
        Attribute -> "categorical" | "continuous".
    continuous_test : {"kruskal", "anova"}

    Returns
    -------
    pd.DataFrame
        attribute, kind, test, statistic, dof, p_value, p_fdr, effect_size, effect_measure, n.
    """
    if continuous_test not in ("kruskal", "anova"):
        raise ConfigError(f"continuous_test = {continuous_test!r}: must be 'kruskal' or 'anova'")
    clusters = np.asarray(clusters)
    if len(clusters) != len(attributes):
        raise ConfigError(f"clusters has {len(clusters)} subjects but attributes has {len(attributes)} rows")
    rows = []
    for name, kind in kinds.items():
        if kind not in ("categorical", "continuous"):
            raise ConfigError(f"attribute {name!r}: kind {kind!r} must be 'categorical' or 'continuous'")
        if name not in attributes.columns:
            raise ConfigError(f"attribute {name!r}: not a column of the attributes table {list(attributes.columns)}")
        present = attributes[name].notna().to_numpy()
        values = attributes[name][present]
        if kind == "categorical":
            result = _categorical_association(clusters[present], values)
        else:
            result = _continuous_association(clusters[present], values, continuous_test)
        rows.append({"attribute": name, "kind": kind, **result})
    columns = ["attribute", "kind", "test", "statistic", "dof", "p_value", "p_fdr", "effect_size", "effect_measure", "n"]
    table = pd.DataFrame(rows, columns=[c for c in columns if c != "p_fdr"])
    table.insert(columns.index("p_fdr"), "p_fdr", fdr_bh(table["p_value"]) if len(table) else [])
    return table


# ----------------------------------------------------------------------------------------------------------------
# Ground truth


def map_auc(map_values, true_mask, brain_mask=None) -> float:
    """ROC-AUC of a map's voxel values as a detector of a true region.

    AUC = P(v_in > v_out) + ½ P(v_in = v_out) over voxels in and out of the true mask (inside the
    brain mask), computed from ranks as the Mann-Whitney U statistic, U / (n_in · n_out).

    Parameters
    ----------
    map_values : array-like
        (*S) scores (e.g. relevance |map|).
    true_mask : array-like
        (*S) boolean true region.
    brain_mask : array-like, optional
        (*S) boolean; voxels outside are ignored. None: all voxels.

    Returns
    -------
    float
        AUC in [0, 1]; 0.5 is chance.
    """
    from scipy.stats import rankdata

    map_values = np.asarray(map_values, dtype=np.float64)
    true_mask = np.asarray(true_mask, dtype=bool)
    if map_values.shape != true_mask.shape:
        raise ConfigError(f"map shape {map_values.shape} differs from the true mask's {true_mask.shape}")
    inside = np.ones(map_values.shape, dtype=bool) if brain_mask is None else np.asarray(brain_mask, dtype=bool)
    scores, positive = map_values[inside], true_mask[inside]
    n_in, n_out = int(positive.sum()), int((~positive).sum())
    if n_in == 0 or n_out == 0:
        raise ConfigError(f"map_auc: the true mask has {n_in} voxels inside the brain mask and {n_out} outside")
    ranks = rankdata(scores)
    u_statistic = ranks[positive].sum() - n_in * (n_in + 1) / 2
    return float(u_statistic / (n_in * n_out))


def match_clusters(clusters, subtypes) -> dict[int, int]:
    """Map each true subtype to the found cluster that overlaps it most, one-to-one (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    clusters, subtypes = np.asarray(clusters), np.asarray(subtypes)
    found, true = np.unique(clusters), np.unique(subtypes)
    overlap = np.array([[np.sum((subtypes == t) & (clusters == c)) for c in found] for t in true])
    rows, cols = linear_sum_assignment(-overlap)
    return {int(true[r]): int(found[c]) for r, c in zip(rows, cols)}


# ----------------------------------------------------------------------------------------------------------------
# The maps stage of a run


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


class _GroupMeans:
    """Running sums of per-subject maps for overlapping groups (all targets, each cluster, each true subtype)."""

    def __init__(self, spatial_shape: tuple[int, ...]):
        self.spatial_shape = spatial_shape
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, maps: torch.Tensor, memberships: Sequence[Sequence[str]]) -> None:
        values = maps[:, 0].detach().double().cpu().numpy()
        for value, groups in zip(values, memberships):
            for group in groups:
                self.sums.setdefault(group, np.zeros(self.spatial_shape))
                self.sums[group] += value
                self.counts[group] = self.counts.get(group, 0) + 1

    def mean(self, group: str) -> np.ndarray:
        return self.sums[group] / self.counts[group]


@functools.lru_cache(maxsize=1)
def _mni_template():
    from nilearn.datasets import load_mni152_template

    return load_mni152_template(resolution=2)


def plot_map(img, path: str | Path, title: str) -> Path:
    """PNG of a map over the MNI152 template (nilearn ``plot_stat_map``), written atomically.

    Voxels below the 90th percentile of |map| over the map's non-zero voxels are transparent,
    so the figure shows where the map is strongest; cuts go through its peak cluster.
    """
    import matplotlib

    matplotlib.use("Agg")
    from nilearn import plotting

    img = _as_image(img)
    data = np.abs(np.asarray(img.dataobj, dtype=np.float64))
    nonzero = data[data > 0]
    threshold = float(np.percentile(nonzero, 90)) if nonzero.size else None
    display = plotting.plot_stat_map(
        img, bg_img=_mni_template(), title=title, threshold=threshold, display_mode="ortho", draw_cross=False
    )
    with atomic_path(path) as tmp:
        display.savefig(str(tmp), dpi=100)
    display.close()
    return Path(path)


def _salient_columns(embeddings: pd.DataFrame) -> list[str]:
    columns = [column for column in embeddings.columns if column.startswith("salient_")]
    if not columns:
        raise ConfigError(
            "embeddings.tsv has no salient_* columns: maps and subtypes need a two-space method (e.g. SepCLR); "
            f"columns are {list(embeddings.columns)[:8]}"
        )
    return columns


def _key_columns(embeddings: pd.DataFrame, cohort) -> list[str]:
    return [column for column in ("participant_id", "session_id") if column in cohort.table.columns]


def _embedding_rows(embeddings: pd.DataFrame, cohort, config: MapsConfig) -> pd.DataFrame:
    """The analysed rows of embeddings.tsv with their cohort row and store-independent group."""
    keys = _key_columns(embeddings, cohort)
    missing = [column for column in [*keys, "group"] if column not in embeddings.columns]
    if missing:
        raise ConfigError(f"embeddings.tsv: missing column(s) {missing}")
    rows = embeddings.copy()
    if config.split != "all":
        if "split" not in rows.columns:
            raise ConfigError(f"maps.split = {config.split!r} but embeddings.tsv has no split column")
        rows = rows[rows["split"].astype(str) == config.split]
    lookup = cohort.table[keys].astype(str).assign(cohort_row=np.arange(len(cohort.table)))
    rows = rows.astype({key: str for key in keys}).merge(lookup, on=keys, how="left", validate="one_to_one")
    unknown = rows["cohort_row"].isna()
    if unknown.any():
        first = rows.loc[unknown, keys].iloc[0].tolist()
        raise ConfigError(f"embeddings.tsv: {int(unknown.sum())} row(s) not in the cohort, first {first}")
    rows["cohort_row"] = rows["cohort_row"].astype(int)
    return rows.reset_index(drop=True)


def _group_volume_mean(store, indices: np.ndarray, batch_size: int) -> torch.Tensor:
    total = None
    for _, volumes in store.batches(indices, batch_size):
        part = volumes.double().sum(0)
        total = part if total is None else total + part
    return (total / len(indices)).float()


def _group_representation_mean(model, store, indices: np.ndarray, batch_size: int, space: str) -> torch.Tensor:
    reps = []
    with _eval_mode(model), torch.no_grad():
        for _, volumes in store.batches(indices, batch_size):
            reps.append(_representation(model, volumes, space).double())
    return torch.cat(reps).mean(0).float()


def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def _occlusion_subset(clusters: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Positions of the subjects occluded: at most ``limit`` per cluster, drawn with ``seed``."""
    if limit is None:
        return np.arange(len(clusters))
    rng = np.random.default_rng(seed)
    chosen = [
        np.sort(rng.choice(members, size=min(limit, len(members)), replace=False))
        for members in (np.flatnonzero(clusters == c) for c in np.unique(clusters))
    ]
    return np.sort(np.concatenate(chosen))


def load_ground_truth(folder: str | Path, store) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """A synthetic cohort's ``ground_truth.tsv`` and its subtype masks resampled onto the store grid.

    Masks (``masks/subtype-K_mask.nii.gz`` on the source grid) are resampled with
    nearest-neighbour interpolation; a voxel is in subtype K's region when the mask is > 0.
    """
    from nilearn.image import resample_to_img

    folder = Path(folder)
    table = read_tsv(folder / "ground_truth.tsv")
    if "subtype" not in table.columns:
        raise ConfigError(f"{folder / 'ground_truth.tsv'}: no subtype column (has {list(table.columns)})")
    grid = store.to_nifti(np.zeros(store.spatial_shape, dtype=np.float32))
    masks = {}
    for subtype in sorted(int(k) for k in table["subtype"].dropna().unique() if k > 0):
        path = folder / "masks" / f"subtype-{subtype}_mask.nii.gz"
        if not path.is_file():
            raise ConfigError(f"{folder / 'ground_truth.tsv'} has subtype {subtype} but {path} does not exist")
        resampled = resample_to_img(
            _as_image(path), grid, interpolation="nearest", force_resample=True, copy_header=True
        )
        masks[subtype] = np.asarray(resampled.dataobj) > 0
    return table, masks


def _find_ground_truth(cohort) -> Path | None:
    """The synthetic cohort folder (``ground_truth.tsv`` beside the cohort YAML), if there is one."""
    source = Path(str(getattr(cohort, "source", "")))
    if source.suffix in (".yaml", ".yml") and (source.parent / "ground_truth.tsv").is_file():
        return source.parent
    return None


def analyse_salient(
    model: torch.nn.Module,
    store,
    cohort,
    embeddings: pd.DataFrame,
    out_dir: str | Path,
    config: MapsConfig | None = None,
    ground_truth: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Maps, regions, subtypes and (with ground truth) their evaluation, written to ``out_dir``.

    Parameters
    ----------
    model : torch.nn.Module
        Trained two-space network (``forward(x)`` returns ``salient_rep``), on the store's device.
    store : VolumeStore
        The run's preprocessed volumes.
    cohort : Cohort
        The run's cohort (groups and clinical attributes).
    embeddings : pd.DataFrame
        embeddings.tsv (``participant_id``, [``session_id``], ``group``, ``salient_*``, ...).
    out_dir : path
        The maps folder (created).
    config : MapsConfig, optional
    ground_truth : path, optional
        Synthetic cohort folder holding ``ground_truth.tsv`` and ``masks/``.
    progress : bool
        Show progress bars.

    Returns
    -------
    dict
        The content of subtypes.json, plus ``evaluation`` (evaluation.json) when ground truth is given.
    """
    config = config or MapsConfig()
    out_dir = Path(out_dir)
    rows = _embedding_rows(embeddings, cohort, config)
    keys = _key_columns(embeddings, cohort)
    store_index = store.rows_for(cohort)[rows["cohort_row"].to_numpy()]
    is_target = (rows["group"] == "target").to_numpy()
    if is_target.sum() <= config.k_max or (~is_target).sum() == 0:
        raise ConfigError(
            f"maps need more target subjects than k_max ({config.k_max}) and at least one background subject; "
            f"the analysed rows hold {int(is_target.sum())} target and {int((~is_target).sum())} background"
        )
    targets = rows[is_target].reset_index(drop=True)
    target_store = store_index[is_target]

    # Subtypes in salient space.
    clustering = SubtypeClustering(
        k_range=(config.k_min, config.k_max),
        method=config.cluster_method,
        criterion=config.criterion,
        n_bootstrap=config.n_bootstrap,
        random_state=config.seed,
    ).fit(targets[_salient_columns(embeddings)].to_numpy())
    clusters = clustering.labels_ + 1
    write_tsv(out_dir / "clusters.tsv", targets[keys].assign(cluster=clusters))
    subtypes = {
        "space": "salient",
        "method": config.cluster_method,
        "criterion": config.criterion,
        "n_subjects": len(targets),
        "n_clusters": clustering.n_clusters_,
        "cluster_sizes": {str(c): int((clusters == c).sum()) for c in range(1, clustering.n_clusters_ + 1)},
        "scores": clustering.scores_.to_dict(orient="records"),
        "stability": clustering.stability_,
        "stability_ci": list(clustering.stability_ci_),
        "n_bootstrap": config.n_bootstrap,
    }
    kinds = cohort.attribute_kinds
    attributes = cohort.table.loc[targets["cohort_row"].to_numpy(), list(kinds)].reset_index(drop=True)
    write_tsv(
        out_dir / "associations.tsv",
        cluster_associations(clusters, attributes, kinds, continuous_test=config.continuous_test),
    )

    # Ground truth: true subtype of each target, for ARI and per-subtype evaluation maps.
    truth = None
    if ground_truth is not None:
        truth_table, true_masks = load_ground_truth(ground_truth, store)
        truth = targets[["participant_id"]].merge(
            truth_table[["participant_id", "subtype"]].drop_duplicates("participant_id"), on="participant_id", how="left"
        )["subtype"]
        if truth.isna().any():
            raise ConfigError(f"{Path(ground_truth) / 'ground_truth.tsv'}: no subtype for {int(truth.isna().sum())} target(s)")
        truth = truth.astype(int).to_numpy()

    memberships = [
        ["all", f"cluster-{c}"] + ([] if truth is None else [f"true-subtype-{truth[i]}"])
        for i, c in enumerate(clusters)
    ]
    background = store_index[~is_target]
    baseline = _group_volume_mean(store, background, config.batch_size)[0] if config.baseline == "background_mean" else None
    if baseline is not None:
        baseline = baseline[None].to(store.device)
    center = _group_representation_mean(model, store, background, config.batch_size, "salient")

    means = {}
    with _progress(progress) as bar:
        if "gradient_x_input" in config.methods:
            means["gradient_x_input"] = _GroupMeans(store.spatial_shape)
            task = bar.add_task("gradient x input", total=len(target_store))
            batches = store.batches(target_store, config.batch_size)
            for position, (_, volumes) in zip(range(0, len(target_store), config.batch_size), batches):
                attribution = gradient_x_input(model, volumes, center=center, baseline=baseline)
                means["gradient_x_input"].add(attribution, memberships[position : position + len(volumes)])
                bar.advance(task, len(volumes))
        if "occlusion" in config.methods:
            means["occlusion"] = _GroupMeans(store.spatial_shape)
            subset = _occlusion_subset(clusters, config.occlusion_max_subjects, config.seed)
            voxel = _voxel_sizes(store.affine)
            patch = [max(1, round(config.occlusion_patch_mm / size)) for size in voxel]
            stride = [max(1, round(config.occlusion_stride_mm / size)) for size in voxel]
            task = bar.add_task("occlusion", total=len(subset))
            for position in subset:
                volume = store.batch(target_store[position : position + 1])
                effect = occlusion(model, volume, patch, stride, baseline=baseline, batch_size=config.batch_size)
                means["occlusion"].add(effect, [memberships[position]])
                bar.advance(task)

    brain = np.asarray(store.mask, dtype=bool)
    atlas_labels, atlas_names = _atlas(config, store, brain)
    index_rows = []
    group_names = ["all"] + [f"cluster-{c}" for c in range(1, clustering.n_clusters_ + 1)]
    for method, group_means in means.items():
        for group in group_names:
            name = f"{method}_{group}"
            image = store.to_nifti((group_means.mean(group) * brain).astype(np.float32))
            save_nifti(image, out_dir / f"{name}.nii.gz")
            regions = rank_regions(image, atlas_labels, atlas_names, brain_mask=brain)
            write_tsv(out_dir / f"regions_{name}.tsv", regions)
            title = f"{method.replace('_', ' ')}, {group} (n={group_means.counts[group]})"
            if config.plots:
                plot_map(image, out_dir / f"{name}.png", title)
            index_rows.append(
                {
                    "map": name,
                    "method": method,
                    "group": group,
                    "n_subjects": group_means.counts[group],
                    "nifti": f"{name}.nii.gz",
                    "png": f"{name}.png" if config.plots else None,
                    "regions": f"regions_{name}.tsv",
                    "top_region": regions["name"].iloc[0] if len(regions) else None,
                }
            )
    write_tsv(out_dir / "index.tsv", pd.DataFrame(index_rows))
    write_json(out_dir / "subtypes.json", subtypes)

    if truth is not None:
        evaluation = _evaluate(clusters, truth, true_masks, means, brain)
        evaluation["ground_truth"] = str(Path(ground_truth) / "ground_truth.tsv")
        write_json(out_dir / "evaluation.json", evaluation)
        subtypes = {**subtypes, "evaluation": evaluation}
    return subtypes


def _atlas(config: MapsConfig, store, brain: np.ndarray):
    """The atlas image and names used for region tables: the user's, or a coarse parcellation of the brain mask."""
    if config.atlas is not None:
        if not Path(config.atlas).is_file():
            raise ConfigError(f"atlas {config.atlas}: no such file")
        names_path = config.atlas_names or _names_beside(config.atlas)
        return _as_image(config.atlas), read_atlas_names(names_path)
    labels, names = coarse_parcellation(brain, store.affine, n_regions=min(config.n_regions, int(brain.sum())), seed=config.seed)
    return store.to_nifti(labels), names


def _names_beside(atlas: Path) -> Path:
    """The names TSV beside an atlas: same name with ``.tsv`` for ``.nii``/``.nii.gz``."""
    atlas = Path(atlas)
    stem = atlas.name.removesuffix(".gz").removesuffix(".nii")
    path = atlas.with_name(stem + ".tsv")
    if not path.is_file():
        raise ConfigError(f"atlas {atlas}: no atlas names given and no {path.name} beside it (columns index, name)")
    return path


def _evaluate(clusters, truth, true_masks, means: dict[str, _GroupMeans], brain) -> dict:
    """ARI of clusters vs true subtypes; AUC of each subtype's maps against its true mask.

    ``auc_cluster_map`` scores the map of the cluster matched to the subtype (what a user
    without ground truth would see); ``auc_subtype_map`` scores the map averaged over the
    subjects truly in the subtype (the attribution method alone, clustering errors aside).
    """
    from sklearn.metrics import adjusted_rand_score

    patients = truth > 0
    matching = match_clusters(clusters[patients], truth[patients])
    rows = []
    for method, group_means in means.items():
        for subtype, true_mask in true_masks.items():
            cluster = matching.get(subtype)
            cluster_group = f"cluster-{cluster}" if cluster is not None else None
            subtype_group = f"true-subtype-{subtype}"
            rows.append(
                {
                    "method": method,
                    "subtype": subtype,
                    "cluster": cluster,
                    "n_mask_voxels": int((true_mask & brain).sum()),
                    "auc_cluster_map": map_auc(np.abs(group_means.mean(cluster_group)), true_mask, brain)
                    if cluster_group in group_means.counts
                    else None,
                    "auc_subtype_map": map_auc(np.abs(group_means.mean(subtype_group)), true_mask, brain)
                    if subtype_group in group_means.counts
                    else None,
                }
            )
    table = pd.DataFrame(rows)
    summary = {
        method: {
            "mean_auc_cluster_map": float(part["auc_cluster_map"].astype(float).mean()),
            "mean_auc_subtype_map": float(part["auc_subtype_map"].astype(float).mean()),
        }
        for method, part in table.groupby("method", sort=False)
    } if len(table) else {}
    return {
        "ari": float(adjusted_rand_score(truth[patients], clusters[patients])),
        "n_true_subtypes": len(true_masks),
        "n_clusters": int(len(np.unique(clusters))),
        "matching": {str(subtype): cluster for subtype, cluster in matching.items()},
        "map_auc": table.to_dict(orient="records"),
        "summary": summary,
    }


def run_maps(
    run_dir: str | Path,
    atlas: str | Path | None = None,
    atlas_names: str | Path | None = None,
    config: MapsConfig | None = None,
    ground_truth: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """``neurocl maps RUN``: attribution maps, regions, subtypes (and their evaluation) in ``RUN/maps/``.

    Parameters
    ----------
    run_dir : path
        A finished run (``pipeline.load_run`` reads its config, cohort, store, model and embeddings).
    atlas, atlas_names : path, optional
        Atlas labels NIfTI and names TSV (index, name); override the run's ``maps`` section.
    config : MapsConfig, optional
        Default: the run's ``maps`` section, else :class:`MapsConfig` defaults.
    ground_truth : path, optional
        Synthetic cohort folder; default: the cohort YAML's folder when it holds ``ground_truth.tsv``.
    progress : bool
        Show progress bars.

    Returns
    -------
    Path
        The maps folder.
    """
    from neurocl.pipeline import load_run

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    if config is None:
        section = getattr(run.config, "maps", None)
        config = MapsConfig() if section is None else MapsConfig.model_validate(
            section.model_dump() if isinstance(section, BaseModel) else section
        )
    if atlas is not None or atlas_names is not None:
        config = config.model_copy(update={"atlas": atlas or config.atlas, "atlas_names": atlas_names or config.atlas_names})
    if ground_truth is None:
        ground_truth = _find_ground_truth(run.cohort)
    out_dir = run_dir / "maps"
    analyse_salient(run.model, run.store, run.cohort, run.embeddings, out_dir, config, ground_truth, progress)
    return out_dir
