"""What is wrong with a cohort: the image checks (grid against the reference, readable finite
voxels) and the table of :class:`Problem` that ``neurocl validate`` prints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from neurocl.cohort.spec import GRID_TOLERANCE_MM, CohortSpec
from neurocl.images import Grid, read_grid, read_voxels

if TYPE_CHECKING:
    from neurocl.cohort.table import Cohort


class Problem(NamedTuple):
    """One validation finding; ``row`` is the participants.tsv line number (header = line 1)."""

    row: int | None
    participant_id: str | None
    problem: str


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
