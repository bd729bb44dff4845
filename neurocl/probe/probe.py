"""One probe (an attribute from a feature matrix) and every probe of an embeddings table."""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from rich.progress import track

from neurocl.config import ProbeConfig
from neurocl.logs import progress_console, transient_progress
from neurocl.embed import embedding_spaces, join_embeddings
from neurocl.errors import CohortError, ConfigError
from neurocl.probe.cv import bootstrap_weights, cross_validated_predictions, outer_folds, permutation_indices
from neurocl.probe.heldout import FIT_SPLITS, TEST_SPLIT, TOO_FEW, fit_and_test_rows, held_out_probe
from neurocl.probe.metrics import METRICS, PRIMARY_METRIC, chance_level, score
from neurocl.probe.permutations import n_extreme, sequential_predictions

console = progress_console()

# ``scope``: "held_out" (fitted on train/val subjects, scored on test subjects) or "in_sample_cv"
# (cross-validated over every subject, the encoder's training subjects included); ``n``: rows scored,
# ``n_fit``: rows the scored predictions were fitted on (held out) or every row (in-sample CV).
PROBE_COLUMNS = ["space", "attribute", "subset", "scope", "metric", "value", "ci_low", "ci_high", "p_value",
                 "n_permutations", "chance", "n", "n_fit", "note"]
SUBSETS = ("all", "target", "background")
GROUP_ATTRIBUTE = "group"


def probe_attribute(features, labels, groups, kind: str, config: ProbeConfig, sites=None,
                    splits=None) -> tuple[list[dict], str]:
    """Probe one attribute from one feature matrix: scores, 95% CIs, p-values and chance.

    ``config.scope`` "held_out" (the default): fitted on the ``train``/``val`` rows of ``splits``,
    scored on its ``test`` rows (:mod:`neurocl.probe.heldout`); "in_sample_cv": cross-validated
    over every row.

    Parameters
    ----------
    features : (n, d) ; labels : (n,) values, or category labels of any type (categorical)
    groups : (n,) participant ids ; sites : (n,) for leave-site-out or None
    splits : (n,) "train"/"val"/"test" of each row (needed for held-out probes)

    Returns
    -------
    rows : list of dicts with metric, value, ci_low, ci_high, p_value, n_permutations (the permutations
        used: fewer than ``config.n_permutations`` when the decision at 0.05 was clear earlier, see
        :mod:`neurocl.probe.permutations`), chance, n (empty when skipped)
    note : str, why it was skipped or anything unusual (fewer folds), else empty.
    """
    features = np.asarray(features, dtype=np.float64)
    groups = np.asarray(groups)
    if config.scope == "held_out":
        fit, test = fit_and_test_rows(splits)
        # Rows outside the split manifest are neither fitted nor scored (nor count as classes).
        keep = fit | test
        features, labels, groups, fit, test = features[keep], np.asarray(labels)[keep], groups[keep], fit[keep], test[keep]
        sites = None if sites is None else np.asarray(sites)[keep]
    if len(groups) < config.min_samples:
        return [], f"{len(groups)} labelled rows (< min_samples={config.min_samples})"
    if kind == "categorical":
        classes, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
        n_classes = len(classes)
        if n_classes < 2:
            return [], f"constant label ({classes[0] if n_classes else 'none'})"
    else:
        codes = np.asarray(labels, dtype=np.float64)
        n_classes = None
        if np.ptp(codes) == 0:
            return [], f"constant label ({codes[0]:g})"
    if not np.isfinite(features).all():
        return [], "non-finite embedding values"
    if config.scope == "held_out":
        return held_out_probe(features, codes, groups, kind, n_classes, config, fit, test, sites=sites,
                              classes=classes if kind == "categorical" else None)
    folds, note = outer_folds(codes, groups, kind, config, sites=sites)
    if not folds:
        return [], note
    rng = np.random.default_rng(config.seed)
    test_fold = np.full(len(codes), -1)
    for fold, (_, test) in enumerate(folds):
        test_fold[test] = fold
    permuted = codes[permutation_indices(groups, config.n_permutations, rng, blocks=test_fold)]
    tested = np.concatenate([test for _, test in folds])
    predictions = sequential_predictions(
        lambda labels: cross_validated_predictions(features, labels, groups, kind, folds, config, n_classes),
        permuted, tested, PRIMARY_METRIC[kind], adaptive=config.adaptive_permutations,
    )
    n_permutations = len(predictions) - 1
    permuted = permuted[: n_permutations + 1]
    observed_codes, observed = codes[tested], predictions[0, tested]
    resample_weights = bootstrap_weights(groups[tested], config.n_bootstrap, rng)
    rows = []
    for metric in METRICS[kind]:
        scores = score(metric, permuted[:, tested], predictions[:, tested])
        value = float(scores[0])
        p_value = np.nan
        if n_permutations:
            p_value = (1 + n_extreme(scores[1:], value, metric)) / (1 + n_permutations)
        ci = (np.nan, np.nan)
        if resample_weights is not None:
            ci = tuple(np.nanpercentile(score(metric, observed_codes, observed, resample_weights), [2.5, 97.5]))
        chance = chance_level(metric, codes, folds, n_classes)
        rows.append(dict(metric=metric, value=value, ci_low=ci[0], ci_high=ci[1], p_value=p_value,
                         n_permutations=n_permutations, chance=chance, n=len(tested), n_fit=len(codes)))
    return rows, note


def probe_embeddings(
    embeddings: pd.DataFrame,
    cohort,
    attributes: Sequence[str] | None = None,
    subsets: Iterable[str] = SUBSETS,
    config: ProbeConfig | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Probe every attribute from every embedding space, in every subset of subjects.

    Parameters
    ----------
    embeddings : DataFrame
        ``participant_id``, [``session_id``], then ``<space>_<i>`` columns (embeddings.tsv).
    cohort : neurocl.cohort.Cohort
        Gives the group and the attributes (and their kinds); joined by participant (and session).
    attributes : list of str or None
        Attribute names of the cohort; ``"group"`` (background vs target) is also accepted.
        Default: every cohort attribute, plus ``group`` in the ``all`` subset.
    subsets : iterable of "all", "target", "background"

    Returns
    -------
    DataFrame in the probes.tsv format (``PROBE_COLUMNS``): one row per space x attribute x
    subset x metric; a skipped combination is one row with ``metric`` "none" and its reason in ``note``.
    """
    config = config or ProbeConfig()
    subsets = list(subsets)
    unknown_subsets = [s for s in subsets if s not in SUBSETS]
    if unknown_subsets:
        raise ConfigError(f"subsets: unknown {unknown_subsets} (choose from {list(SUBSETS)})")
    kinds = dict(cohort.attribute_kinds)
    if attributes is None:
        attributes = list(kinds) + [GROUP_ATTRIBUTE]
    unknown = [a for a in attributes if a not in kinds and a != GROUP_ATTRIBUTE]
    if unknown:
        raise ConfigError(f"attributes: {unknown} not in the cohort (it has {sorted(kinds)})")
    kinds[GROUP_ATTRIBUTE] = "categorical"
    return probe_table(join_embeddings(embeddings, cohort), embedding_spaces(embeddings), kinds, attributes, subsets,
                       config, progress)


def probe_table(table: pd.DataFrame, spaces: dict[str, list[str]], kinds: dict[str, str], attributes: Sequence[str],
                subsets: Iterable[str] = SUBSETS, config: ProbeConfig | None = None, progress: bool = False) -> pd.DataFrame:
    """Probe ``attributes`` (name -> kind in ``kinds``) from every space of a joined table (probes.tsv format).

    ``table``: rows of :func:`~neurocl.embed.join_embeddings` (``participant_id``, ``group``, [``split``],
    the ``spaces`` columns) with a column per attribute; what :func:`probe_embeddings` does after the join,
    and what the ground-truth probes (:mod:`neurocl.probe.truth`) share with it.
    """
    config = config or ProbeConfig()
    subsets = list(subsets)
    if not spaces:
        raise CohortError(f"embeddings: no '<space>_<i>' numeric columns (columns: {list(table.columns)})")
    sites = _site_column(table, config)
    splits = _split_column(table, config)
    jobs = [
        (space, attribute, subset)
        for space in spaces
        for attribute in attributes
        for subset in subsets
        if not (attribute == GROUP_ATTRIBUTE and subset != "all")
    ]
    tasks = []
    for space, attribute, subset in jobs:
        in_subset = table["group"].notna() if subset == "all" else table["group"].eq(subset)
        keep = (in_subset & table[attribute].notna()).to_numpy()
        if sites is not None:
            # pandas 3 may hand back a read-only view: combine into a new array, never in place
            keep = keep & pd.notna(sites)
        tasks.append((
            table.loc[keep, spaces[space]].to_numpy(),
            table.loc[keep, attribute].to_numpy(),
            table.loc[keep, "participant_id"].to_numpy(),
            kinds[attribute],
            None if sites is None else sites[keep],
            attribute == config.leave_site_out,
            None if splits is None else splits[keep],
        ))
    rows = []
    skipped: dict[tuple[str, str, str], list[str]] = {}
    for (space, attribute, subset), task, (results, note) in zip(jobs, tasks, _run_tasks(jobs, tasks, config, progress)):
        if not results:
            skipped.setdefault((attribute, subset, note), []).append(space)
            results = [dict(metric="none", value=np.nan, ci_low=np.nan, ci_high=np.nan, p_value=np.nan,
                            n_permutations=0, chance=np.nan, n=len(task[2]), n_fit=np.nan)]
        rows.extend({"space": space, "attribute": attribute, "subset": subset, "scope": config.scope, **result,
                     "note": note} for result in results)
    # One line per reason, not per space: an attribute absent from a group by design (a patients-only
    # score in controls) is skipped in every space alike.
    for (attribute, subset, note), skipped_spaces in skipped.items():
        prefix = "warning: held-out probe" if note.startswith(TOO_FEW) else "not probed"
        console.print(f"{prefix}: {attribute} in {subset} ({note}), spaces {', '.join(skipped_spaces)}",
                      highlight=False, markup=False)
    probes = pd.DataFrame(rows, columns=PROBE_COLUMNS)
    _refuse_unscorable(probes, config)
    return probes


def _refuse_unscorable(probes: pd.DataFrame, config: ProbeConfig) -> None:
    """A held-out evaluation where no attribute could be scored for want of test subjects is an error, not a table of notes."""
    if config.scope != "held_out" or probes.empty or (probes["metric"] != "none").any():
        return
    small = probes[probes["note"].str.startswith(TOO_FEW)].drop_duplicates(["attribute", "subset"])
    if len(small):
        reasons = "; ".join(f"{row.attribute} in {row.subset}: {row.note}" for row in small.itertuples())
        raise ConfigError(f"held-out probes: no attribute could be scored on the test subjects ({reasons})")


def _probe_task(features, labels, groups, kind, sites, is_site_column, splits, config):
    if is_site_column:
        return [], "the attribute is the held-out site column"
    return probe_attribute(features, labels, groups, kind, config, sites=sites, splits=splits)


def _run_tasks(jobs, tasks, config, progress) -> list:
    """Results of :func:`_probe_task` in task order, on ``config.n_jobs`` threads.

    Threads, not processes: the heavy parts (BLAS, batched Cholesky, SVD) release the GIL, and
    threads start instantly and share the data. Tasks run attribute by attribute (every space
    and subset of one attribute, then the next), so that progress can be told per attribute.
    """
    order = sorted(range(len(jobs)), key=lambda position: (_first_position(jobs, jobs[position][1]), position))
    n_jobs = min(os.cpu_count() or 1, len(tasks)) if config.n_jobs == -1 else min(config.n_jobs, len(tasks))
    ordered_jobs = [jobs[position] for position in order]
    if n_jobs <= 1:
        results = (_probe_task(*tasks[position], config) for position in order)
        done = list(_progress(results, ordered_jobs, progress, "probing"))
    else:
        with ThreadPoolExecutor(max_workers=n_jobs) as pool:
            results = pool.map(lambda position: _probe_task(*tasks[position], config), order)
            done = list(_progress(results, ordered_jobs, progress, f"probing ({n_jobs} threads)"))
    by_position = dict(zip(order, done))
    return [by_position[position] for position in range(len(jobs))]


def _first_position(jobs, attribute) -> int:
    return next(position for position, job in enumerate(jobs) if job[1] == attribute)


def _split_column(table, config):
    """Each row's split (held-out scope), or None (in-sample CV); refuses embeddings without test rows, or
    without train/val rows to fit on (every probe would be skipped, and a table of skips is no result)."""
    if config.scope != "held_out":
        return None
    split = table["split"] if "split" in table.columns else pd.Series(np.nan, index=table.index)
    if not split.eq(TEST_SPLIT).any():
        found = sorted(split.dropna().astype(str).unique())
        raise ConfigError(
            "held-out probes (evaluation.probe.scope: held_out) need embeddings with a 'split' column that has "
            f"'test' rows (found: {found or 'no split column'}); use a run's embeddings.tsv, raise "
            "splits.test_fraction above 0, or set evaluation.probe.scope: in_sample_cv "
            "(neurocl probe --scope in_sample_cv) to cross-validate over every subject, labelled in-sample")
    if not split.isin(FIT_SPLITS).any():
        found = sorted(split.dropna().astype(str).unique())
        raise ConfigError(
            f"held-out probes: the embeddings have no 'train' or 'val' rows to fit the probes on (splits found: {found}); "
            "use a run's embeddings.tsv, or pass --scope in_sample_cv (evaluation.probe.scope: in_sample_cv) "
            "to cross-validate over every subject, labelled in-sample")
    return split.to_numpy(dtype=object)


def _site_column(table, config):
    if config.leave_site_out is None:
        return None
    if config.leave_site_out not in table.columns:
        raise ConfigError(f"leave_site_out: no column {config.leave_site_out!r} in the cohort (columns: {list(table.columns)})")
    return table[config.leave_site_out].to_numpy()


def _progress(results, jobs, enabled, description):
    """Yield ``results`` (one per job, in order) and tell progress on stderr: a bar on a terminal,
    otherwise (a log file) one line per attribute when its last probe is done."""
    if not enabled:
        yield from results
        return
    if transient_progress(enabled):
        yield from track(results, description=description, transient=True, total=len(jobs), console=console)
        return
    remaining = Counter(attribute for _, attribute, _ in jobs)
    started, finished = time.monotonic(), 0
    for (_, attribute, _), result in zip(jobs, results):
        remaining[attribute] -= 1
        if remaining[attribute] == 0:
            finished += 1
            console.print(f"probed {attribute} ({finished}/{len(remaining)} attributes, "
                          f"{time.monotonic() - started:.0f} s)", highlight=False, markup=False)
        yield result

