"""Scores against ground truth (synthetic cohorts): map AUC against true masks, clusters against
true subtypes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata
from sklearn.metrics import adjusted_rand_score

from neurocl.errors import ConfigError
from neurocl.maps.regions import _as_image
from neurocl.synthdir import SynthDir


#: How far a trained network's map AUC must exceed the untrained network's to pass; any other null
#: (a network trained with permuted group labels) must merely be beaten.
PASS_MARGIN = 0.1


def _beats(margin: float, null: str) -> bool:
    return margin >= PASS_MARGIN if null == "untrained" else margin > 0

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
    clusters, subtypes = np.asarray(clusters), np.asarray(subtypes)
    found, true = np.unique(clusters), np.unique(subtypes)
    overlap = np.array([[np.sum((subtypes == t) & (clusters == c)) for c in found] for t in true])
    rows, cols = linear_sum_assignment(-overlap)
    return {int(true[r]): int(found[c]) for r, c in zip(rows, cols)}


def load_ground_truth(folder: str | Path, store) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """A synthetic cohort's ``ground_truth.tsv`` and its subtype masks resampled onto the store grid.

    Masks (``masks/subtype-K_mask.nii.gz`` on the source grid) are resampled with
    nearest-neighbour interpolation; a voxel is in subtype K's region when the mask is > 0.
    """
    from nilearn.image import resample_to_img

    folder = SynthDir(folder)
    table = folder.read_ground_truth()
    if "subtype" not in table.columns:
        raise ConfigError(f"{folder.ground_truth}: no subtype column (has {list(table.columns)})")
    grid = store.to_nifti(np.zeros(store.spatial_shape, dtype=np.float32))
    masks = {}
    for subtype in sorted(int(k) for k in table["subtype"].dropna().unique() if k > 0):
        path = folder.subtype_mask(subtype)
        if not path.is_file():
            raise ConfigError(f"{folder.ground_truth} has subtype {subtype} but {path} does not exist")
        resampled = resample_to_img(
            _as_image(path), grid, interpolation="nearest", force_resample=True, copy_header=True
        )
        masks[subtype] = np.asarray(resampled.dataobj) > 0
    return table, masks


def find_ground_truth(cohort) -> Path | None:
    """The synthetic cohort folder (``ground_truth.tsv`` beside the cohort YAML), if there is one."""
    source = Path(str(getattr(cohort, "source", "")))
    if source.suffix in (".yaml", ".yml") and SynthDir(source.parent).has_ground_truth():
        return source.parent
    return None


def load_brain_mask(folder: str | Path, store) -> np.ndarray | None:
    """A synthetic cohort's ``brain_mask.nii.gz`` on the store grid (nearest neighbour), or None without one."""
    from nilearn.image import resample_to_img

    path = SynthDir(folder).brain_mask
    if not path.is_file():
        return None
    grid = store.to_nifti(np.zeros(store.spatial_shape, dtype=np.float32))
    resampled = resample_to_img(_as_image(path), grid, interpolation="nearest", force_resample=True, copy_header=True)
    return np.asarray(resampled.dataobj) > 0


def evaluate_subtypes(
    clusters,
    truth,
    true_masks: dict[int, np.ndarray],
    group_maps: dict,
    brain_mask,
    difference_maps: dict | None = None,
    anatomy_map: np.ndarray | None = None,
    null_maps: dict | None = None,
) -> dict:
    """Adjusted Rand index of clusters vs true subtypes, and AUC of each subtype's maps against its true mask.

    Clusters are matched one-to-one to true subtypes (:func:`match_clusters`). For each method
    and subtype, ``auc_cluster_map`` scores the relevance |map| of the matched cluster's map
    (what a user without ground truth sees) and ``auc_subtype_map`` that of the map averaged
    over the subjects truly in the subtype (the attribution method alone, clustering errors
    aside). ARI counts patients only (controls are not clustered).

    Every AUC counts the voxels inside ``brain_mask``, so a map that merely follows anatomy
    (high in grey matter, 0 outside the head) already scores above 0.5. Two model-free
    references put the numbers in context (``reference_auc``): ``auc_anatomy_map``, the AUC of
    the mean control volume itself (the floor for a map that knows only where tissue is), and
    ``auc_difference_map``, the AUC of |mean volume of the subtype's subjects − mean control
    volume| (what a voxel-wise group comparison that knew the true subtypes finds).

    A map is only as good as its margin over a network that learned nothing: gradient x input of
    a randomly initialised network already scores well above 0.5 (the (x − x₀) factor carries the
    lesion). ``null_maps`` holds the same methods' maps from such networks (e.g. ``"untrained"``);
    each row then has ``auc_cluster_map_<null>`` and ``auc_subtype_map_<null>``, and the summary,
    per method, the null means, ``margin_over_<null>`` and ``passes``: the trained subtype map's
    mean AUC exceeds the untrained network's by at least :data:`PASS_MARGIN` and every other null's.

    Parameters
    ----------
    clusters, truth : array-like
        (n,) found cluster and true subtype (0 for controls) of each analysed target subject.
    true_masks : dict
        Subtype -> (*S) boolean true region.
    group_maps : dict
        Method -> {group -> (*S) mean map}, groups named ``cluster-<c>`` and ``true-subtype-<k>``.
    brain_mask : array-like
        (*S) boolean; AUCs count voxels inside it.
    difference_maps : dict, optional
        Group -> (*S) mean volume minus mean control volume (``true-subtype-<k>`` groups used).
    anatomy_map : np.ndarray, optional
        (*S) mean control volume.
    null_maps : dict, optional
        Null network name -> {method -> {group -> (*S) mean map}}, the groups of ``group_maps``.

    Returns
    -------
    dict
        ari, n_true_subtypes, n_clusters, matching {subtype: cluster}, n_brain_voxels, map_auc (one
        row per method and subtype), summary {method: mean_auc_cluster_map, mean_auc_subtype_map},
        reference_auc (one row per subtype), reference_summary.
    """
    clusters, truth = np.asarray(clusters), np.asarray(truth)
    brain_mask = np.asarray(brain_mask, dtype=bool)
    patients = truth > 0
    matching = match_clusters(clusters[patients], truth[patients])

    def auc(maps: dict, group: str, true_mask: np.ndarray) -> float | None:
        return map_auc(np.abs(maps[group]), true_mask, brain_mask) if group in maps else None

    null_maps = null_maps or {}
    rows = []
    for method, maps in group_maps.items():
        for subtype, true_mask in true_masks.items():
            row = {
                "method": method,
                "subtype": subtype,
                "cluster": matching.get(subtype),
                "n_mask_voxels": int((true_mask & brain_mask).sum()),
                "auc_cluster_map": auc(maps, f"cluster-{matching.get(subtype)}", true_mask),
                "auc_subtype_map": auc(maps, f"true-subtype-{subtype}", true_mask),
            }
            for null, methods in null_maps.items():
                row[f"auc_cluster_map_{null}"] = auc(methods.get(method, {}), f"cluster-{matching.get(subtype)}", true_mask)
                row[f"auc_subtype_map_{null}"] = auc(methods.get(method, {}), f"true-subtype-{subtype}", true_mask)
            rows.append(row)
    table = pd.DataFrame(rows)

    def mean(part: pd.DataFrame, column: str) -> float:
        return float(part[column].astype(float).mean()) if column in part else float("nan")

    summary = {}
    for method, part in table.groupby("method", sort=False):
        record = {"mean_auc_cluster_map": mean(part, "auc_cluster_map"),
                  "mean_auc_subtype_map": mean(part, "auc_subtype_map")}
        for null in null_maps:
            record[f"mean_auc_cluster_map_{null}"] = mean(part, f"auc_cluster_map_{null}")
            record[f"mean_auc_subtype_map_{null}"] = mean(part, f"auc_subtype_map_{null}")
            record[f"margin_over_{null}"] = record["mean_auc_subtype_map"] - record[f"mean_auc_subtype_map_{null}"]
        if null_maps:
            # NaN margins (a null without this method) compare False: no pass without every reference.
            record["passes"] = bool(all(_beats(record[f"margin_over_{null}"], null) for null in null_maps))
        summary[method] = record
    anatomy = {} if anatomy_map is None else {"anatomy": anatomy_map}
    reference_rows = [
        {
            "subtype": subtype,
            "auc_anatomy_map": auc(anatomy, "anatomy", true_mask),
            "auc_difference_map": auc(difference_maps or {}, f"true-subtype-{subtype}", true_mask),
        }
        for subtype, true_mask in true_masks.items()
    ]
    references = pd.DataFrame(reference_rows, columns=["subtype", "auc_anatomy_map", "auc_difference_map"])
    return {
        "ari": float(adjusted_rand_score(truth[patients], clusters[patients])),
        "n_true_subtypes": len(true_masks),
        "n_clusters": int(len(np.unique(clusters))),
        "matching": {str(subtype): cluster for subtype, cluster in matching.items()},
        "n_brain_voxels": int(brain_mask.sum()),
        "map_auc": rows,  # the dicts, not the table's records: a missing AUC stays None, not NaN
        "summary": summary,
        "null_references": sorted(null_maps),
        "pass_margin": PASS_MARGIN,
        "reference_auc": reference_rows,
        "reference_summary": {
            "mean_auc_anatomy_map": float(references["auc_anatomy_map"].astype(float).mean()),
            "mean_auc_difference_map": float(references["auc_difference_map"].astype(float).mean()),
        },
    }
