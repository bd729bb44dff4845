"""One function a report section: each reads the run's files and returns a section, or None when they are absent."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pandas as pd

from neurocl.baselines import LINEAR_BASELINES
from neurocl.embed import embedding_spaces
from neurocl.maps.subtypes import STABILITY_CAUTION
from neurocl.probe import PRIMARY_METRIC
from neurocl.probe.command import probes_title
from neurocl.probe.verdicts import few_targets_warning, multiple_testing_note, n_tests, with_verdicts
from neurocl.report.figures import _SUBSET_ORDER, _Figures, _forest_figure, _views_figure
from neurocl.report.render import _Section, _fmt, _rounded
from neurocl.report.runfiles import _RunFiles, _maps_file
from neurocl.seeds import collapse_spread, decodable_counts, probe_spread, run_seeds


_PRIMARY = set(PRIMARY_METRIC.values())
_MAX_EMBEDDING_POINTS = 2000  # t-SNE cost; larger cohorts are subsampled (seeded) for the views only


def _run_section(run: _RunFiles) -> _Section:
    section = _Section("Run")
    rows = [("run directory", str(run.dir)), ("written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]
    if run.config:
        method = run.config.get("method") or {}
        encoder = run.config.get("encoder") or {}
        rows += [("cohort", str(run.config.get("cohort", "n/a"))),
                 ("method", str(method.get("name", "n/a")) if isinstance(method, dict) else str(method)),
                 ("encoder", str(encoder.get("name", "n/a")) if isinstance(encoder, dict) else str(encoder))]
    if run.embeddings is not None:
        spaces = embedding_spaces(run.embeddings)
        rows.append(("embedding spaces", ", ".join(f"{name} ({len(columns)} dims)" for name, columns in spaces.items())))
        if "group" in run.embeddings:
            counts = run.embeddings["group"].fillna("none").value_counts()
            rows.append(("subjects by group", ", ".join(f"{k}: {v}" for k, v in counts.items())))
        if "split" in run.embeddings and run.embeddings["split"].notna().any():
            counts = run.embeddings["split"].fillna("n/a").value_counts()
            rows.append(("rows by split", ", ".join(f"{k}: {v}" for k, v in counts.items())))
    if run.splits is not None:
        column = "split" if "split" in run.splits else "fold" if "fold" in run.splits else None
        if column:
            rows.append((run.folder.splits.name, f"{len(run.splits)} participants, {run.splits[column].nunique()} {column}s"))
    if run.cohort_note:
        rows.append(("note", run.cohort_note))
    section.table(pd.DataFrame(rows, columns=["", "value"]))
    return section


def _probe_section(run: _RunFiles, figures: _Figures) -> _Section | None:
    if run.probes is None:
        return None
    scope = probes_title(run.probes, run.separation)
    section = _Section(f"Probes: which attribute lives in which space ({scope})")
    if _held_out(run.probes):
        section.text(
            f"Linear probes fitted on the encoder's train/val subjects (standardisation and regularisation, by an "
            f"inner CV grouped by participant) and scored on the {scope}, which the encoder never trained on. "
            "Value = test score, [95% bootstrap CI over test participants], p = permutation p-value (test labels "
            "permuted against the fixed predictions), chance = score of a probe that learns nothing. Higher is "
            "better except MAE."
        )
    else:
        section.text(
            f"{scope[0].upper()}{scope[1:]} (evaluation.probe.scope: in_sample_cv). Cross-validated linear probes "
            "(outer folds grouped by participant; standardisation and regularisation fitted on training folds only). "
            "Value = out-of-fold score, [95% bootstrap CI], p = permutation p-value, chance = score of a probe "
            "that learns nothing. Higher is better except MAE."
        )
    warning = _few_targets(run)
    if warning:
        section.text(f"Warning: {warning}.")
    probes = with_verdicts(run.probes[run.probes["metric"] != "none"])
    section.text(multiple_testing_note(n_tests(probes)) + ". " + _REPEATS_NOTE)
    shown = probes[~probes["repeats"]]
    primary = shown[shown["metric"].isin(_PRIMARY)]
    if not primary.empty:
        figures.add(section, _forest_figure(primary, label_column="space"), "probes",
                    "Primary score of each attribute by space and subset (bars: 95% CI; dashed: chance; "
                    "filled: decodable, i.e. CI above chance and adjusted p < 0.05)")
    for attribute, rows in shown.groupby("attribute", sort=False):
        section.table(_probe_table(rows), caption=f"{attribute}: probe of the participants table's '{attribute}' "
                                                  f"column, {scope}")
    if run.truth_probes is not None:
        truth = with_verdicts(run.truth_probes[run.truth_probes["metric"] != "none"])
        section.text("Ground-truth factors (their own table of tests: " +
                     multiple_testing_note(n_tests(truth)) + ").")
        for factor, rows in truth[~truth["repeats"]].groupby("attribute", sort=False):
            section.table(_probe_table(rows), caption=f"ground truth: {factor}, the latent factor of the cohort's "
                                                      "ground_truth.tsv (the generator's value, 0 for every background "
                                                      f"subject), not the participants table's column of that name: {scope}")
    skipped = run.probes[run.probes["metric"] == "none"]
    if not skipped.empty:
        section.table(skipped[["space", "attribute", "subset", "note"]], caption="Skipped combinations")
    return section


_REPEATS_NOTE = ("Subset 'all' is shown only where it differs from 'target': for an attribute recorded for "
                 "target subjects only (n/a for the others) it scores the same subjects")


def _few_targets(run: _RunFiles) -> str | None:
    """The warning for held-out figures over fewer than 20 target test subjects (None otherwise or in-sample)."""
    if not _held_out(run.probes) and (run.separation or {}).get("scope") != "held_out":
        return None
    table = run.embeddings
    if table is not None and {"split", "group", "participant_id"} <= set(table.columns):
        tested = table[table["split"].eq("test") & table["group"].eq("target")]
        return few_targets_warning(int(tested["participant_id"].nunique()))
    collapse = (run.separation or {}).get("background_collapse") or {}
    return few_targets_warning(collapse.get("n_target")) if collapse.get("scope") == "held_out" else None


def _probe_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per subset x metric, one column per space: 'value [low, high] p=... adj. p=...: verdict'."""
    rows = rows.assign(order=rows["subset"].map(_SUBSET_ORDER).fillna(9))
    cells = rows.assign(cell=[_cell(r) for _, r in rows.iterrows()])
    table = cells.pivot_table(index=["order", "subset", "metric", "chance"], columns="space", values="cell", aggfunc="first", sort=False)
    table = table.reset_index().sort_values(["order"], kind="stable").drop(columns="order")
    table["chance"] = table["chance"].map(lambda v: f"{v:.3g}")
    table.columns.name = None
    return table


def _cell(row) -> str:
    if not np.isfinite(row["value"]):
        return "n/a"
    text = f"{row['value']:.3f}".replace("-0.000", "0.000")
    if np.isfinite(row.get("ci_low", np.nan)):
        text += f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
    if np.isfinite(row.get("p_value", np.nan)):
        text += f" p={row['p_value']:.3f}"
    if np.isfinite(row.get("p_adjusted", np.nan)):
        text += f" adj. p={row['p_adjusted']:.3f}"
    if row.get("verdict"):
        text += f": {row['verdict']}"
    return text


def _separation_section(run: _RunFiles) -> _Section | None:
    if run.separation is None:
        return None
    scope = _separation_scope(run.separation)
    section = _Section(f"Separation ({scope})")
    warning = _few_targets(run)
    if warning:
        section.text(f"Warning: {warning}.")
    table = _decodability_table(run.separation)
    if not table.empty:
        section.table(table, caption=(
            f"Attributes of the participants table, {scope}: primary probe score per attribute and subset in each "
            "space ([95% CI], adj. p: Benjamini-Hochberg across every primary test of probes.tsv) and its verdict: "
            "decodable (CI above chance and adj. p < 0.05), not decodable (CI below chance + 0.1) or inconclusive. "
            "A clean separation: common attributes (age, sex, site) decodable from common only; target-only "
            "attributes (subtype, severity) and group from salient. " + _REPEATS_NOTE + "."
        ))
    collapse = run.separation.get("background_collapse")
    if collapse:
        section.table(pd.DataFrame([(k, _fmt(v)) for k, v in collapse.items()], columns=["background collapse", "value"]),
                      caption=(f"Background collapse ({_collapse_scope(collapse)}): background subjects should sit near the salient origin "
                               "(norm ratio << 1; norm AUC and probe AUC near 1)."))
    truth = run.separation.get("ground_truth")
    if truth:
        for subset, spaces in truth.get("r2", {}).items():
            frame = pd.DataFrame(spaces).rename_axis("factor").reset_index()
            section.table(_rounded(frame), caption=(
                f"Ground truth ({scope}): R² of a ridge probe of each latent factor of ground_truth.tsv from each space "
                f"({subset} subjects; no CI or permutation test). These are the generator's factors, not the "
                "participants table's columns above" + (
                    ": a target-only factor such as severity is 0 for every background subject, so over all "
                    "subjects its R² also counts telling the groups apart" if subset == "all" else "")))
        clustering = _clustering_table(truth.get("clustering") or {})
        if not clustering.empty:
            section.table(clustering, caption=f"Ground truth by clustering: k-means with k = the true number of "
                                              f"subtypes on the coordinates of the target subjects among the {scope}, "
                                              "adjusted Rand index and normalised mutual information against the "
                                              "true labels (a probe can be high where ARI is 0)")
        mcc = truth.get("mcc") or {}
        if mcc:
            frame = pd.DataFrame([{"space": space, **{k: _fmt(v) for k, v in values.items()}} for space, values in mcc.items()])
            section.table(frame, caption=f"Mean correlation coefficient ({scope}; Hungarian matching of dimensions to "
                                         "continuous factors on the fitting subjects)")
    return section


def _decodability_table(result: dict) -> pd.DataFrame:
    """The separation result's attributes: one row per attribute x subset (repeated subsets left out), one cell per space."""
    rows = []
    for attribute, subsets in (result.get("attributes") or {}).items():
        for subset, entry in subsets.items():
            if entry.get("same_subjects_as"):
                continue
            row = {"attribute": attribute, "subset": subset, "metric": entry["metric"], "chance": _fmt(entry["chance"])}
            for space, values in entry["spaces"].items():
                low, high = (np.nan if bound is None else bound for bound in values.get("ci") or (None, None))
                row[space] = _cell({"value": np.nan if values["value"] is None else values["value"],
                                    "ci_low": low, "ci_high": high,
                                    "p_value": np.nan if values["p_value"] is None else values["p_value"],
                                    "p_adjusted": np.nan if values.get("p_adjusted") is None else values["p_adjusted"],
                                    "verdict": values.get("verdict", "")})
            row["decodable from"] = ", ".join(entry["decodable_from"]) or "none"
            rows.append(row)
    return pd.DataFrame(rows)


def _clustering_table(clustering: dict) -> pd.DataFrame:
    """One row per subtype-like factor and score (ARI, NMI), one column per space."""
    rows = []
    for factor, entry in clustering.items():
        for score in ("ari", "nmi"):
            row = {"factor": factor, "score": score.upper(), "k": entry.get("k"), "n": entry.get("n")}
            row.update({space: _fmt(values[score]) for space, values in (entry.get("spaces") or {}).items()})
            if "note" in entry:
                row["note"] = entry["note"]
            rows.append(row)
    return pd.DataFrame(rows)


def _floor_section(run: _RunFiles) -> _Section | None:
    """Every headline figure of the run's spaces beside the best linear baseline's, on the same test subjects."""
    linear = [name for name in run.baselines if name in LINEAR_BASELINES]
    if run.probes is None or not linear:
        return None
    section = _Section("Against the linear floor")
    section.text(
        f"Each primary score of the run's spaces beside the best of the linear baselines ({', '.join(linear)}; "
        "every space of each), scored with the same probes on the same subjects (n: the run's scored rows, and the "
        "linear baselines' where they differ). lin2 is the linear two-space model: common = PCA of the training "
        "controls, salient = contrastive PCA. A space that does not beat the best linear figure has learnt nothing "
        "a linear decomposition of the voxels does not give."
    )
    sources = [("", run.probes, run.baselines)]
    if run.truth_probes is not None:
        sources.append((" (truth)", run.truth_probes, run.baseline_truth_probes))
    rows = []
    for suffix, own, baselines in sources:
        frames = [probes.assign(model=probes["space"].map(lambda s, name=name: name if s == "emb" else f"{name} {s}"))
                  for name, probes in baselines.items() if name in linear and probes is not None]
        floor = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["attribute"])
        floor = floor[floor["metric"].isin(_PRIMARY)] if frames else floor
        own = with_verdicts(own)
        primary = own[own["metric"].isin(_PRIMARY) & ~own["repeats"]]
        for (attribute, subset), scored in primary.groupby(["attribute", "subset"], sort=False):
            rows.append(_floor_row(f"{attribute}{suffix}", subset, scored, floor[(floor["attribute"] == attribute)
                                                                                & (floor["subset"] == subset)]))
    if rows:
        section.table(pd.DataFrame(rows).fillna(""), caption=f"Primary probe scores against the linear floor "
                                                             f"({probes_title(run.probes, run.separation)})")
    clustering = _floor_clustering(run, linear)
    if not clustering.empty:
        section.table(clustering.fillna(""), caption="Subtype recovery by clustering against the linear floor "
                                                     "(k-means, k = the true number of subtypes; ARI and NMI)")
    return section


def _floor_row(attribute: str, subset: str, scored: pd.DataFrame, floor: pd.DataFrame) -> dict:
    row = {"attribute": attribute, "subset": subset, "metric": scored["metric"].iloc[0],
           "chance": _fmt(scored["chance"].iloc[0])}
    row.update({space: _fmt(value) for space, value in zip(scored["space"], scored["value"])})
    finite = floor[np.isfinite(floor["value"].astype(float))]
    if not finite.empty:
        best = finite.loc[finite["value"].astype(float).idxmax()]
        row["best linear"] = f"{_fmt(best['value'])} ({best['model']})"
    for model in ("lin2 common", "lin2 salient"):
        match = floor[floor["model"] == model] if "model" in floor else floor.iloc[:0]
        if not match.empty:
            row[model] = _fmt(match["value"].iloc[0])
    row["n"] = str(int(scored["n"].iloc[0])) if np.isfinite(scored["n"].iloc[0]) else "n/a"
    other = sorted({int(n) for n in floor.get("n", pd.Series(dtype=float)).dropna()} - {int(scored["n"].iloc[0])})
    if other:
        row["n"] += f" (linear: {', '.join(map(str, other))})"
    return row


def _floor_clustering(run: _RunFiles, linear: list[str]) -> pd.DataFrame:
    own = ((run.separation or {}).get("ground_truth") or {}).get("clustering") or {}
    rows = []
    for factor, entry in own.items():
        if not entry.get("spaces"):
            continue
        for score in ("ari", "nmi"):
            row = {"factor": factor, "score": score.upper(), "k": entry["k"], "n": entry["n"]}
            row.update({space: _fmt(values[score]) for space, values in entry["spaces"].items()})
            floor = {}
            for name in linear:
                theirs = (((run.baseline_separations.get(name) or {}).get("ground_truth") or {}).get("clustering")
                          or {}).get(factor) or {}
                for space, values in (theirs.get("spaces") or {}).items():
                    floor[name if space == "emb" else f"{name} {space}"] = values[score]
            if floor:
                best = max(floor, key=floor.get)
                row["best linear"] = f"{_fmt(floor[best])} ({best})"
            row.update({model: _fmt(floor[model]) for model in ("lin2 common", "lin2 salient") if model in floor})
            rows.append(row)
    return pd.DataFrame(rows)


def _held_out(probes: pd.DataFrame | None) -> bool:
    """Whether every figure of a probes.tsv is held out (older runs without a ``scope`` column were in-sample)."""
    return probes is not None and "scope" in probes.columns and set(probes["scope"].dropna()) == {"held_out"}


def _separation_scope(result: dict) -> str:
    """'held-out test subjects (n=...)', or the in-sample label (files of older runs have no scope: in-sample)."""
    if result.get("scope") == "held_out":
        n = result.get("n_test_subjects")
        return "held-out test subjects" + (f" (n={n})" if n is not None else "")
    return "in-sample: every subject, the encoder's training subjects included"


def _collapse_scope(collapse: dict) -> str:
    counts = f"n={collapse.get('n_background')} background, {collapse.get('n_target')} target"
    if collapse.get("scope") == "held_out":
        return f"held-out test subjects, {counts}"
    return "in-sample: every subject" + (f", {counts}" if "n_target" in collapse else "")


def _seeds_section(run: _RunFiles) -> _Section | None:
    if len(run.seed_probes) < 2 and len(run.seed_separations) < 2:
        return None
    seeds = sorted(set(run.seed_probes) | set(run.seed_separations), key=run_seeds(run.config).index)
    section = _Section("Spread over training seeds")
    section.text(
        f"One model per training seed ({', '.join(map(str, seeds))}; the first is the primary model every other "
        "section shows), all trained and scored on the same split. mean ± sd: sample standard deviation over "
        "seeds; per seed: each model's own figure. Maps are drawn for the primary model only. Figures on the "
        f"{_separation_scope(run.separation or {})}."
    )
    probes = probe_spread(run.seed_probes)
    if not probes.empty:
        probes = probes.assign(value=[_spread_cell(r) for _, r in probes.iterrows()])
        section.table(probes[["attribute", "subset", "space", "metric", "value", "per_seed"]],
                      caption="Primary probe score of each attribute in each space over seeds (mean ± sd, per seed)")
    if run.seed_separations:
        counts = decodable_counts(run.seed_separations)
        if not counts.empty:
            section.table(counts, caption="Separation: in how many seeds each attribute is decodable from each space "
                                          "(95% CI above chance and adjusted p < 0.05 in that seed's probes)")
        collapse = collapse_spread(run.seed_separations)
        if not collapse.empty:
            collapse = collapse.assign(value=[_spread_cell(r) for _, r in collapse.iterrows()])
            section.table(collapse[["figure", "value", "per_seed"]], caption="Background collapse over seeds (mean ± sd, per seed)")
    return section


def _spread_cell(row) -> str:
    if not np.isfinite(row["mean"]):
        return "n/a"
    return f"{row['mean']:.3f}" + (f" ± {row['sd']:.3f}" if np.isfinite(row["sd"]) else "") + f" (n={row['n_seeds']})"


def _training_section(run: _RunFiles, figures: _Figures) -> _Section | None:
    metrics = run.metrics
    if metrics is None or metrics.empty:
        return None
    import matplotlib.pyplot as plt

    terms = sorted({column.split("/", 1)[1] for column in metrics.columns if "/" in column and metrics[column].notna().any()},
                   key=lambda term: (term != "loss", term))
    if not terms:
        return None
    section = _Section("Training curves")
    x_name = "step" if "step" in metrics else metrics.columns[0]
    n_columns = min(3, len(terms))
    n_rows = int(np.ceil(len(terms) / n_columns))
    figure, axes = plt.subplots(n_rows, n_columns, figsize=(3.4 * n_columns, 2.6 * n_rows), squeeze=False, layout="constrained")
    for axis, term in zip(axes.flat, terms):
        for stage, style in (("train", "-"), ("val", "o-")):
            column = f"{stage}/{term}"
            if column in metrics and metrics[column].notna().any():
                values = metrics[[x_name, column]].dropna()
                axis.plot(values[x_name], values[column], style, ms=3, label=stage)
        axis.set_title(term)
        axis.set_xlabel(x_name)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(terms):]:
        axis.set_visible(False)
    figures.add(section, figure, "training_curves", "Loss terms per optimisation step (train) and per validation")
    last = {column: metrics[column].dropna().iloc[-1] for column in metrics.columns if "/" in column and metrics[column].notna().any()}
    section.table(pd.DataFrame([(k, _fmt(v)) for k, v in last.items()], columns=["term", "last value"]))
    return section


def _embedding_section(run: _RunFiles, figures: _Figures) -> _Section | None:
    if run.embeddings is None:
        return None
    spaces = embedding_spaces(run.embeddings)
    if not spaces:
        return None
    section = _Section("Embedding views")
    table = _colour_table(run)
    if len(table) > _MAX_EMBEDDING_POINTS:
        table = table.sample(_MAX_EMBEDDING_POINTS, random_state=0)
        section.text(f"{_MAX_EMBEDDING_POINTS} randomly drawn rows are shown.")
    colourings = [c for c in ("group", "diagnosis", "subtype", "age", "site") if c in table and table[c].notna().any()]
    section.text("Each row: one space; each column: one colouring. PCA keeps global distances; t-SNE keeps neighbourhoods "
                 "(its distances between clusters mean little).")
    for projection in ("PCA", "t-SNE"):
        figure = _views_figure(table, spaces, colourings, projection)
        figures.add(section, figure, f"embedding_{projection.lower().replace('-', '')}",
                    f"{projection} of each space, coloured by {', '.join(colourings)}")
    return section


def _colour_table(run: _RunFiles) -> pd.DataFrame:
    table = run.embeddings.copy()
    keys = ["participant_id"] + (["session_id"] if "session_id" in table and run.cohort_table is not None
                                 and "session_id" in run.cohort_table else [])
    if run.cohort_table is not None:
        extra = [c for c in ("diagnosis", "age", "site") if c in run.cohort_table and c not in table]
        table = table.merge(run.cohort_table[keys + extra].astype({k: str for k in keys}), on=keys, how="left")
    if run.ground_truth is not None and "subtype" in run.ground_truth:
        truth = run.ground_truth[["participant_id", "subtype"]].drop_duplicates("participant_id")
        table = table.merge(truth.astype({"participant_id": str}), on="participant_id", how="left")
        table["subtype"] = table["subtype"].map(lambda v: "n/a" if pd.isna(v) else f"true {int(v)}" if float(v).is_integer() else str(v))
    elif run.clusters is not None and "cluster" in run.clusters:
        clusters = run.clusters[[c for c in keys if c in run.clusters] + ["cluster"]].astype({"participant_id": str})
        table = table.merge(clusters, on=[c for c in keys if c in clusters], how="left")
        table["subtype"] = table["cluster"].map(lambda v: "background/none" if pd.isna(v) else f"cluster {int(v)}")
    return table


def _baseline_section(run: _RunFiles, figures: _Figures) -> _Section | None:
    if not run.baselines:
        return None
    section = _Section("Baseline comparison")
    scope = probes_title(next(iter(run.baselines.values())), run.separation)
    section.text("The same probes (same settings, folds and seeds) on each baseline's embeddings, next to the "
                 f"run's own spaces (labelled '{run.method}: <space>'); figures on the {scope}.")
    frames = []
    # Each model's verdicts come from its own table of tests (its probes.tsv), as in its own report.
    if run.probes is not None:
        frames.append(with_verdicts(run.probes).assign(model=run.probes["space"].map(lambda s: f"{run.method}: {s}")))
    for name, probes in run.baselines.items():
        frames.append(with_verdicts(probes).assign(
            model=probes["space"].map(lambda s, name=name: name if s == "emb" else f"{name}: {s}")))
    combined = pd.concat(frames, ignore_index=True)
    primary = combined[combined["metric"].isin(_PRIMARY) & ~combined["repeats"].astype(bool)]
    if not primary.empty:
        figures.add(section, _forest_figure(primary, label_column="model"), "baselines",
                    "Primary score of each attribute for every model (bars: 95% CI; dashed: chance; filled: decodable, "
                    "i.e. CI above chance and p adjusted across that model's tests < 0.05)")
    for attribute, rows in primary.groupby("attribute", sort=False):
        table = rows.assign(order=rows["subset"].map(_SUBSET_ORDER).fillna(9), cell=[_cell(r) for _, r in rows.iterrows()])
        table = table.pivot_table(index=["order", "subset"], columns="model", values="cell", aggfunc="first", sort=False)
        table = table.reset_index().sort_values("order", kind="stable").drop(columns="order").set_index("subset").T
        table.columns.name = None
        section.table(table.rename_axis("model").reset_index(), caption=f"{attribute} ({rows['metric'].iloc[0]})")
    return section


def _maps_scope(config: dict | None) -> str:
    """Which subjects the maps and clusters were computed on (``maps.split``): in-sample unless ``test``."""
    split = ((config or {}).get("maps") or {}).get("split", "all")
    if split == "test":
        return "held-out test subjects"
    return f"in-sample: maps.split {split}, the encoder's training subjects included"


def _maps_section(run: _RunFiles, figures: _Figures) -> _Section | None:
    if all(v is None for v in (run.maps_index, run.subtypes, run.evaluation, run.associations)):
        return None
    section = _Section("Maps and subtypes")
    if run.subtypes:
        summary = {k: v for k, v in run.subtypes.items() if not isinstance(v, (list, dict)) or k in ("cluster_sizes", "stability_ci")}
        null_test = run.subtypes.get("one_cluster_test")
        if isinstance(null_test, dict):
            summary["one-cluster test p"] = null_test.get("p_value")
        section.table(pd.DataFrame([(k, _fmt(v)) for k, v in summary.items()], columns=["subtypes", "value"]),
                      caption=f"Subtypes ({_maps_scope(run.config)}): clusters of target subjects in salient space (k chosen by the criterion; "
                              "k = 1, no subtypes, unless the one-cluster gap test rejects it; "
                              "stability = bootstrap agreement, undefined for k = 1).")
        stability = run.subtypes.get("stability")
        if isinstance(stability, (int, float)) and stability < STABILITY_CAUTION:
            section.text(f"Caution: subtype stability {stability:.2f} is below {STABILITY_CAUTION}: the clusters "
                         "hinge on a few subjects; do not read them as subtypes without a second seed or more subjects.")
        if run.seed_consensus:
            consensus = run.seed_consensus
            rows = [("seeds", ", ".join(map(str, consensus.get("seeds", [])))),
                    ("k per seed", ", ".join(f"{s}: {k}" for s, k in (consensus.get("n_clusters") or {}).items())),
                    ("mean pairwise ARI between seeds", _fmt(consensus.get("mean_pairwise_ari"))),
                    ("unanimous pair fraction", _fmt(consensus.get("unanimous_pair_fraction"))),
                    ("bootstrap stability (primary seed)", _fmt(run.subtypes.get("stability")))]
            section.table(pd.DataFrame(rows, columns=["subtypes across training seeds", "value"]),
                          caption="Subtype stability across training seeds: each seed's model clusters the same target "
                                  "subjects in its own salient space; agreement = adjusted Rand index between seeds' "
                                  "partitions and the share of subject pairs every seed puts together or apart "
                                  "(co-clustering consensus), beside the primary model's bootstrap stability.")
        scores = run.subtypes.get("scores")
        if isinstance(scores, list) and scores:
            section.table(_rounded(pd.DataFrame(scores)), caption="Score per number of clusters")
    if run.evaluation:
        rows = [(k, _fmt(v)) for k, v in run.evaluation.items() if not isinstance(v, (list, dict))]
        if rows:
            section.table(pd.DataFrame(rows, columns=["evaluation", "value"]), caption=f"Against the ground truth ({_maps_scope(run.config)})")
        summary = run.evaluation.get("summary")
        if isinstance(summary, dict) and summary:
            nulls = run.evaluation.get("null_references") or []
            caption = "Map AUC against the true subtype regions (mean over subtypes)"
            if nulls:
                caption += (f", beside the same method on {', '.join(nulls)} network(s) of the same architecture; "
                            f"passes: trained − untrained ≥ {run.evaluation.get('pass_margin', 0.1):g} "
                            "and above any other null")
            else:
                caption += "; no null network was scored, so these AUCs say nothing about learning"
            section.table(_rounded(pd.DataFrame(summary).T.rename_axis("method").reset_index()), caption=caption)
    if run.associations is not None and not run.associations.empty:
        section.table(_rounded(run.associations), caption="Cluster associations with clinical attributes (FDR-corrected p)")
    if run.maps_index is not None:
        for _, row in run.maps_index.iterrows():
            png = _maps_file(run, row.get("png"))
            if png is None:
                continue
            caption = f"{row.get('method', '')} map, {row.get('group', '')} (n={row.get('n_subjects', 'n/a')})"
            if isinstance(row.get("peak_mm"), str):
                where = row["peak_region"] if isinstance(row.get("peak_region"), str) else "no atlas region"
                caption += f"; cut at the map's peak ({row['peak_mm']}) mm, in {where}"
            if isinstance(row.get("top_region"), str):
                caption += f"; top region by mean relevance: {row['top_region']}"
            figures.embed_file(section, png, caption)
            section.md[-1] = f"![{caption}]({png.relative_to(run.dir).as_posix()})"
    return section
