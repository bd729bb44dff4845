"""Cohorts: a BIDS participants table, one image per row, groups, attributes and splits.

Images are 3D or 2D, as NIfTI, NumPy arrays (``.npy``, with the grid given once in the spec) or
pictures (PNG/JPEG); :mod:`neurocl.images` reads them.

A :class:`Cohort` is built from a cohort spec YAML (``docs/cohorts.md``) or from Python
arguments. Loading is lenient: rows with a bad group value, a non-numeric continuous attribute
or a missing image are kept, so that :meth:`Cohort.validate` can report every problem at once
(``neurocl validate``); :meth:`Cohort.check` raises one :class:`~neurocl.errors.CohortError`
listing them all, which is what pipelines call before they touch the images.

Splits are made at the subject level (all sessions of a participant stay together) and saved
as a ``splits.tsv`` manifest (:class:`Splits`).
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any, Iterable, Literal, NamedTuple, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from neurocl.errors import CohortError, ConfigError
from neurocl.images import Grid, GridSpec, ImageKind, image_kind, read_grid, read_voxels
from neurocl.io import load_yaml, read_tsv, write_tsv

# The subject key: a row of a cohort, a store manifest, an embeddings table or a splits manifest is
# one image of one participant (and session). Every table is matched on these columns, never on position.
KEY_COLUMNS = ("participant_id", "session_id")


def key_columns(table: pd.DataFrame) -> list[str]:
    """The key columns ``table`` has: ``participant_id``, then ``session_id`` when present."""
    return [column for column in KEY_COLUMNS if column in table.columns]

GROUPS = ("background", "target")
PLACEHOLDERS = ("participant_id", "session_id")
RESERVED_COLUMNS = ("participant_id", "session_id", "group", "image", "row")
# Tolerance (in mm) when comparing affines and voxel sizes with the reference grid: headers
# written by different tools round the same grid differently in the last float32 digits.
GRID_TOLERANCE_MM = 1e-3
# Values that mean "missing" in a participants table (BIDS writes n/a; empty cells too).
MISSING_VALUES = ["n/a", "N/A", "NA", ""]
SPLIT_NAMES = ("train", "val", "test")


class GroupSpec(BaseModel):
    """Which participants.tsv column holds the group, and which of its values are which group.

    ``background`` values (e.g. controls) and ``target`` values (e.g. patients) are compared as
    strings, exactly as written in participants.tsv; a single value may be given without a list.
    """

    model_config = ConfigDict(extra="forbid")

    column: str
    background: list[str]
    target: list[str]

    @field_validator("background", "target", mode="before")
    @classmethod
    def _as_string_list(cls, value: Any) -> Any:
        if isinstance(value, (str, int, float)):
            value = [value]
        if isinstance(value, list):
            return [str(item) for item in value]
        return value

    @field_validator("background", "target")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one value")
        return value

    @model_validator(mode="after")
    def _disjoint(self) -> "GroupSpec":
        both = sorted(set(self.background) & set(self.target))
        if both:
            raise ValueError(f"values {both} are listed as both background and target")
        return self


class CohortSpec(BaseModel):
    """A cohort spec: the YAML file's content (paths relative to the YAML's folder).

    Attributes
    ----------
    name : str
        Cohort name, used in messages and reports.
    participants : Path or None
        The BIDS participants table (required in a YAML spec; ``None`` when the table was
        given to :class:`Cohort` as a DataFrame).
    root : Path
        Folder the image template is relative to (itself relative to the YAML's folder).
    images : str
        Image path template with ``{participant_id}`` and optionally ``{session_id}``. Its
        suffix says the kind: ``.npy`` arrays, ``.png``/``.jpg``/``.jpeg`` pictures, else NIfTI.
    grid : GridSpec or None
        The grid of array and picture cohorts (``affine`` 4x4 or ``voxel_size``): required for
        ``.npy`` images, optional for pictures (pixel spacing 1), refused for NIfTI (the header
        has it).
    group : GroupSpec
        The group column and its background / target values.
    attributes : dict
        Attribute name -> ``"continuous"`` (numeric) or ``"categorical"`` (kept as strings).
    required : list of str or None
        Attributes that must be present in every row (default: none).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "cohort"
    participants: Path | None = None
    root: Path = Path(".")
    images: str
    grid: GridSpec | None = None
    group: GroupSpec
    attributes: dict[str, Literal["continuous", "categorical"]] = {}
    required: list[str] | None = None

    @field_validator("images")
    @classmethod
    def _known_placeholders(cls, template: str) -> str:
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        except ValueError as error:
            raise ValueError(f"{template!r} is not a valid template ({error})") from None
        unknown = sorted({field for field in fields if field not in PLACEHOLDERS})
        if unknown:
            names = ", ".join("{" + field + "}" for field in unknown)
            raise ValueError(f"unknown placeholder {names} in {template!r} (allowed: {{participant_id}}, {{session_id}})")
        if "participant_id" not in fields:
            raise ValueError(f"{template!r} must contain {{participant_id}}")
        return template

    @field_validator("attributes")
    @classmethod
    def _no_reserved_names(cls, attributes: dict[str, str]) -> dict[str, str]:
        reserved = sorted(set(attributes) & set(RESERVED_COLUMNS))
        if reserved:
            raise ValueError(f"{reserved} are reserved column names of a cohort table and cannot be attributes")
        return attributes

    @model_validator(mode="after")
    def _grid_fits_the_kind(self) -> "CohortSpec":
        if self.kind == "array" and self.grid is None:
            raise ValueError(
                "grid: required for .npy images (their files hold no affine); give grid: {affine: [[...4x4...]]} "
                "or grid: {voxel_size: 1.0}"
            )
        if self.kind == "nifti" and self.grid is not None:
            raise ValueError("grid: only for .npy and picture images; NIfTI headers carry their own grid")
        return self

    @model_validator(mode="after")
    def _required_are_attributes(self) -> "CohortSpec":
        unknown = [name for name in self.required or [] if name not in self.attributes]
        if unknown:
            raise ValueError(f"required: {unknown} are not attributes (attributes: {sorted(self.attributes)})")
        return self

    @property
    def uses_sessions(self) -> bool:
        """Whether the image template contains ``{session_id}``."""
        return "{session_id}" in self.images

    @property
    def kind(self) -> ImageKind:
        """``nifti``, ``array`` or ``picture``, from the template's suffix."""
        return image_kind(self.images)


class Problem(NamedTuple):
    """One validation finding; ``row`` is the participants.tsv line number (header = line 1)."""

    row: int | None
    participant_id: str | None
    problem: str


def _spec_error(source: str, error: ValidationError) -> CohortError:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "spec"
        message = item["msg"].removeprefix("Value error, ")
        given = "" if item["type"] in ("missing", "value_error") else f" (got {item['input']!r})"
        lines.append(f"{source}: {field}: {message}{given}")
    return CohortError("\n".join(lines))


def _read_participants(path: Path) -> pd.DataFrame:
    """Read participants.tsv with every cell as a string, keeping TSV line numbers.

    Values are kept as written (a site "01" stays "01", not 1) so categorical attributes and
    group values compare exactly; blank lines are dropped but still count for line numbers.
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
        else:
            raw = frame.astype(object).map(_cell_text).reset_index(drop=True)
            raw["row"] = np.arange(len(raw)) + 2
            table_name = "the participants DataFrame"
        self._root = (base_dir / spec.root).resolve()
        self.table = self._build_table(raw, table_name)
        self.categories = {
            name: sorted(self.table[name].dropna().unique().tolist())
            for name, kind in spec.attributes.items()
            if kind == "categorical"
        }
        # The cells as written, for messages ("age 'abc' is not a number") and required checks.
        self._written = raw[list(dict.fromkeys([spec.group.column, *spec.attributes]))].reset_index(drop=True)

    def _build_table(self, raw: pd.DataFrame, table_name: str) -> pd.DataFrame:
        spec = self.spec
        columns = [c for c in raw.columns if c != "row"]

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
        cohort.categories = parent.categories
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
        problems = self._table_problems()
        if check_images:
            problems += self._image_problems(progress)
        return sorted(problems, key=lambda p: (p.row is None, p.row or 0))

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
                problems.append(Problem(record["row"], pid, f"duplicate of line {first_line[key]} ({', '.join(key)})"))
            first_line.setdefault(key, record["row"])
            problems += [Problem(record["row"], pid, text) for text in self._row_problems(position, record)]
        counts = self.table["group"].value_counts()
        for group, values in (("background", spec.group.background), ("target", spec.group.target)):
            if counts.get(group, 0) == 0:
                problems.append(Problem(None, None, f"{group} group is empty (no row has {spec.group.column} in {values})"))
        return problems

    def _row_problems(self, position: int, record: dict) -> list[str]:
        """Problems of one row that need no other row: ids, group, attributes."""
        spec = self.spec
        found = []
        if pd.isna(record["participant_id"]):
            found.append("participant_id is missing")
        if spec.uses_sessions and pd.isna(record.get("session_id")):
            found.append("session_id is missing (the images template needs it)")
        if pd.isna(record["group"]):
            found.append(self._group_problem(position))
        for attribute in spec.required or []:
            if pd.isna(self._written.at[position, attribute]):
                found.append(f"required attribute '{attribute}' is missing")
        for attribute, kind in spec.attributes.items():
            written = self._written.at[position, attribute]
            if kind == "continuous" and not pd.isna(written) and not np.isfinite(record[attribute]):
                found.append(f"{attribute} {written!r} is not a finite number (continuous attribute)")
        return found

    def _group_problem(self, position: int) -> str:
        group = self.spec.group
        value = self._written.at[position, group.column]
        allowed = f"background {group.background}, target {group.target}"
        if pd.isna(value):
            return f"{group.column} is missing ({allowed})"
        return f"{group.column} {value!r} is neither background nor target ({allowed})"

    def _image_problems(self, progress: bool) -> list[Problem]:
        from rich.console import Console
        from rich.progress import track

        from neurocl.logs import transient_progress

        records = self.table[["participant_id", "image", "row"]].to_dict("records")
        reference: tuple[dict, Grid] | None = None
        problems: list[Problem] = []
        for record in track(
            records, description="validating images", disable=not transient_progress(progress), console=Console(stderr=True),
            transient=True
        ):
            if not isinstance(record["image"], str):
                continue
            pid = None if pd.isna(record["participant_id"]) else record["participant_id"]
            path = Path(record["image"])
            # The header (and its claimed size) is checked against the file and the reference grid
            # before any voxel is read: a forged header cannot make validate allocate gigabytes.
            grid = _read_grid(path, self.spec)
            if isinstance(grid, str):
                problems.append(Problem(record["row"], pid, grid))
                continue
            if reference is None:
                reference = (record, grid)
            else:
                where = f"line {reference[0]['row']}, {reference[0]['participant_id']}"
                differences = _grid_differences(grid, reference[1], where)
                problems += [Problem(record["row"], pid, text) for text in differences]
                if grid.shape != reference[1].shape:
                    continue
            problems += [Problem(record["row"], pid, text) for text in _voxel_problems(path, self.spec)]
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


def print_problems(problems: Sequence[Problem], console=None, cohort: Cohort | None = None) -> None:
    """Render problems as a rich table (row, participant_id, problem) and a summary line.

    With no problems, prints ``cohort OK: N images, B background, T target`` (counts when
    ``cohort`` is given).
    """
    from rich.console import Console
    from rich.table import Table

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
        table.add_row("-" if problem.row is None else str(problem.row), problem.participant_id or "-", problem.problem)
    console.print(table)
    n_rows = len({problem.row for problem in problems if problem.row is not None})
    console.print(f"[bold red]{len(problems)} problem(s)[/] in {n_rows} row(s)", highlight=False)


# ---------------------------------------------------------------------- splits
class Splits:
    """A subject-level split manifest (``splits.tsv``).

    ``table`` has one row per image: ``participant_id``, [``session_id``] and either ``split``
    (``train`` | ``val`` | ``test``: a holdout split) or ``fold`` (integer: the fold in which the
    subject is tested, for k-fold and leave-site-out). All sessions of a participant carry the
    same label; a participant never appears under two labels.
    """

    def __init__(self, table: pd.DataFrame, source: str = "splits") -> None:
        self.source = source
        self.table = self._validated(table.reset_index(drop=True), source)

    @property
    def column(self) -> str:
        """``"split"`` for a holdout manifest, ``"fold"`` for k-fold / leave-site-out."""
        return "split" if "split" in self.table.columns else "fold"

    @property
    def n_folds(self) -> int:
        """Number of folds (1 for a holdout split)."""
        return 1 if self.column == "split" else int(self.table["fold"].max()) + 1

    def save(self, path: str | os.PathLike) -> Path:
        """Write the manifest as a BIDS-style TSV, atomically."""
        return write_tsv(path, self.table)

    @classmethod
    def load(cls, path: str | os.PathLike, cohort: Cohort | None = None) -> "Splits":
        """Read and check a manifest; with ``cohort``, every subject must belong to it."""
        path = Path(path)
        if not path.is_file():
            raise CohortError(f"{path}: split manifest not found")
        try:
            table = read_tsv(path)
        except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
            raise CohortError(f"{path}: cannot read split manifest ({error})") from None
        splits = cls(table, source=str(path))
        if cohort is not None:
            known = set(cohort.table["participant_id"].dropna())
            unknown = sorted(set(splits.table["participant_id"]) - known)
            if unknown:
                raise CohortError(
                    f"{path}: {len(unknown)} participant(s) are not in cohort {cohort.name!r}: {_preview(unknown)}"
                )
        return splits

    @staticmethod
    def _validated(table: pd.DataFrame, source: str) -> pd.DataFrame:
        labels = [c for c in ("split", "fold") if c in table.columns]
        if "participant_id" not in table.columns or len(labels) != 1:
            raise CohortError(
                f"{source}: a split manifest has a participant_id column and exactly one of 'split' or 'fold' "
                f"(columns: {', '.join(map(str, table.columns))})"
            )
        column = labels[0]
        lines = pd.Series(np.arange(len(table)) + 2)
        missing = table["participant_id"].isna() | table[column].isna()
        if missing.any():
            raise CohortError(f"{source}: line {lines[missing.idxmax()]}: participant_id or {column} is missing")
        if column == "split":
            table["split"] = table["split"].astype(str)
            bad = ~table["split"].isin(SPLIT_NAMES)
            if bad.any():
                first = bad.idxmax()
                raise CohortError(
                    f"{source}: line {lines[first]}: unknown split {table.at[first, 'split']!r} "
                    f"(allowed: {', '.join(SPLIT_NAMES)})"
                )
        else:
            folds = pd.to_numeric(table["fold"], errors="coerce")
            bad = folds.isna() | (folds < 0) | (folds != folds.round())
            if bad.any():
                first = bad.idxmax()
                raise CohortError(
                    f"{source}: line {lines[first]}: fold {table.at[first, 'fold']!r} is not a non-negative integer"
                )
            table["fold"] = folds.astype(int)
        per_subject = table.groupby("participant_id", sort=False)[column].nunique()
        split_subjects = per_subject[per_subject > 1]
        if len(split_subjects):
            pid = split_subjects.index[0]
            values = sorted(map(str, table.loc[table["participant_id"] == pid, column].unique()))
            raise CohortError(
                f"{source}: participant {pid} appears in several {column}s ({', '.join(values)}); a subject belongs to one"
            )
        return table

    def _labels(self, cohort: Cohort) -> pd.Series:
        by_subject = self.table.drop_duplicates("participant_id").set_index("participant_id")[self.column]
        labels = cohort.table["participant_id"].map(by_subject)
        if labels.isna().any():
            absent = sorted(cohort.table.loc[labels.isna(), "participant_id"].astype(str).unique())
            raise CohortError(
                f"{self.source}: {len(absent)} participant(s) of cohort {cohort.name!r} are not in the split manifest: "
                f"{_preview(absent)}"
            )
        return labels

    def rows(self, cohort: Cohort, split: str | int) -> np.ndarray:
        """Cohort row indices in ``split`` (a split name for holdout, a fold number otherwise)."""
        labels = self._labels(cohort)
        if self.column == "fold":
            return np.flatnonzero(labels.to_numpy(dtype=int) == int(split))
        if split not in SPLIT_NAMES:
            raise ConfigError(f"split {split!r} is not one of {', '.join(SPLIT_NAMES)}")
        return np.flatnonzero((labels == split).to_numpy())

    def folds(self, cohort: Cohort) -> list[tuple[np.ndarray, np.ndarray]]:
        """(train_rows, test_rows) per fold; a holdout split gives one pair (train, test), val left out."""
        labels = self._labels(cohort)
        if self.column == "split":
            return [(self.rows(cohort, "train"), self.rows(cohort, "test"))]
        folds = labels.to_numpy(dtype=int)
        return [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in range(self.n_folds)]


def _preview(values: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


def make_splits(
    cohort: Cohort,
    method: Literal["holdout", "kfold", "leave-site-out"] = "holdout",
    n_splits: int = 5,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    stratify: Iterable[str] = ("group",),
    site_column: str = "site",
    seed: int = 0,
) -> Splits:
    """Subject-level splits, stratified by group and categorical attributes, seeded.

    Subjects (not images) are assigned, so all sessions of a participant share a split.
    Stratification is hierarchical: subjects are ordered by the ``stratify`` variables (first
    variable outermost, each stratum shuffled with ``seed``) and dealt out systematically along
    that order. Every split therefore gets its share of each stratum to within one subject, the
    first variable is balanced best, and a stratum too small to be split (e.g. a single subject)
    simply falls into one split instead of failing.

    Parameters
    ----------
    cohort : Cohort
    method : {"holdout", "kfold", "leave-site-out"}
        ``holdout``: train/val/test by fractions. ``kfold``: ``n_splits`` folds, each subject
        tested once. ``leave-site-out``: one fold per value of ``site_column`` (sorted), that
        site's subjects are its test set.
    n_splits : int
        Number of folds for ``kfold``.
    val_fraction, test_fraction : float
        Holdout fractions of subjects (train gets the rest).
    stratify : iterable of str
        ``"group"`` and/or categorical attributes (ignored by leave-site-out).
    site_column : str
        Categorical attribute holding the site, for leave-site-out.
    seed : int
        Same seed, same splits.

    Returns
    -------
    Splits
    """
    subjects = _subjects(cohort)
    rng = np.random.default_rng(seed)
    if method == "leave-site-out":
        subject_labels = _site_folds(cohort, subjects, site_column)
        column = "fold"
    elif method in ("holdout", "kfold"):
        order = _stratified_order(cohort, subjects, list(stratify), rng)
        if method == "kfold":
            subject_labels, column = _kfold_labels(order, n_splits, rng, len(subjects)), "fold"
        else:
            subject_labels, column = _holdout_labels(order, val_fraction, test_fraction, rng), "split"
    else:
        raise ConfigError(f"split method {method!r} is not one of holdout, kfold, leave-site-out")
    by_subject = dict(zip(subjects["participant_id"], subject_labels))
    table = cohort.keys()
    table[column] = table["participant_id"].map(by_subject)
    return Splits(table, source=f"{method} splits of {cohort.name!r}")


def _subjects(cohort: Cohort) -> pd.DataFrame:
    """One row per participant (its first row in the table)."""
    missing = cohort.table["participant_id"].isna()
    if missing.any():
        rows = cohort.table.loc[missing, "row"].tolist()
        raise CohortError(f"{cohort.source}: rows without participant_id (lines {rows}) cannot be split; run `neurocl validate`")
    return cohort.table.drop_duplicates("participant_id").reset_index(drop=True)


def _stratified_order(cohort: Cohort, subjects: pd.DataFrame, stratify: list[str], rng: np.random.Generator) -> np.ndarray:
    allowed = ["group"] + [name for name, kind in cohort.spec.attributes.items() if kind == "categorical"]
    for name in stratify:
        if name not in allowed:
            raise ConfigError(f"stratify: {name!r} cannot stratify; use group or a categorical attribute ({', '.join(allowed)})")
    shuffle_key = rng.permutation(len(subjects))
    # np.lexsort sorts by its last key first: the first stratify variable becomes the outermost.
    strata_keys = [subjects[name].fillna("n/a").astype(str).to_numpy() for name in reversed(stratify)]
    return np.lexsort([shuffle_key, *strata_keys])


def _kfold_labels(order: np.ndarray, n_splits: int, rng: np.random.Generator, n_subjects: int) -> np.ndarray:
    if not 2 <= n_splits <= n_subjects:
        raise ConfigError(f"n_splits {n_splits} must be between 2 and the number of subjects ({n_subjects})")
    fold_of_position = rng.permutation(n_splits)[np.arange(len(order)) % n_splits]
    labels = np.empty(len(order), dtype=int)
    labels[order] = fold_of_position
    return labels


def _holdout_labels(order: np.ndarray, val_fraction: float, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} {value} must be in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no subject to train on")
    # Systematic sampling with random starts: after p subjects along the stratified order,
    # floor(p * fraction + start) of them are in the split, so each stratum gets its share.
    test_start, val_start = rng.random(2)
    labels = np.empty(len(order), dtype=object)
    n_test = n_val = 0
    for position, subject in enumerate(order, start=1):
        if n_test < np.floor(position * test_fraction + test_start):
            labels[subject], n_test = "test", n_test + 1
        elif n_val < np.floor(position * val_fraction + val_start):
            labels[subject], n_val = "val", n_val + 1
        else:
            labels[subject] = "train"
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        if fraction > 0 and name not in labels:
            raise ConfigError(f"{name}_fraction {fraction} of {len(order)} subjects leaves the {name} split empty")
    return labels


def _site_folds(cohort: Cohort, subjects: pd.DataFrame, site_column: str) -> np.ndarray:
    if cohort.spec.attributes.get(site_column) != "categorical":
        raise ConfigError(
            f"site_column {site_column!r} is not a categorical attribute of cohort {cohort.name!r} "
            f"(attributes: {cohort.spec.attributes})"
        )
    sites_per_subject = cohort.table.groupby("participant_id", sort=False)[site_column].nunique(dropna=False)
    multi = sites_per_subject[sites_per_subject > 1]
    if len(multi):
        raise CohortError(
            f"{cohort.source}: participant(s) {_preview(list(multi.index))} have sessions at several sites; "
            "leave-site-out needs one site per subject"
        )
    missing = subjects[site_column].isna()
    if missing.any():
        absent = _preview(subjects.loc[missing, "participant_id"].tolist())
        raise CohortError(f"{cohort.source}: {site_column} is missing for {absent}; leave-site-out needs every subject's site")
    sites = sorted(subjects[site_column].unique())
    if len(sites) < 2:
        raise ConfigError(f"leave-site-out needs at least 2 values of {site_column!r}, cohort {cohort.name!r} has {sites}")
    return subjects[site_column].map({site: fold for fold, site in enumerate(sites)}).to_numpy(dtype=int)
