"""The cohort spec (YAML schema: participants, images, group, attributes, grid) and the subject key."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from neurocl.cohort.query import check_query
from neurocl.errors import CohortError, validation_message
from neurocl.images import GridSpec, ImageKind, image_kind
from neurocl.settings import unknown_field_hint

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
    ground_truth : Path or None
        A TSV of known latent factors (a synthetic cohort's ``ground_truth.tsv``), keyed by
        ``participant_id`` (and ``session_id`` when it has that column); the pipeline probes and
        clusters every factor that is not already an attribute (:mod:`neurocl.cohort.truth`).
    include : str, list of str or None
        Which rows of participants.tsv make the cohort, applied before any check: a query over
        its columns (``"session_id == 'ses-1' and site == 'A'"``, :mod:`neurocl.cohort.selection`)
        or a list of participant ids. ``None``: every row.
    on_invalid : "error" or "exclude"
        What a row with a problem of its own (a missing group or required attribute, a missing
        or broken image, ...) does: ``error`` (default) stops every pipeline until it is fixed;
        ``exclude`` leaves the row out and records why (:attr:`Cohort.excluded`). Problems of the
        cohort as a whole (a missing column, an empty group, no readable image) stay errors.
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
    ground_truth: Path | None = None
    include: str | list[str] | None = None
    on_invalid: Literal["error", "exclude"] = "error"

    @field_validator("include", mode="before")
    @classmethod
    def _include_ids_as_text(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [str(item) for item in value]
        return value

    @field_validator("include")
    @classmethod
    def _include_selects_something(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list selects no participant (leave include out to keep every row)")
        if isinstance(value, str):
            check_query(value)
        return value

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


def _spec_error(source: str, error: ValidationError) -> CohortError:
    # A model-level problem of a cohort spec is named "spec" (the spec as a whole).
    return CohortError(validation_message(source, error, top="spec", hint=unknown_field_hint(_spec_fields_at)))


def _spec_fields_at(location: tuple) -> list[str] | None:
    """The fields of the cohort spec's section at ``location`` (for the nearest-field hint of a typo)."""
    section = {(): CohortSpec, ("group",): GroupSpec, ("grid",): GridSpec}.get(location)
    return None if section is None else list(section.model_fields)
