"""Brain regions: rank the parcels of an atlas by a map's relevance, a coarse parcellation when
there is no atlas, and PNG views of maps over the MNI152 template."""

from __future__ import annotations

import functools
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.cluster import KMeans

from neurocl.errors import ConfigError
from neurocl.io import atomic_path, read_tsv


def _as_image(img):
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


def region_at(atlas_img, names: pd.DataFrame, point_mm) -> str | None:
    """Name of the atlas region at a world point (its nearest voxel); None outside every region.

    Parameters
    ----------
    atlas_img : nibabel image or path
        Integer labels, 0 = background.
    names : DataFrame
        Columns index, name.
    point_mm : 3 floats
        World coordinates (mm).
    """
    atlas_img = _as_image(atlas_img)
    voxel = np.rint(np.linalg.solve(atlas_img.affine, [*point_mm, 1.0])[:3]).astype(int)
    if np.any(voxel < 0) or np.any(voxel >= atlas_img.shape[:3]):
        return None
    label = int(np.rint(np.asarray(atlas_img.dataobj[tuple(voxel)])))
    match = names.loc[names["index"] == label, "name"]
    return str(match.iloc[0]) if label > 0 and len(match) else None


@functools.lru_cache(maxsize=1)
def _mni_template():
    from nilearn.datasets import load_mni152_template

    return load_mni152_template(resolution=2)


# What a map figure shows: |map| at or above this fraction of its (display-smoothed) peak. A
# percentile threshold shows a fixed share of voxels whatever the map holds (the 90th percentile
# kept ~4,000 voxels down to 1/250 of the peak as speckle); a fraction of the peak shows the
# regions that carry the map.
DISPLAY_FRACTION = 0.3
# Display-only smoothing (FWHM, in voxels of the map's grid): single-voxel speckle of a gradient
# map would otherwise hide its regions. The NIfTI and the region tables keep the raw map.
DISPLAY_FWHM_VOXELS = 2.0
# Regions marked on the glass brain: the connected clusters above the threshold with the strongest peaks.
N_MARKED_CLUSTERS = 3
_MARKER_COLOURS = ("lime", "cyan", "yellow")


def display_map(img, fraction: float = DISPLAY_FRACTION, fwhm_voxels: float = DISPLAY_FWHM_VOXELS) -> dict:
    """The map as it is drawn: smoothed for display, in units of its peak, and its top clusters.

    Parameters
    ----------
    img : nibabel image or path
        3D map.
    fraction : float
        Threshold of the display, as a fraction of the smoothed map's peak |value|.
    fwhm_voxels : float
        Display smoothing (Gaussian FWHM, voxels); 0: none.

    Returns
    -------
    dict
        ``image``: the smoothed map divided by its peak |value| (so in [-1, 1]); ``peak``: that
        peak |value| in the map's units; ``threshold``: ``fraction``; ``clusters``: the connected
        clusters of voxels at or above the threshold, strongest peak first (at most
        :data:`N_MARKED_CLUSTERS`), as dicts with ``peak_mm`` (world coordinates of the cluster's
        peak voxel), ``peak_voxel`` and ``n_voxels``; ``clusters[0]`` holds the map's peak, where
        the figure cuts. Empty clusters and ``peak`` 0 for an all-zero map.
    """
    img = _as_image(img)
    data = np.asarray(img.dataobj, dtype=np.float64)
    voxel_mm = np.linalg.norm(img.affine[:3, :3], axis=0)
    if fwhm_voxels > 0:
        sigma = fwhm_voxels / np.sqrt(8 * np.log(2))
        data = ndimage.gaussian_filter(data, sigma=sigma, mode="constant")
    peak = float(np.abs(data).max()) if data.size else 0.0
    relative = data / peak if peak > 0 else data
    clusters = []
    if peak > 0:
        labels, n_labels = ndimage.label(np.abs(relative) >= fraction)
        index = np.arange(1, n_labels + 1)
        strength = ndimage.maximum(np.abs(relative), labels, index)
        positions = ndimage.maximum_position(np.abs(relative), labels, index)
        sizes = ndimage.sum(np.ones_like(relative), labels, index)
        for order in np.argsort(-np.asarray(strength), kind="stable")[:N_MARKED_CLUSTERS]:
            voxel = np.asarray(positions[order], dtype=float)
            clusters.append({
                "peak_mm": tuple(float(v) for v in (img.affine[:3, :3] @ voxel + img.affine[:3, 3]).round(1)),
                "peak_voxel": tuple(int(v) for v in voxel),
                "n_voxels": int(sizes[order]),
            })
    image = nib.Nifti1Image(relative.astype(np.float32), img.affine)
    return {"image": image, "peak": peak, "threshold": fraction, "clusters": clusters, "fwhm_mm": float(fwhm_voxels * voxel_mm.mean())}


def plot_map(img, path: str | Path, title: str, fraction: float = DISPLAY_FRACTION,
             fwhm_voxels: float = DISPLAY_FWHM_VOXELS) -> dict:
    """PNG of :func:`map_figure` (written atomically); returns its ``shown`` dict."""
    import matplotlib.pyplot as plt

    figure, shown = map_figure(img, title, fraction, fwhm_voxels)
    with atomic_path(path) as tmp:
        figure.savefig(str(tmp), dpi=100, facecolor="black")
    plt.close(figure)
    return shown


def map_figure(img, title: str, fraction: float = DISPLAY_FRACTION, fwhm_voxels: float = DISPLAY_FWHM_VOXELS):
    """A map over the MNI152 template, cut through its peak, with every cluster on a glass brain.

    Top: three orthogonal slices through the map's peak. Bottom: a glass brain (all four
    projections) of the same thresholded map, with the top clusters' peaks marked, so that
    every region the map found is in view. The map is smoothed for display only (FWHM
    ``fwhm_voxels`` voxels), divided by its peak |value| (the colour bar reads "fraction of
    peak") and shown where |value| >= ``fraction``. The threshold shows the map's shape, not
    significance.

    Returns
    -------
    figure : matplotlib Figure
    shown : dict
        :func:`display_map`'s result without the image (peak, threshold, clusters, fwhm_mm), and
        ``cut_mm``: where the slices cut, as nilearn drew them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import plotting

    shown = display_map(img, fraction, fwhm_voxels)
    clusters = shown["clusters"]
    figure = plt.figure(figsize=(9.0, 6.6), facecolor="black")
    cut = clusters[0]["peak_mm"] if clusters else None
    slices = plotting.plot_stat_map(
        shown["image"], bg_img=_mni_template(), display_mode="ortho", cut_coords=cut, threshold=fraction,
        vmax=1.0, symmetric_cbar=True, colorbar=True, draw_cross=True, annotate=True, figure=figure,
        axes=[0.0, 0.47, 1.0, 0.45],
    )
    _sparse_colorbar(slices, fraction)
    if clusters:
        glass = plotting.plot_glass_brain(
            shown["image"], display_mode="lyrz", threshold=fraction, vmax=1.0, plot_abs=False, symmetric_cbar=True,
            colorbar=False, black_bg=True, figure=figure, axes=[0.0, 0.02, 1.0, 0.42],
        )
        for cluster, colour in zip(clusters, _MARKER_COLOURS):
            glass.add_markers([cluster["peak_mm"]], marker_color=colour, marker_size=40)
    lines = [title]
    if clusters:
        peaks = "; ".join(f"{colour} ({x:+.0f}, {y:+.0f}, {z:+.0f})" for colour, (x, y, z) in
                          zip(_MARKER_COLOURS, (c["peak_mm"] for c in clusters)))
        lines.append(f"cluster peaks (mm), strongest first: {peaks}   |   shown: |map| >= {fraction:g} x peak "
                     f"({shown['peak']:.3g}), {shown['fwhm_mm']:.0f} mm display smoothing")
    else:
        lines.append("the map is zero everywhere")
    figure.text(0.01, 0.985, lines[0], color="white", fontsize=11, va="top")
    figure.text(0.01, 0.945, lines[1], color="white", fontsize=8, va="top")
    shown = {key: value for key, value in shown.items() if key != "image"}
    return figure, {**shown, "cut_mm": tuple(float(v) for v in slices.cut_coords)}


def _sparse_colorbar(display, fraction: float) -> None:
    """Five colour-bar ticks (-1, -fraction, 0, fraction, 1) with short labels: nilearn's own
    ticks add the threshold's value beside 0 and the labels overlap."""
    colorbar = getattr(display, "_cbar", None)
    if colorbar is None:
        return
    ticks = [-1.0, -fraction, 0.0, fraction, 1.0]
    colorbar.set_ticks(ticks)
    colorbar.set_ticklabels([f"{tick:g}" for tick in ticks])
    colorbar.ax.tick_params(labelsize=8)
    colorbar.set_label("fraction of peak", fontsize=8)
