"""A cohort's ground truth: known latent factors (a synthetic cohort's ``ground_truth.tsv``), keyed like its rows.

The cohort spec's ``ground_truth: PATH`` (relative to the YAML) names a TSV with ``participant_id``,
optionally ``session_id`` (then the factors are per session, else per participant and shared by
its sessions), and one column per factor. :func:`read_ground_truth` validates it against the
cohort, naming the file and line of the first problem. :func:`truth_factors` says which factors the
pipeline probes (those the participants table does not already give as attributes) and of which
kind; :func:`target_only_factors` which factors (attributes or not) are subtype-like (categorical,
one value in every background subject, several among targets), so also scored by clustering.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from neurocl.cohort.spec import MISSING_VALUES
from neurocl.errors import CohortError

if TYPE_CHECKING:
    from neurocl.cohort.table import Cohort

# Integer-valued factors with at most this many values are categories (subtype 0..K), not quantities.
MAX_INTEGER_CATEGORIES = 10
_NOT_FACTORS = ("participant_id", "session_id", "group")


def read_ground_truth(path: str | Path, cohort: "Cohort") -> pd.DataFrame:
    """The ground-truth table at ``path``, checked against ``cohort`` (CohortError naming the file and line).

    Checks: the file exists and reads as a TSV; it has ``participant_id`` and at least one factor
    column; no row lacks its key; no key is given twice; every key is a row of the cohort
    (``session_id`` only when the cohort has sessions). Cohort rows without a truth row are allowed
    (their factors are missing); the truth of rows the spec left out (:attr:`Cohort.excluded`) is dropped.

    Returns
    -------
    DataFrame: the key columns as text, then every factor column (numbers where every value is one).
    """
    path = Path(path)
    where = f"{cohort.source}: ground_truth: {path}"
    if not path.is_file():
        raise CohortError(f"{where} not found")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, na_values=MISSING_VALUES, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise CohortError(f"{where} is empty (expected a header line with participant_id)") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise CohortError(f"{where}: cannot read it ({error})") from None
    table.columns = [str(column).strip() for column in table.columns]
    if "participant_id" not in table.columns:
        raise CohortError(f"{where}: no participant_id column (columns: {', '.join(table.columns)})")
    keys = ["participant_id"] + (["session_id"] if "session_id" in table.columns else [])
    if "session_id" in keys and not cohort.has_sessions:
        raise CohortError(f"{where}: has a session_id column but the cohort's participants table has none")
    if not [column for column in table.columns if column not in _NOT_FACTORS]:
        raise CohortError(f"{where}: no factor column besides {', '.join(c for c in table.columns if c in _NOT_FACTORS)}")
    lines = np.arange(len(table)) + 2  # header = line 1
    for key in keys:
        missing = table[key].isna().to_numpy()
        if missing.any():
            raise CohortError(f"{where} line {lines[missing][0]}: {key} is missing")
    duplicated = table.duplicated(keys, keep=False).to_numpy()
    if duplicated.any():
        first_key = table.loc[duplicated, keys].iloc[0]
        same = (table[keys] == first_key).all(axis=1).to_numpy()
        raise CohortError(f"{where} line {lines[same][1]}: duplicate of line {lines[same][0]} ({'/'.join(first_key)})")
    kept = _rows_in(table, cohort.table, keys)
    # A row the spec left out (include, on_invalid: exclude) is still a row of participants.tsv: its
    # truth is known, not a typo, and is dropped with the row.
    left_out = (_rows_in(table, cohort.excluded, keys) if cohort.excluded is not None
                else np.zeros(len(table), dtype=bool))
    unknown = ~(kept | left_out)
    if unknown.any():
        raise CohortError(f"{where} line {lines[unknown][0]}: {'/'.join(table.loc[unknown, keys].iloc[0])} is not a "
                          f"row of the cohort's participants table")
    table = table.loc[kept]
    for column in table.columns:
        if column not in keys:
            numbers = pd.to_numeric(table[column], errors="coerce")
            if numbers.notna().sum() == table[column].notna().sum():
                table[column] = numbers
    return table.reset_index(drop=True)


def _rows_in(table: pd.DataFrame, rows: pd.DataFrame, keys: list[str]) -> np.ndarray:
    """Which rows of ``table`` have their key among ``rows``' (keys compared as text)."""
    known = rows[keys].astype(str).drop_duplicates()
    return table[keys].merge(known, on=keys, how="left", indicator=True)["_merge"].eq("both").to_numpy()


def factor_kind(values: pd.Series) -> str:
    """``categorical`` for text and for integers with at most :data:`MAX_INTEGER_CATEGORIES` values, else ``continuous``."""
    values = values.dropna()
    if not pd.api.types.is_numeric_dtype(values):
        return "categorical"
    integral = bool(np.allclose(values, np.round(values))) if len(values) else True
    return "categorical" if integral and values.nunique() <= MAX_INTEGER_CATEGORIES else "continuous"


def truth_factors(truth: pd.DataFrame, cohort: "Cohort") -> dict[str, str]:
    """Factor -> kind of every ground-truth column that the cohort does not already have (attributes, group column)."""
    given = {*_NOT_FACTORS, cohort.spec.group.column, *cohort.attribute_kinds}
    return {column: factor_kind(truth[column]) for column in truth.columns if column not in given}


def target_only_factors(table: pd.DataFrame, factors) -> dict[str, int]:
    """Subtype-like factors -> their number of values among targets: categorical, one value (or none) in
    every background row, at least two among target rows. ``table``: rows with a ``group`` column
    (background/target, e.g. the truth joined to the cohort) and the ``factors`` columns."""
    is_target = table["group"].eq("target")
    out = {}
    for factor in factors:
        if factor_kind(table[factor]) != "categorical":
            continue
        in_background, in_target = table.loc[~is_target, factor].nunique(), table.loc[is_target, factor].nunique()
        if in_background <= 1 and in_target >= 2:
            out[factor] = int(in_target)
    return out
