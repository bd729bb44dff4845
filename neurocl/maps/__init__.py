"""Where the patient-specific patterns are, and whether patients split into subtypes.

Four pieces, each usable on its own (model- and array-level), chained by :func:`run_maps`
(``neurocl maps RUN``) on a finished run directory:

* :mod:`~neurocl.maps.attribution`: voxel maps of the salient space per subject,
  :func:`gradient_x_input` and batched :func:`occlusion`;
* :mod:`~neurocl.maps.regions`: :func:`rank_regions` of a user atlas or of a
  :func:`coarse_parcellation` of the brain mask, and :func:`plot_map` over MNI152;
* :mod:`~neurocl.maps.subtypes`: :class:`SubtypeClustering` of target subjects in salient
  space (k by silhouette or BIC, k = 1 "no subtypes" by a gap test against unimodal data,
  bootstrap stability, agreement across training seeds) and :func:`cluster_associations` with
  clinical attributes (effect sizes, FDR-corrected p-values);
* :mod:`~neurocl.maps.evaluation`: on synthetic cohorts, :func:`map_auc` of each subtype's
  map against its true mask and the adjusted Rand index of clusters vs true subtypes.

:mod:`~neurocl.maps.stage` holds :func:`analyse_salient` and :func:`run_maps`; the pipeline's
``maps`` section, :class:`MapsConfig`, is in :mod:`neurocl.config`. See ``docs/maps.md``.
"""

from neurocl.maps.attribution import gradient_x_input, occlusion
from neurocl.maps.evaluation import (
    evaluate_subtypes,
    find_ground_truth,
    load_brain_mask,
    load_ground_truth,
    map_auc,
    match_clusters,
)
from neurocl.maps.regions import coarse_parcellation, plot_map, rank_regions, read_atlas_names
from neurocl.config import MapsConfig
from neurocl.maps.stage import analyse_salient, run_maps
from neurocl.maps.subtypes import SubtypeClustering, cluster_associations, fdr_bh, one_cluster_test, seed_consensus

__all__ = [
    "MapsConfig",
    "SubtypeClustering",
    "analyse_salient",
    "cluster_associations",
    "coarse_parcellation",
    "evaluate_subtypes",
    "fdr_bh",
    "find_ground_truth",
    "gradient_x_input",
    "load_brain_mask",
    "load_ground_truth",
    "map_auc",
    "match_clusters",
    "occlusion",
    "one_cluster_test",
    "plot_map",
    "rank_regions",
    "read_atlas_names",
    "run_maps",
    "seed_consensus",
]
