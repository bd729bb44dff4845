"""A :class:`Cohort`: the participants table joined to its images, groups and typed attributes,
loaded leniently and validated on demand.

Two spec fields make the cohort a subset of participants.tsv, both applied when it is loaded so
that every command reading the spec (run, embed, probe, a DDP worker) sees the same rows:
``include`` selects rows before any check (:mod:`neurocl.cohort.query`), and ``on_invalid:
exclude`` then validates the selected rows (images included) and leaves out each row that has a
problem of its own. :attr:`Cohort.excluded` records both, one line per row left out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from pydantic import ValidationError
from rich.console import Console
from rich.progress import track

from neurocl.cohort.problems import (
    NOT_SELECTED, Problem, _grid_differences, _read_grid, _voxel_problems, _where, excluded_table, reason_counts,
)
from neurocl.cohort.query import included_rows
from neurocl.cohort.spec import MISSING_VALUES, PLACEHOLDERS, CohortSpec, GroupSpec, _spec_error, key_columns
from neurocl.cohort.truth import read_ground_truth
from neurocl.errors import CohortError
from neurocl.images import Grid, GridSpec
from neurocl.io import load_yaml, refuse_duplicate_columns
from neurocl.logs import transient_progress

# An id names the image's file (through the images template), so it may hold only what a BIDS
# label holds (letters and digits) and the entity separators '-' and '_': never '/', '..' or spaces.
ID_CHARACTERS = re.compile(r"[A-Za-z0-9_-]+")

def _read_participants(path: Path) -> pd.DataFrame:
    """Read participants.tsv with every cell as a string, keeping TSV line numbers.

    Values are kept as written (a site "01" stays "01", not 1) so categorical attributes and
    group values compare exactly; blank lines are dropped but still count for line numbers. A
    column named twice is refused (pandas would read the first ``age`` and rename the other).
    """
    try:
        table = pd.read_csv(
            path,
            sep="\t",
            dtype=str,
            na_values=MISSING_VALUES,
            keep_default_na=False,
            skip_blank_lines=False,
            encoding="utf-8-sig",  # spreadsheet exports often start with a byte-order mark
        )
    except pd.errors.EmptyDataError:
        raise CohortError(f"{path}: participants table is empty (expected a header line with participant_id)") from None
    except OSError as error:
        raise CohortError(f"{path}: cannot read participants table ({error.strerror or error})") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise CohortError(f"{path}: cannot read participants table ({error})") from None
    refuse_duplicate_columns(path, CohortError, "participants table", encoding="utf-8-sig")
    table.columns = [str(column).strip() for column in table.columns]
    table = table.apply(lambda column: column.str.strip())
    table["row"] = np.arange(len(table)) + 2
    return table.dropna(how="all", subset=[c for c in table.columns if c != "row"]).reset_index(drop=True)


def _resolved(path: Path, where: str) -> Path:
    """``path`` made absolute with symlinks followed; a symlink loop is a one-line error, not a traceback."""
    try:
        return path.resolve(strict=False)
    except (RuntimeError, OSError) as error:  # Python < 3.13 raises RuntimeError for a loop, later ones OSError
        raise CohortError(f"{where}: {path} is a symbolic link loop ({error})") from None


def _cell_text(value: Any) -> str | float:
    """A DataFrame cell as participants.tsv would hold it: text, NaN when missing.

    Integral floats lose their ".0" (a site column [1, 2, NaN] is float in pandas, but its
    categories are "1" and "2", as in a TSV).
    """
    if pd.isna(value):
        return np.nan
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return np.nan if text in MISSING_VALUES else text


def _load_yaml(path: Path) -> dict:
    raw = load_yaml(path, CohortError, "cohort spec")
    if not isinstance(raw, dict):
        raise CohortError(f"{path}: a cohort spec is a mapping of fields (name, participants, images, group, ...)")
    if "participants" not in raw:
        raise CohortError(f"{path}: participants: field required (path of the participants.tsv)")
    return raw


class Cohort:
    """A validated-on-demand table of images with groups and typed attributes.

    Parameters
    ----------
    participants : path or DataFrame
        BIDS participants table (tab-separated, ``participant_id``, optional ``session_id``,
        ``n/a`` for missing).
    images : str
        Image path template, e.g. ``"{participant_id}/anat/{participant_id}_desc-gm.nii.gz"``.
    group : GroupSpec or dict
        ``{"column": ..., "background": [...], "target": [...]}``.
    attributes : dict, optional
        Attribute name -> ``"continuous"`` or ``"categorical"``.
    root : path
        Folder the template is relative to (relative paths: to the current directory).
    name : str
        Cohort name.
    required : list of str, optional
        Attributes that must be present in every row.
    grid : GridSpec or dict, optional
        Grid of ``.npy`` / picture images (``{"affine": 4x4}`` or ``{"voxel_size": v}``).
    include : str or list of str, optional
        A query over the participants columns, or participant ids: the rows that make the cohort.
    on_invalid : "error" or "exclude"
        ``exclude``: leave out the rows with a problem of their own (recorded in ``excluded``).

    Attributes
    ----------
    spec : CohortSpec
    table : DataFrame
        One row per image in TSV order: ``participant_id``, [``session_id``], ``group``
        ("background" | "target" | NaN), each attribute (float for continuous, str for
        categorical, NaN when missing), ``image`` (absolute path) and ``row`` (TSV line).
    source : str
        Where the cohort came from, used in messages: the YAML path, or ``cohort 'NAME'``.
    categories : dict
        Sorted categories of each categorical attribute (kept by :meth:`select`).
    excluded : DataFrame or None
        The rows of participants.tsv left out, one per row: ``participant_id``, [``session_id``],
        ``row``, ``reason`` (kinds, ``; ``-joined; ``not selected by include`` for rows the
        include filter left out) and ``problem`` (the full texts). None when the spec has neither
        ``include`` nor ``on_invalid: exclude``.
    """

    def __init__(
        self,
        participants: str | os.PathLike | pd.DataFrame,
        images: str,
        group: GroupSpec | dict,
        attributes: dict[str, str] | None = None,
        root: str | os.PathLike = ".",
        name: str = "cohort",
        required: Sequence[str] | None = None,
        grid: GridSpec | dict | None = None,
        include: str | Sequence[str] | None = None,
        on_invalid: str = "error",
    ) -> None:
        fields = {
            "name": name,
            "participants": None if isinstance(participants, pd.DataFrame) else participants,
            "root": root,
            "images": images,
            "group": group.model_dump() if isinstance(group, GroupSpec) else group,
            "attributes": attributes or {},
            "required": list(required) if required is not None else None,
            "grid": grid.model_dump() if isinstance(grid, GridSpec) else grid,
            "include": include if include is None or isinstance(include, str) else list(include),
            "on_invalid": on_invalid,
        }
        try:
            spec = CohortSpec(**fields)
        except ValidationError as error:
            raise _spec_error(f"cohort {name!r}", error) from None
        self._load(spec, Path.cwd(), participants if isinstance(participants, pd.DataFrame) else None, f"cohort {name!r}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Cohort":
        """Load a cohort spec YAML; paths in it are relative to the YAML's folder."""
        path = Path(path)
        raw = _load_yaml(path)
        try:
            spec = CohortSpec(**raw)
        except ValidationError as error:
            raise _spec_error(str(path), error) from None
        return cls.from_spec(spec, base_dir=path.resolve().parent, source=str(path))

    @classmethod
    def from_spec(cls, spec: CohortSpec, base_dir: str | os.PathLike = ".", source: str | None = None) -> "Cohort":
        """Build a cohort from an already parsed spec (e.g. a pipeline's inline cohort section)."""
        if spec.participants is None:
            raise CohortError(f"{source or 'cohort ' + repr(spec.name)}: participants: field required")
        cohort = cls.__new__(cls)
        cohort._load(spec, Path(base_dir), None, source or f"cohort {spec.name!r}")
        return cohort

    def _load(self, spec: CohortSpec, base_dir: Path, frame: pd.DataFrame | None, source: str) -> None:
        self.spec = spec
        self.source = source
        if frame is None:
            participants_path = _resolved(base_dir / spec.participants, f"{source}: participants")
            if not participants_path.is_file():
                raise CohortError(f"{source}: participants: {participants_path} not found")
            raw = _read_participants(participants_path)
            table_name = str(participants_path)
            self.participants_path: Path | None = participants_path.resolve()
        else:
            self.participants_path = None
            raw = frame.astype(object).map(_cell_text).reset_index(drop=True)
            raw["row"] = np.arange(len(raw)) + 2
            table_name = "the participants DataFrame"
        self._root = (base_dir / spec.root).resolve()
        self.ground_truth_path = (None if spec.ground_truth is None
                                  else _resolved(base_dir / spec.ground_truth, f"{source}: ground_truth"))
        self.n_read = len(raw)
        # Rows whose images passed every check when the cohort was loaded, and cohort-level
        # problems found then: what validate() need not, or cannot, find again on the kept rows.
        self._images_checked: frozenset[int] = frozenset()
        self._load_problems: list[Problem] = []
        selected = included_rows(raw, spec, source)
        not_selected = raw.loc[~selected]
        raw = raw.loc[selected].reset_index(drop=True)
        self.table = self._build_table(raw, table_name)
        # The cells as written, for messages ("age 'abc' is not a number") and required checks.
        self._written = raw[list(dict.fromkeys([spec.group.column, *spec.attributes]))].reset_index(drop=True)
        self.excluded: pd.DataFrame | None = None
        if spec.include is not None or spec.on_invalid == "exclude":
            key = key_columns(raw)
            self.excluded = excluded_table(
                not_selected, [Problem(row, None, NOT_SELECTED, NOT_SELECTED) for row in not_selected["row"]], key)
            if spec.on_invalid == "exclude":
                invalid = self._exclude_invalid()
                self.excluded = (pd.concat([self.excluded, invalid], ignore_index=True) if len(self.excluded)
                                 else invalid).sort_values("row", kind="stable").reset_index(drop=True)
        # After the exclusions: a category only a left-out row had is no category of the cohort.
        self.categories = {
            name: sorted(self.table[name].dropna().unique().tolist())
            for name, kind in spec.attributes.items()
            if kind == "categorical"
        }

    def _exclude_invalid(self) -> pd.DataFrame:
        """Leave out the rows with a problem of their own (images opened); the table of those left out.

        When no image at all can be read, the template or root is wrong rather than some rows:
        nothing is left out for its image, and validate() reports it as a cohort-level problem.
        """
        problems = [problem for problem in self._table_problems() if problem.row is not None]
        image_problems = self._image_problems(progress=True)
        opened = {int(record["row"]) for record in self.table.to_dict("records")
                  if isinstance(record["image"], str) and not self._path_problems(record)}
        if opened and opened <= {problem.row for problem in image_problems}:
            first = image_problems[0]
            self._load_problems.append(Problem(None, None, (
                f"on_invalid: exclude: no image could be read (line {first.row}: {first.problem}); check the "
                "spec's root and images template")))
        else:
            problems += image_problems
        excluded = excluded_table(self.table, problems, self.key_columns)
        kept = ~self.table["row"].isin(excluded["row"]).to_numpy()
        self.table = self.table.loc[kept].reset_index(drop=True)
        self._written = self._written.loc[kept].reset_index(drop=True)
        if not self._load_problems:
            self._images_checked = frozenset(int(row) for row in self.table["row"])
        return excluded

    def _build_table(self, raw: pd.DataFrame, table_name: str) -> pd.DataFrame:
        spec = self.spec
        columns = [c for c in raw.columns if c != "row"]
        repeated = sorted({str(c) for c in raw.columns[raw.columns.duplicated()]})
        if repeated:
            raise CohortError(f"{self.source}: {table_name} names a column more than once ({', '.join(repeated)}); "
                              "only the first would be read: rename or remove the others")

        def need(column: str, field: str) -> None:
            if column not in raw.columns:
                raise CohortError(
                    f"{self.source}: {field}: {column!r} is not a column of {table_name} (columns: {', '.join(columns)})"
                )

        need("participant_id", "participants")
        need(spec.group.column, "group.column")
        for attribute in spec.attributes:
            need(attribute, f"attributes.{attribute}")
        if spec.uses_sessions:
            need("session_id", "images (the template uses {session_id})")

        table = pd.DataFrame({"participant_id": raw["participant_id"].astype(object)})
        if "session_id" in raw.columns:
            table["session_id"] = raw["session_id"].astype(object)
        groups = {value: "background" for value in spec.group.background}
        groups.update({value: "target" for value in spec.group.target})
        table["group"] = raw[spec.group.column].map(groups).astype(object)
        for attribute, kind in spec.attributes.items():
            values = raw[attribute]
            if kind == "continuous":
                table[attribute] = pd.to_numeric(values, errors="coerce").astype(float)
            else:
                table[attribute] = values.astype(object)
        table["image"] = [self._image_path(record) for record in table.to_dict("records")]
        table["row"] = raw["row"].astype(int).to_numpy()
        return table.reset_index(drop=True)

    def _image_path(self, record: dict) -> str | float:
        ids = {key: record.get(key) for key in PLACEHOLDERS}
        needed = ["participant_id"] + (["session_id"] if self.spec.uses_sessions else [])
        if any(pd.isna(ids[key]) for key in needed):
            return np.nan
        return str(self._root / self.spec.images.format(**{k: v for k, v in ids.items() if not pd.isna(v)}))

    @classmethod
    def _subset(cls, parent: "Cohort", table: pd.DataFrame, written: pd.DataFrame) -> "Cohort":
        cohort = cls.__new__(cls)
        cohort.spec = parent.spec
        cohort.source = parent.source
        cohort._root = parent._root
        cohort.ground_truth_path = parent.ground_truth_path
        cohort.categories = parent.categories
        cohort.excluded = parent.excluded
        cohort.n_read = parent.n_read
        cohort._images_checked = parent._images_checked
        cohort._load_problems = parent._load_problems
        cohort.table = table.reset_index(drop=True)
        cohort._written = written.reset_index(drop=True)
        return cohort

    # ------------------------------------------------------------------ views of the table
    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        counts = self.table["group"].value_counts()
        return (
            f"Cohort({self.spec.name!r}: {len(self)} images, {counts.get('background', 0)} background, "
            f"{counts.get('target', 0)} target)"
        )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def n_images(self) -> int:
        return len(self.table)

    @property
    def has_sessions(self) -> bool:
        """Whether the participants table has a ``session_id`` column."""
        return "session_id" in self.table.columns

    @property
    def image_paths(self) -> list[Path | None]:
        """Absolute image path of each row (``None`` where the row has no participant_id)."""
        return [Path(path) if isinstance(path, str) else None for path in self.table["image"]]

    @property
    def is_target(self) -> np.ndarray:
        """Boolean mask of target-group rows (rows with no valid group are False)."""
        return (self.table["group"] == "target").to_numpy(dtype=bool)

    @property
    def attribute_kinds(self) -> dict[str, str]:
        return dict(self.spec.attributes)

    def keys(self) -> pd.DataFrame:
        """``participant_id`` and (when present) ``session_id`` of each row."""
        return self.table[self.key_columns].copy()

    @property
    def key_columns(self) -> list[str]:
        """The subject key of this cohort's rows (:data:`KEY_COLUMNS` present in its table)."""
        return key_columns(self.table)

    def ground_truth(self) -> pd.DataFrame | None:
        """The spec's ``ground_truth`` table, validated against this cohort (None when the spec has none)."""
        return None if self.ground_truth_path is None else read_ground_truth(self.ground_truth_path, self)

    def attribute_matrix(self, names: Sequence[str] | None = None) -> np.ndarray:
        """Attributes as a float matrix (n_images, len(names)), NaN where missing.

        Categorical attributes become integer codes in the sorted order of the categories of the
        whole cohort (``self.categories``), so codes agree between a cohort and its subsets.
        """
        names = list(self.spec.attributes) if names is None else list(names)
        columns = []
        for name in names:
            kind = self.spec.attributes.get(name)
            if kind is None:
                raise CohortError(f"{self.source}: {name!r} is not an attribute (attributes: {sorted(self.spec.attributes)})")
            values = self.table[name]
            if kind == "categorical":
                codes = {category: float(code) for code, category in enumerate(self.categories[name])}
                values = values.map(codes)
            columns.append(values.to_numpy(dtype=float))
        return np.stack(columns, axis=1) if columns else np.empty((len(self), 0))

    def select(self, rows: Sequence[int] | np.ndarray) -> "Cohort":
        """Subset of rows (integer positions or a boolean mask), with the same spec and categories."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return Cohort._subset(self, self.table.iloc[rows], self._written.iloc[rows])

    # ------------------------------------------------------------------ validation
    def validate(self, check_images: bool = True, progress: bool = False) -> list[Problem]:
        """Every problem of the cohort, by participants.tsv line.

        Table checks: missing participant_id or (when the template needs it) session_id,
        duplicate (participant_id, session_id), group value neither background nor target,
        required attribute missing, continuous attribute not a finite number, empty background or
        target group. Image checks (``check_images``): file missing, unreadable or corrupt, not
        2D or 3D (singleton axes at the ends are dropped first), NaN/Inf voxels, and shape, voxel
        size or affine (tolerance 1e-3 mm) differing from the reference grid, which is the grid of
        the first image in table order whose header reads and which is 2D or 3D. The same checks
        apply to ``.npy`` arrays and pictures (their grid comes from the spec).

        Parameters
        ----------
        check_images : bool
            Also open every image (headers first, then the voxels for NaN/Inf).
        progress : bool
            Show a progress bar over the images.

        Returns
        -------
        list of Problem
            Sorted by row; cohort-level problems (row None) last.
        """
        problems = self._table_problems() + self._load_problems
        if check_images:
            problems += self._image_problems(progress)
        return sorted(problems, key=lambda p: (p.row is None, p.row or 0))

    def exclusion_preview(self, problems: Sequence[Problem]) -> str | None:
        """What ``on_invalid: exclude`` would leave out of this cohort, given its ``problems`` (one line).

        None when no row has a problem of its own. Says whether the rest would still be refused
        (an empty group, a problem of the whole cohort).
        """
        excluded = excluded_table(self.table, problems, self.key_columns)
        if excluded.empty:
            return None
        kept = self.table.loc[~self.table["row"].isin(excluded["row"])]
        counts = kept["group"].value_counts()
        line = (f"with on_invalid: exclude, {len(excluded)} of {len(self)} rows would be left out "
                f"({reason_counts(excluded)}), leaving {counts.get('background', 0)} background and "
                f"{counts.get('target', 0)} target")
        empty = [group for group in ("background", "target") if counts.get(group, 0) == 0]
        if empty or any(problem.row is None for problem in problems):
            line += f" (still refused: {' and '.join(empty) + ' group empty' if empty else 'a problem of the whole cohort'})"
        return line

    def input_folder(self) -> Path | None:
        """The folder holding every image of the cohort (their common parent), which nothing may write into.

        None when the images are scattered across the filesystem (a common parent of fewer than
        three parts, such as ``/`` or ``/data``, protects nothing).
        """
        folders = [str(Path(image).resolve().parent) for image in self.table["image"] if isinstance(image, str)]
        if not folders:
            return None
        root = Path(os.path.commonpath(folders))
        return root if len(root.parts) >= 3 else None

    def input_paths(self) -> dict[str, Path]:
        """What this cohort reads, by role: its spec, participants table, root and images' folder (never written)."""
        paths = {"cohort spec": Path(self.source), "participants table": self.participants_path,
                 "cohort root": self._root, "cohort's image folder": self.input_folder()}
        return {role: path for role, path in paths.items()
                if path is not None and (role != "cohort spec" or Path(path).is_file())}

    def check(self, check_images: bool = True) -> None:
        """Raise one :class:`CohortError` listing every problem, if there is any."""
        problems = self.validate(check_images=check_images)
        if problems:
            lines = [f"{self.source}: {len(problems)} problem(s); run `neurocl validate` for the table"]
            lines += [f"  {_where(problem)}: {problem.problem}" for problem in problems]
            raise CohortError("\n".join(lines))

    def _table_problems(self) -> list[Problem]:
        spec = self.spec
        problems: list[Problem] = []
        first_line: dict[tuple, int] = {}
        for position, record in enumerate(self.table.to_dict("records")):
            pid = None if pd.isna(record["participant_id"]) else record["participant_id"]
            key = tuple("n/a" if pd.isna(record.get(c)) else record.get(c) for c in self.key_columns)
            if pid is not None and key in first_line:
                problems.append(Problem(record["row"], pid, f"duplicate of line {first_line[key]} ({', '.join(key)})",
                                        "duplicate row"))
            first_line.setdefault(key, record["row"])
            problems += [Problem(record["row"], pid, text, reason) for text, reason in self._row_problems(position, record)]
        counts = self.table["group"].value_counts()
        left_out = "" if self.excluded is None or self.excluded.empty else (
            f" after leaving out {len(self.excluded)} of {self.n_read} rows: {self._exclusion_fields()}")
        for group, values in (("background", spec.group.background), ("target", spec.group.target)):
            if counts.get(group, 0) == 0:
                problems.append(Problem(None, None, f"{group} group is empty (no row has {spec.group.column} in "
                                                    f"{values}{left_out})"))
        return problems

    def _exclusion_fields(self) -> str:
        fields = ["include" if self.spec.include is not None else "", "on_invalid: exclude"
                  if self.spec.on_invalid == "exclude" else ""]
        return ", ".join(field for field in fields if field)

    def _row_problems(self, position: int, record: dict) -> list[tuple[str, str]]:
        """Problems of one row that need no other row (ids, image path, group, attributes): (text, reason) pairs."""
        spec = self.spec
        found = []
        if pd.isna(record["participant_id"]):
            found.append(("participant_id is missing", "participant_id missing"))
        if spec.uses_sessions and pd.isna(record.get("session_id")):
            found.append(("session_id is missing (the images template needs it)", "session_id missing"))
        found += self._path_problems(record)
        if pd.isna(record["group"]):
            found.append(self._group_problem(position))
        for attribute in spec.required or []:
            if pd.isna(self._written.at[position, attribute]):
                found.append((f"required attribute '{attribute}' is missing", f"{attribute} missing"))
        for attribute, kind in spec.attributes.items():
            written = self._written.at[position, attribute]
            if kind == "continuous" and not pd.isna(written) and not np.isfinite(record[attribute]):
                found.append((f"{attribute} {written!r} is not a finite number (continuous attribute)",
                              f"{attribute} not a number"))
        return found

    def _group_problem(self, position: int) -> tuple[str, str]:
        group = self.spec.group
        value = self._written.at[position, group.column]
        allowed = f"background {group.background}, target {group.target}"
        if pd.isna(value):
            return f"{group.column} is missing ({allowed})", f"{group.column} missing"
        return (f"{group.column} {value!r} is neither background nor target ({allowed})",
                f"{group.column} neither background nor target")

    def _path_problems(self, record: dict) -> list[tuple[str, str]]:
        """Why this row's image may not be opened: an id that is not a label, or a path outside the root.

        The path is compared as written (normalised, symlinks not followed): links that the
        cohort's owner placed inside the root may point to shared storage, but no id or template
        may climb out of it.
        """
        found = []
        for column in ("participant_id", "session_id") if self.spec.uses_sessions else ("participant_id",):
            value = record.get(column)
            if isinstance(value, str) and not ID_CHARACTERS.fullmatch(value):
                others = "".join(dict.fromkeys(re.sub(r"[A-Za-z0-9_-]", "", value)))
                found.append((f"{column} {value!r} has characters a BIDS label cannot hold ({others!r}): ids name "
                              "image files, so only letters, digits, '-' and '_' are allowed", f"{column} not a label"))
        image = record.get("image")
        if not found and isinstance(image, str) and not Path(os.path.normpath(image)).is_relative_to(self._root):
            found.append((f"image path {os.path.normpath(image)} is outside the cohort's root {self._root} "
                          "(from the images template): set root to a folder that holds every image",
                          "image outside the root"))
        return found

    def _image_problems(self, progress: bool) -> list[Problem]:
        if self._images_checked and set(self.table["row"]) <= self._images_checked:
            return []  # every image passed these checks when on_invalid: exclude loaded the cohort
        records = self.table.to_dict("records")
        reference: tuple[dict, Grid] | None = None
        problems: list[Problem] = []
        for record in track(
            records, description="validating images", disable=not transient_progress(progress), console=Console(stderr=True),
            transient=True
        ):
            if not isinstance(record["image"], str) or self._path_problems(record):
                continue  # reported with the row's ids; an image outside the root is never opened
            pid = None if pd.isna(record["participant_id"]) else record["participant_id"]
            path = Path(record["image"])
            # The header (and its claimed size) is checked against the file and the reference grid
            # before any voxel is read: a forged header cannot make validate allocate gigabytes.
            grid = _read_grid(path, self.spec)
            if isinstance(grid, str):
                problems.append(Problem(record["row"], pid, grid, "image missing" if not path.exists() else "image unreadable"))
                continue
            if reference is None:
                reference = (record, grid)
            else:
                where = f"line {reference[0]['row']}, {reference[0]['participant_id']}"
                differences = _grid_differences(grid, reference[1], where)
                problems += [Problem(record["row"], pid, text, "image grid differs") for text in differences]
                if grid.shape != reference[1].shape:
                    continue
            problems += [Problem(record["row"], pid, text, "image voxels unusable") for text in _voxel_problems(path, self.spec)]
        return problems

    def reference_grid(self) -> tuple[tuple[int, ...], np.ndarray, tuple[float, ...]]:
        """(shape, affine, zooms) of the first image whose header reads and which is 2D or 3D.

        ``shape`` and ``zooms`` have 2 values for a 2D cohort (the affine is 4x4 either way).
        """
        for path in self.image_paths:
            if path is not None:
                grid = _read_grid(path, self.spec)
                if isinstance(grid, Grid):
                    return grid.shape, grid.affine, grid.zooms
        raise CohortError(f"{self.source}: no readable 2D or 3D image to take the reference grid from")

    @property
    def spatial_dims(self) -> int:
        """2 or 3: the dimensionality of the reference grid (reads one header)."""
        return len(self.reference_grid()[0])
