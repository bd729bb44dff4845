"""Subject-level splits: the :class:`Splits` manifest (``splits.tsv``) and :func:`make_splits`
(holdout, k-fold, leave-site-out; all sessions of a participant stay together)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import pandas as pd

from neurocl.cohort.spec import SPLIT_NAMES
from neurocl.cohort.table import Cohort
from neurocl.errors import CohortError, ConfigError
from neurocl.io import read_tsv, write_tsv


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
            table = read_tsv(path, CohortError, "split manifest")
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
