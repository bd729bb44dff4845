"""Linear probes of clinical attributes from embedding spaces, with honest statistics.

Which attributes live in which space? For every space (``common_*``, ``salient_*``,
``emb_*`` or any other ``prefix_<i>`` column block of an embeddings table), every
attribute and every subset of subjects (all, target, background) we fit a linear
probe and report its score with a bootstrap 95% CI, a permutation p-value and the score
expected by chance (format: ``probes.tsv`` in DESIGN.md; what each number means:
``docs/probing.md``).

By default (``ProbeConfig.scope = "held_out"``, :mod:`neurocl.probe.heldout`) a probe is
fitted on the encoder's ``train``/``val`` subjects and scored on its ``test`` subjects only,
so that no subject the encoder trained on is ever scored. ``scope = "in_sample_cv"`` is the
cross-validation over every subject below (out-of-fold for the probe, in-sample for the
encoder), labelled so in probes.tsv, separation.json and the report.

The in-sample CV protocol, so that nothing is ever fit on a test fold:

* outer CV over participants (a participant's rows share a fold; stratified by class
  for categorical attributes) or leave-one-site-out;
* inside each outer training fold, standardisation is fit on the training rows
  only and the regularisation (ridge ``alpha`` or logistic ``C``) is chosen by an
  inner CV over the participants of those rows (not stratified, so that it treats
  observed and permuted labels alike);
* the score is computed once from the pooled out-of-fold predictions;
* the bootstrap resamples participants of those out-of-fold predictions;
* the permutation test permutes the labels (whole participants, within their outer
  test fold, so every permutation is as stratified as the observed labels) and reruns
  the whole scheme, inner selection included: p = (1 + #{perm >= observed}) / (1 + n_perm).

Refitting a few hundred times is affordable because the probes are batched over
label vectors: ridge is solved in closed form from one SVD per fold for every
alpha and every permutation at once, and logistic regression (one-vs-rest beyond two
classes) is a damped Newton solver run on all permutations and classes together
(torch, float64). Probes run in parallel threads (``ProbeConfig.n_jobs``).
"""

from neurocl.config import ProbeConfig
from neurocl.embed import embedding_spaces, join_embeddings
from neurocl.probe.command import probe_command, probes_table
from neurocl.probe.cv import cross_validated_predictions, outer_folds, permutation_indices
from neurocl.probe.heldout import held_out_probe, held_out_score
from neurocl.probe.metrics import LOWER_IS_BETTER, METRICS, PRIMARY_METRIC, chance_level, score
from neurocl.probe.probe import GROUP_ATTRIBUTE, PROBE_COLUMNS, SUBSETS, probe_attribute, probe_embeddings, probe_table
from neurocl.probe.separation import ground_truth_recovery, separation, separation_table
from neurocl.probe.truth import cluster_recovery, probe_ground_truth
from neurocl.probe.solvers import fit_logistic, ridge_path_predictions

__all__ = [
    "GROUP_ATTRIBUTE",
    "LOWER_IS_BETTER",
    "METRICS",
    "PRIMARY_METRIC",
    "PROBE_COLUMNS",
    "SUBSETS",
    "ProbeConfig",
    "chance_level",
    "cluster_recovery",
    "cross_validated_predictions",
    "embedding_spaces",
    "fit_logistic",
    "ground_truth_recovery",
    "held_out_probe",
    "held_out_score",
    "join_embeddings",
    "outer_folds",
    "permutation_indices",
    "probe_attribute",
    "probe_command",
    "probe_embeddings",
    "probe_ground_truth",
    "probe_table",
    "probes_table",
    "ridge_path_predictions",
    "score",
    "separation",
    "separation_table",
]
