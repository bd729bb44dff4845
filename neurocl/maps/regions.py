"""Brain regions: rank the parcels of an atlas by a map's relevance, a coarse parcellation when
there is no atlas, and PNG views of maps over the MNI152 template."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd

from neurocl.errors import ConfigError
from neurocl.io import atomic_path, read_tsv


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
    repeated = names["index"][names["index"].duplicated()]
    if len(repeated):
        raise ConfigError(f"atlas names {path}: index {int(repeated.iloc[0])} appears more than once")
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
