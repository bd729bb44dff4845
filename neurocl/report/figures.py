"""The report's matplotlib figures: saved as PNG under ``RUN/report_files/`` and embedded as base64 in the HTML."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from neurocl.io import atomic_path
from neurocl.report.render import _Section
from neurocl.rundir import RunDir

_SUBSET_ORDER = {"all": 0, "target": 1, "background": 2}


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


def _forest_figure(rows: pd.DataFrame, label_column: str):
    """Dot-and-whisker plots, one panel per attribute: a row per (label, subset), x = score, dashed = chance;
    filled dots: verdict "decodable" (``rows`` from :func:`neurocl.probe.verdicts.with_verdicts`)."""
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
            decodable = row.get("verdict") == "decodable"
            axis.plot(row["value"], yi, "o", color=colour, mfc=colour if decodable else "white", ms=6)
        for chance in panel["chance"].dropna().unique():
            axis.axvline(chance, color="grey", ls="--", lw=1)
        axis.set_yticks(y, [f"{label} | {subset}" for label, subset in zip(panel[label_column], panel["subset"])], fontsize=8)
        axis.set_title(f"{attribute} ({panel['metric'].iloc[0]})", fontsize=9)
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(axis="x", alpha=0.3)
    for axis in list(axes.flat)[len(attributes):]:
        axis.set_visible(False)
    return figure


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


def _remove_stale_figures(figures: _Figures) -> None:
    """Figures of an earlier report that this one no longer has (e.g. an attribute dropped)."""
    if figures.folder.is_dir():
        for path in figures.folder.glob("*.png"):
            if path.name not in figures.names:
                path.unlink()
