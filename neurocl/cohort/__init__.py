"""Cohorts: a BIDS participants table, one image per row, groups, attributes and splits.

Images are 3D or 2D, as NIfTI, NumPy arrays (``.npy``, with the grid given once in the spec) or
pictures (PNG/JPEG); :mod:`neurocl.images` reads them.

A :class:`Cohort` is built from a cohort spec YAML (``docs/cohorts.md``) or from Python
arguments. Loading is lenient: rows with a bad group value, a non-numeric continuous attribute
or a missing image are kept, so that :meth:`Cohort.validate` can report every problem at once
(``neurocl validate``); :meth:`Cohort.check` raises one :class:`~neurocl.errors.CohortError`
listing them all, which is what pipelines call before they touch the images. A spec may select
rows (``include``) and leave out the rows with problems (``on_invalid: exclude``); the rows left
out and why are in :attr:`Cohort.excluded`.

Splits are made at the subject level (all sessions of a participant stay together) and saved
as a ``splits.tsv`` manifest (:class:`Splits`).

The package, one job a module: :mod:`~neurocl.cohort.spec` (the spec schema and the subject key),
:mod:`~neurocl.cohort.table` (:class:`Cohort`: the table read and its rows validated),
:mod:`~neurocl.cohort.problems` (image checks, the problems table and the table of rows left out),
:mod:`~neurocl.cohort.query` (the spec's ``include`` query, checked and evaluated),
:mod:`~neurocl.cohort.truth` (the spec's ``ground_truth`` table, read and checked) and
:mod:`~neurocl.cohort.splits` (:class:`Splits` and :func:`make_splits`).
"""

from neurocl.cohort.problems import NOT_SELECTED, Problem, exclusion_summary, print_problems
from neurocl.cohort.spec import (
    GROUPS, KEY_COLUMNS, MISSING_VALUES, RESERVED_COLUMNS, SPLIT_NAMES, CohortSpec, GroupSpec, key_columns,
)
from neurocl.cohort.splits import Splits, make_splits
from neurocl.cohort.table import Cohort

__all__ = [
    "GROUPS", "KEY_COLUMNS", "MISSING_VALUES", "NOT_SELECTED", "RESERVED_COLUMNS", "SPLIT_NAMES", "Cohort", "CohortSpec", "GroupSpec",
    "Problem", "Splits", "exclusion_summary", "key_columns", "make_splits", "print_problems",
]
