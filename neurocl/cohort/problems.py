"""What is wrong with a cohort: the image checks (grid against the reference, readable finite
voxels), the table of :class:`Problem` that ``neurocl validate`` prints, and the table of rows
that the spec's ``include`` and ``on_invalid: exclude`` leave out (:func:`excluded_table`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from neurocl.cohort.spec import GRID_TOLERANCE_MM, CohortSpec
from neurocl.images import Grid, read_grid, read_voxels

if TYPE_CHECKING:
    from neurocl.cohort.table import Cohort


# The reason recorded for a row that the spec's include filter leaves out.
NOT_SELECTED = "not selected by include"
EXCLUDED_COLUMNS = ("participant_id", "session_id", "row", "reason", "problem")


class Problem(NamedTuple):
    """One validation finding; ``row`` is the participants.tsv line number (header = line 1).

    ``reason`` is the kind of problem in a few words, the same for every row that has it
    (``diagnosis missing``, ``image missing``): what the summary of excluded rows counts.
    """

    row: int | None
    participant_id: str | None
    problem: str
    reason: str = ""


def _where(problem: Problem) -> str:
    if problem.row is None:
        return "cohort"
    return f"line {problem.row} ({problem.participant_id or 'no participant_id'})"


def _read_grid(path: Path, spec: CohortSpec) -> Grid | str:
    """The image's grid from its header (or the spec's grid), or the problem that prevents reading it."""
    return read_grid(path, spec.kind, spec.grid)


def _voxel_problems(path: Path, spec: CohortSpec) -> list[str]:
    """Problems of the voxels themselves: unreadable data, NaN/Inf, an all-zero or constant image."""
    try:
        data = read_voxels(path, spec.kind)
    except Exception as error:  # truncated or corrupt voxel data
        return [f"corrupt image data in {path.name}: {type(error).__name__}: {error}"]
    if data.size == 0:
        return ["image has no voxels"]
    if np.issubdtype(data.dtype, np.floating):
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        if n_nan or n_inf:
            return [f"image has {n_nan} NaN and {n_inf} Inf voxels"]
    # An empty or constant image passes every header check but has no anatomy: preprocessing
    # would fail on it later (zero variance inside the mask), or silently train on nothing.
    first = data.flat[0]
    if not np.any(data != first):
        return ["image is all zeros" if first == 0 else f"image is constant (every voxel is {first})"]
    return []


def _grid_differences(grid: Grid, reference: Grid, where: str) -> list[str]:
    if grid.shape != reference.shape:
        return [f"shape {grid.shape} differs from the reference grid {reference.shape} ({where})"]
    if np.max(np.abs(np.subtract(grid.zooms, reference.zooms))) > GRID_TOLERANCE_MM:
        zooms = tuple(round(z, 4) for z in grid.zooms)
        ref = tuple(round(z, 4) for z in reference.zooms)
        return [f"voxel size {zooms} mm differs from the reference {ref} mm ({where})"]
    difference = float(np.max(np.abs(grid.affine - reference.affine)))
    if difference > GRID_TOLERANCE_MM:
        return [f"affine differs from the reference by up to {difference:.4g} mm ({where})"]
    return []


def print_problems(problems: Sequence[Problem], console=None, cohort: "Cohort | None" = None) -> None:
    """Render problems as a rich table (row, participant_id, problem) and a summary line.

    With no problems, prints ``cohort OK: N images, B background, T target`` (counts when
    ``cohort`` is given).
    """
    console = console or Console()
    if not problems:
        if cohort is None:
            console.print("[green]cohort OK[/]")
        else:
            counts = cohort.table["group"].value_counts()
            console.print(
                f"[green]cohort OK[/]: {len(cohort)} images, {counts.get('background', 0)} background, "
                f"{counts.get('target', 0)} target",
                highlight=False,
            )
        return
    table = Table(title="cohort problems", show_lines=False)
    table.add_column("row", justify="right")
    table.add_column("participant_id")
    table.add_column("problem", overflow="fold")
    for problem in problems:
        # Escaped: ids, paths and dtypes such as datetime64[s] hold brackets that rich would read as markup.
        table.add_row("-" if problem.row is None else str(problem.row), escape(problem.participant_id or "-"),
                      escape(problem.problem))
    console.print(table)
    n_rows = len({problem.row for problem in problems if problem.row is not None})
    console.print(f"[bold red]{len(problems)} problem(s)[/] in {n_rows} row(s)", highlight=False)


def excluded_table(table: pd.DataFrame, problems: Sequence[Problem], key: Sequence[str]) -> pd.DataFrame:
    """One row per row of ``table`` that has a problem of its own, in table order.

    Columns: the ``key`` columns, ``row`` (participants.tsv line), ``reason`` (the kinds of its
    problems, ``; ``-joined) and ``problem`` (their full texts, likewise). Cohort-level problems
    (row None) are not rows to leave out and are ignored.
    """
    by_row: dict[int, list[Problem]] = {}
    for problem in problems:
        if problem.row is not None:
            by_row.setdefault(int(problem.row), []).append(problem)
    records = []
    for record in table.to_dict("records"):
        found = by_row.get(int(record["row"]))
        if found:
            reasons = dict.fromkeys(problem.reason or problem.problem for problem in found)
            records.append({**{column: record.get(column) for column in key}, "row": int(record["row"]),
                            "reason": "; ".join(reasons), "problem": "; ".join(problem.problem for problem in found)})
    columns = [column for column in EXCLUDED_COLUMNS if column in key or column not in ("participant_id", "session_id")]
    return pd.DataFrame(records, columns=columns)


def exclusion_summary(excluded: pd.DataFrame, n_rows: int, where: str | None = None) -> str:
    """``left out 3 of 40 rows (WHERE): 2 diagnosis missing, 1 image missing`` (``n_rows``: rows before).

    A row with several problems counts once under each of its reasons.
    """
    if excluded.empty:
        return f"left out 0 of {n_rows} rows"
    return f"left out {len(excluded)} of {n_rows} rows{f' ({where})' if where else ''}: {reason_counts(excluded)}"


def reason_counts(excluded: pd.DataFrame) -> str:
    """``2 diagnosis missing, 1 image missing``: rows of an excluded table by reason, most frequent first."""
    reasons = Counter(reason for text in excluded["reason"] for reason in str(text).split("; "))
    return ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())


def print_excluded(excluded: pd.DataFrame, n_rows: int, console=None) -> None:
    """Render the rows a cohort left out (row, participant_id, [session_id], problem) and the summary line."""
    console = console or Console()
    if excluded.empty:
        console.print(exclusion_summary(excluded, n_rows), highlight=False)
        return
    table = Table(title="left out of the cohort", show_lines=False)
    columns = [column for column in ("row", "participant_id", "session_id", "problem") if column in excluded.columns]
    for column in columns:
        table.add_column(column, justify="right" if column == "row" else "left",
                         overflow="fold" if column == "problem" else "ellipsis")
    for record in excluded[columns].to_dict("records"):
        table.add_row(*(escape("-" if pd.isna(record[column]) else str(record[column])) for column in columns))
    console.print(table)
    console.print(exclusion_summary(excluded, n_rows), highlight=False)
