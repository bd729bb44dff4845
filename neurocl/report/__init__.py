"""The run report: report.html (self-contained, images embedded) and report.md, from a run directory.

:func:`write_report` reads whatever stage outputs exist in the run directory and writes one
section per output it finds (what each number means: ``docs/probing.md``):

========================  ===================================================================
section                   read from
========================  ===================================================================
Run                       ``config.yaml``, ``splits.tsv``, ``embeddings.tsv``
Probes: common vs salient ``probes.tsv`` (one figure and one table per attribute), ``truth_probes.tsv``
                          (the cohort's ground-truth factors)
Against the linear floor  the run's probes and ARI/NMI beside the best linear baseline's (``pca``,
                          ``cpca``, ``lin2``, ``combat``), on the same test subjects
Separation                ``separation.json`` (with ground truth: R², MCC, k-means ARI and NMI)
Spread over seeds         each seed's ``probes.tsv`` and ``separation.json`` (``training.seeds``)
Training curves           ``logs/metrics.csv`` (one panel per loss term, train and val)
Embedding views           ``embeddings.tsv`` (+ the cohort of ``config.yaml``, ``ground_truth.tsv``
                          beside it, ``maps/clusters.tsv``): PCA and t-SNE, coloured by group,
                          diagnosis, subtype, age and site
Baseline comparison       ``baselines/<name>/probes.tsv`` next to the run's own probes
Maps and subtypes         ``maps/index.tsv`` + PNGs, ``maps/subtypes.json``,
                          ``maps/evaluation.json``, ``maps/associations.tsv``,
                          ``maps/seed_consensus.json`` (subtypes across training seeds)
========================  ===================================================================

Figures are matplotlib PNGs: embedded as base64 in the HTML and written to ``RUN/report_files/``
for the Markdown. The page is at most 1100 px wide and tables wrap, so nothing scrolls sideways.

The package, one job a module: :mod:`~neurocl.report.write` (:func:`write_report`),
:mod:`~neurocl.report.runfiles` (what a run folder holds, read once), :mod:`~neurocl.report.sections`
(one function a section), :mod:`~neurocl.report.figures` (matplotlib figures, saved and embedded) and
:mod:`~neurocl.report.render` (HTML and Markdown).
"""

from neurocl.report.write import write_report

__all__ = ["write_report"]
