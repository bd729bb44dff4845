"""The run report: report.html (self-contained, images embedded) and report.md, from a run directory.

:func:`write_report` reads whatever stage outputs exist in the run directory and writes one
section per output it finds (what each number means: ``docs/probing.md``):

========================  ===================================================================
section                   read from
========================  ===================================================================
Run                       ``config.yaml``, ``splits.tsv``, ``embeddings.tsv``
Probes: common vs salient ``probes.tsv`` (one figure and one table per attribute)
Separation                ``separation.json``
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
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from neurocl.cohort import Cohort
from neurocl.embed import embedding_spaces
from neurocl.errors import ConfigError, NeuroclError
from neurocl.io import atomic_path, load_yaml, read_tsv, write_text
from neurocl.maps.subtypes import STABILITY_CAUTION
from neurocl.probe import PRIMARY_METRIC, separation_table
from neurocl.probe.command import probes_title
from neurocl.seeds import collapse_spread, decodable_counts, probe_spread, run_seeds, seed_files
from neurocl.rundir import RunDir
_PRIMARY = set(PRIMARY_METRIC.values())
_SUBSET_ORDER = {"all": 0, "target": 1, "background": 2}
_MAX_EMBEDDING_POINTS = 2000  # t-SNE cost; larger cohorts are subsampled (seeded) for the views only


@dataclass
class _Section:
    title: str
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)

    def text(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md.append(text)

    def table(self, table: pd.DataFrame, caption: str | None = None) -> None:
        if caption:
            self.text(caption)
        self.html.append(_html_table(table))
        self.md.append(_md_table(table))


class _Figures:
    """Saves each figure as PNG (report_files/) and hands back its base64 for the HTML."""

    def __init__(self, run: RunDir) -> None:
        self.folder = run.report_figures
        self.names: set[str] = set()

    def add(self, section: _Section, figure, name: str, caption: str) -> None:
        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=90)
        plt.close(figure)
        data = buffer.getvalue()
        with atomic_path(self.folder / f"{name}.png") as tmp:
            tmp.write_bytes(data)
        self.names.add(f"{name}.png")
        encoded = base64.b64encode(data).decode("ascii")
        section.html.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
        section.md.append(f"![{caption}]({self.folder.name}/{name}.png)")

    def embed_file(self, section: _Section, path: Path, caption: str) -> None:
        """An existing PNG (maps): embedded in the HTML, linked from the Markdown by its run-relative path."""
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        section.html.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
        section.md.append(f"![{caption}]({path.as_posix()})")


# ----------------------------------------------------------------------------- entry point


def write_report(run_dir) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` in ``run_dir`` from the stage outputs found there.

    Parameters
    ----------
    run_dir : path
        A run directory (``neurocl run`` output), or any folder holding some of its files
        (e.g. a ``neurocl probe`` output folder with probes.tsv and separation.json).

    Returns
    -------
    (html_path, md_path)

    Raises
    ------
    ConfigError
        When the folder does not exist or holds none of the files a report is made from.
    """
    import matplotlib

    matplotlib.use("Agg")
    folder = RunDir(run_dir)
    if not folder.path.is_dir():
        raise ConfigError(f"report: no folder {folder.path}")
    run = _RunFiles(folder)
    if not run.any():
        raise ConfigError(
            f"report: {folder.path} holds none of embeddings.tsv, probes.tsv, separation.json, logs/metrics.csv, baselines/, maps/"
        )
    figures = _Figures(folder)
    sections = [
        section
        for section in (
            _run_section(run),
            _probe_section(run, figures),
            _separation_section(run),
            _seeds_section(run),
            _training_section(run, figures),
            _embedding_section(run, figures),
            _baseline_section(run, figures),
            _maps_section(run, figures),
        )
        if section is not None
    ]
    title = f"neurocl report: pipeline '{run.name}' on cohort '{run.cohort_name}'"
    html_path = write_text(folder.report_html, _render_html(title, sections))
    md_path = write_text(folder.report_md, _render_md(title, sections))
    _remove_stale_figures(figures)
    return html_path, md_path


def _cohort_name(spec_path) -> str:
    """The ``name`` of the run's cohort spec, or its file name when the spec is gone or unnamed."""
    if not spec_path:
        return "unknown"
    try:
        spec = load_yaml(Path(spec_path), ConfigError, "cohort spec")
    except ConfigError:
        spec = None  # only a display name is wanted here: the file name stands in
    name = spec.get("name") if isinstance(spec, dict) else None
    return str(name) if name else Path(spec_path).name


class _RunFiles:
    """The run directory's files, each read once (None when absent)."""

    def __init__(self, folder: RunDir) -> None:
        self.dir = folder.path
        self.folder = folder
        self.config = folder.read_config_dict()
        self.name = str(self.config.get("name", folder.path.name)) if self.config else folder.path.name
        self.cohort_name = _cohort_name((self.config or {}).get("cohort"))
        method = (self.config or {}).get("method")
        self.method = str(method.get("name", "run")) if isinstance(method, dict) else "run"
        self.embeddings = _read_table(folder.embeddings)
        self.probes = _read_table(folder.probes)
        self.splits = _read_table(folder.splits)
        self.separation = _read_json(folder.separation)
        self.metrics = _read_table(folder.metrics, sep=",")
        self.baselines = {
            name: _read_table(folder.baseline(name).probes)
            for name in folder.baseline_names()
            if folder.baseline(name).probes.is_file()
        }
        maps = folder.maps
        self.maps_dir = maps.path
        self.maps_index = _read_table(maps.index)
        self.subtypes = _read_json(maps.subtypes)
        self.evaluation = _read_json(maps.evaluation)
        self.associations = _read_table(maps.associations)
        self.clusters = _read_table(maps.clusters)
        self.seed_consensus = _read_json(maps.seed_consensus)
        self.seed_probes, self.seed_separations = seed_files(folder, self.config)
        self.cohort_table, self.ground_truth, self.cohort_note = _cohort_tables(self.config, folder.path)

    def any(self) -> bool:
        return any(
            value is not None
            for value in (self.embeddings, self.probes, self.separation, self.metrics, self.maps_index, self.subtypes)
        ) or bool(self.baselines)


def _read_table(path: Path, sep: str = "\t") -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return read_tsv(path) if sep == "\t" else pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ConfigError(f"report: cannot read {path} ({error})") from None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"report: cannot read {path} ({error})") from None


def _cohort_tables(config: dict | None, run_dir: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None, str]:
    """The cohort named by config.yaml (attributes and raw group labels, for colouring) and ground_truth.tsv beside it."""
    if not config or not config.get("cohort"):
        return None, None, ""
    cohort_yaml = Path(config["cohort"])
    if not cohort_yaml.is_absolute() and not cohort_yaml.is_file():
        cohort_yaml = run_dir / cohort_yaml
    if not cohort_yaml.is_file():
        return None, None, f"cohort {cohort_yaml} not found: views coloured by group only"
    try:
        cohort = Cohort.from_yaml(cohort_yaml)
    except NeuroclError as error:
        return None, None, f"cohort {cohort_yaml} unreadable ({error}): views coloured by group only"
    keys = cohort.keys().astype(str)
    table = pd.concat([keys, cohort.table.drop(columns=list(keys.columns))], axis=1)
    # The raw group labels (e.g. control / patient), from the TSV line each cohort row came from.
    participants = Path(cohort.spec.participants)
    participants = participants if participants.is_absolute() else cohort_yaml.parent / participants
    raw = _read_table(participants) if participants.is_file() else None
    column = cohort.spec.group.column
    if raw is not None and column in raw.columns and "row" in table:
        lines = pd.to_numeric(table["row"], errors="coerce") - 2  # header = line 1
        valid = lines.between(0, len(raw) - 1)
        table["diagnosis"] = np.where(valid, raw[column].astype(str).reindex(lines.fillna(-1).astype(int)).to_numpy(), None)
    truth_path = cohort_yaml.parent / "ground_truth.tsv"
    return table, _read_table(truth_path) if truth_path.is_file() else None, ""


# ----------------------------------------------------------------------------- sections


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
    probes = run.probes[run.probes["metric"] != "none"]
    primary = probes[probes["metric"].isin(_PRIMARY)]
    if not primary.empty:
        figures.add(section, _forest_figure(primary, label_column="space"), "probes",
                    "Primary score of each attribute by space and subset (bars: 95% CI; dashed: chance; filled: p < 0.05)")
    for attribute, rows in probes.groupby("attribute", sort=False):
        section.table(_probe_table(rows), caption=f"{attribute}: {scope}")
    skipped = run.probes[run.probes["metric"] == "none"]
    if not skipped.empty:
        section.table(skipped[["space", "attribute", "subset", "note"]], caption="Skipped combinations")
    return section


def _probe_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per subset x metric, one column per space: 'value [low, high] p=...'."""
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
    text = f"{row['value']:.3f}"
    if np.isfinite(row.get("ci_low", np.nan)):
        text += f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
    if np.isfinite(row.get("p_value", np.nan)):
        text += f" p={row['p_value']:.3f}"
    return text


def _forest_figure(rows: pd.DataFrame, label_column: str):
    """Dot-and-whisker plots, one panel per attribute: a row per (label, subset), x = score, dashed = chance."""
    import matplotlib.pyplot as plt

    attributes = list(dict.fromkeys(rows["attribute"]))
    heights = [0.28 * len(rows[rows["attribute"] == a]) + 0.9 for a in attributes]
    n_columns = 1 if len(attributes) == 1 else 2
    n_rows = int(np.ceil(len(attributes) / n_columns))
    row_heights = [max(heights[i:i + n_columns]) for i in range(0, len(attributes), n_columns)]
    figure, axes = plt.subplots(n_rows, n_columns, figsize=(5.2 * n_columns, sum(row_heights)), squeeze=False,
                                layout="constrained", gridspec_kw={"height_ratios": row_heights})
    colours = {subset: f"C{i}" for i, subset in enumerate(_SUBSET_ORDER)}
    for axis, attribute in zip(axes.flat, attributes):
        panel = rows[rows["attribute"] == attribute]
        panel = panel.assign(order=panel["subset"].map(_SUBSET_ORDER).fillna(9)).sort_values(["order", label_column], kind="stable")
        y = np.arange(len(panel))[::-1]
        for yi, (_, row) in zip(y, panel.iterrows()):
            colour = colours.get(row["subset"], "C9")
            if np.isfinite(row["ci_low"]):
                axis.plot([row["ci_low"], row["ci_high"]], [yi, yi], color=colour, lw=2)
            significant = np.isfinite(row["p_value"]) and row["p_value"] < 0.05
            axis.plot(row["value"], yi, "o", color=colour, mfc=colour if significant else "white", ms=6)
        for chance in panel["chance"].dropna().unique():
            axis.axvline(chance, color="grey", ls="--", lw=1)
        axis.set_yticks(y, [f"{label} | {subset}" for label, subset in zip(panel[label_column], panel["subset"])], fontsize=8)
        axis.set_title(f"{attribute} ({panel['metric'].iloc[0]})", fontsize=9)
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(axis="x", alpha=0.3)
    for axis in list(axes.flat)[len(attributes):]:
        axis.set_visible(False)
    return figure


def _separation_section(run: _RunFiles) -> _Section | None:
    if run.separation is None:
        return None
    scope = _separation_scope(run.separation)
    section = _Section(f"Separation ({scope})")
    table = separation_table(run.separation)
    if not table.empty:
        section.table(_rounded(table), caption=(
            f"{scope}: primary probe score per attribute and subset in each space, and the spaces it is decodable from "
            "(p < 0.05 and above chance). A clean separation: common attributes (age, sex, site) decodable from "
            "common only; target-only attributes (subtype, severity) and group from salient."
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
            section.table(_rounded(frame), caption=f"Ground truth ({scope}): R² of each latent factor from each space ({subset} subjects)")
        mcc = truth.get("mcc") or {}
        if mcc:
            frame = pd.DataFrame([{"space": space, **{k: _fmt(v) for k, v in values.items()}} for space, values in mcc.items()])
            section.table(frame, caption=f"Mean correlation coefficient ({scope}; Hungarian matching of dimensions to "
                                         "continuous factors on the fitting subjects)")
    return section


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
                                          "(p < 0.05 and above chance)")
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


def _projection(values: np.ndarray, method: str) -> np.ndarray | None:
    """2-D coordinates of the rows of ``values``, or None when the space has collapsed.

    A collapsed space (every subject at one point, up to float noise) is common early in
    training or in a salient space that has learnt nothing; standardising it would blow
    float noise up into a fake structure, and t-SNE's PCA initialisation of coincident points
    is NaN, on which scikit-learn's Barnes-Hut tree segfaults.
    """
    scale = np.abs(values).max() + 1e-12
    spread = values.std(0)
    varying = spread > 1e-5 * scale
    if not varying.any():
        return None
    values = (values[:, varying] - values[:, varying].mean(0)) / spread[varying]
    if values.shape[1] < 2:
        return np.column_stack([values[:, 0], np.zeros(len(values))])
    if method == "PCA":
        return PCA(2, random_state=0).fit_transform(values)
    perplexity = float(min(30, max(2, (len(values) - 1) // 3)))
    return TSNE(2, perplexity=perplexity, init="pca", max_iter=500, random_state=0).fit_transform(values)


def _views_figure(table: pd.DataFrame, spaces: dict, colourings: list[str], method: str):
    import matplotlib.pyplot as plt

    n_columns = max(1, len(colourings))
    figure, axes = plt.subplots(len(spaces), n_columns, figsize=(2.2 * n_columns + 0.6, 2.3 * len(spaces)), squeeze=False,
                                layout="constrained")
    for row, (space, columns) in enumerate(spaces.items()):
        values = table[columns].to_numpy(dtype=np.float64)
        finite = np.isfinite(values).all(1)
        coordinates = np.full((len(values), 2), np.nan)
        collapsed = False
        if finite.sum() > 3:
            projected = _projection(values[finite], method)
            collapsed = projected is None
            coordinates[finite] = 0.0 if collapsed else projected
        for column, colouring in enumerate(colourings or ["none"]):
            axis = axes[row, column]
            _scatter(axis, coordinates, table[colouring] if colouring in table else None)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(colouring, fontsize=9)
            if column == 0:
                axis.set_ylabel(f"{space} ({method})", fontsize=9)
            if collapsed:
                axis.text(0.5, 0.9, "collapsed: all subjects at one point", transform=axis.transAxes,
                          ha="center", fontsize=7)
    return figure


def _scatter(axis, coordinates, values) -> None:
    if values is None:
        axis.scatter(coordinates[:, 0], coordinates[:, 1], s=6)
        return
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().sum() == values.notna().sum() and numeric.nunique() > 8:
        points = axis.scatter(coordinates[:, 0], coordinates[:, 1], c=numeric, s=6, cmap="viridis")
        axis.figure.colorbar(points, ax=axis, fraction=0.046, pad=0.02)
        return
    labels = values.astype(object).where(values.notna(), "n/a").astype(str)
    for index, label in enumerate(sorted(labels.unique())):
        chosen = (labels == label).to_numpy()
        axis.scatter(coordinates[chosen, 0], coordinates[chosen, 1], s=6, color=f"C{index % 10}", label=label)
    axis.legend(fontsize=6, markerscale=1.5, loc="best", frameon=False)


def _baseline_section(run: _RunFiles, figures: _Figures) -> _Section | None:
    if not run.baselines:
        return None
    section = _Section("Baseline comparison")
    scope = probes_title(next(iter(run.baselines.values())), run.separation)
    section.text("The same probes (same settings, folds and seeds) on each baseline's embeddings, next to the "
                 f"run's own spaces (labelled '{run.method}: <space>'); figures on the {scope}.")
    frames = []
    if run.probes is not None:
        frames.append(run.probes.assign(model=run.probes["space"].map(lambda s: f"{run.method}: {s}")))
    for name, probes in run.baselines.items():
        frames.append(probes.assign(model=probes["space"].map(lambda s, name=name: name if s == "emb" else f"{name}: {s}")))
    combined = pd.concat(frames, ignore_index=True)
    primary = combined[combined["metric"].isin(_PRIMARY)]
    if not primary.empty:
        figures.add(section, _forest_figure(primary, label_column="model"), "baselines",
                    "Primary score of each attribute for every model (bars: 95% CI; dashed: chance; filled: p < 0.05)")
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


def _maps_file(run: _RunFiles, name) -> Path | None:
    if not isinstance(name, str) or not name:
        return None
    for base in (run.maps_dir, run.dir):
        candidate = (base / name).resolve()
        if candidate.is_file() and candidate.is_relative_to(run.dir.resolve()):
            return candidate
    return None


# ----------------------------------------------------------------------------- rendering


_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 1100px; margin: 1.5em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .82em; max-width: 100%; table-layout: auto; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; overflow-wrap: anywhere; word-break: break-word; }
th { background: #f4f4f4; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; } figcaption { font-size: .85em; color: #555; }
nav a { margin-right: 1em; }
"""


def _render_html(title: str, sections: list[_Section]) -> str:
    anchors = [_slug(section.title) for section in sections]
    nav = " ".join(f'<a href="#{a}">{html.escape(s.title)}</a>' for a, s in zip(anchors, sections))
    body = "\n".join(
        f'<section id="{anchor}"><h2>{html.escape(section.title)}</h2>\n' + "\n".join(section.html) + "</section>"
        for anchor, section in zip(anchors, sections)
    )
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1><nav>{nav}</nav>\n{body}\n</body></html>\n")


def _render_md(title: str, sections: list[_Section]) -> str:
    parts = [f"# {title}", ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        for block in section.md:
            parts += [block, ""]
    return "\n".join(parts)


def _html_table(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in table.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _md_table(table: pd.DataFrame) -> str:
    def clean(value) -> str:
        return _fmt(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(clean(c) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(clean(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if not np.isfinite(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def _rounded(table: pd.DataFrame) -> pd.DataFrame:
    return table.apply(lambda column: column.map(_fmt))


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in str(text).lower()).strip("-") or "section"


def _remove_stale_figures(figures: _Figures) -> None:
    """Figures of an earlier report that this one no longer has (e.g. an attribute dropped)."""
    if figures.folder.is_dir():
        for path in figures.folder.glob("*.png"):
            if path.name not in figures.names:
                path.unlink()
