"""The cohort spec's ``include``: which rows of participants.tsv make the cohort.

A query is pandas' expression syntax (``DataFrame.eval``, python engine) over the table's
columns, e.g. ``"session_id == 'ses-1' and site == 'A'"`` or ``"age >= 18 and
participant_id.str.startswith('sub-A')"``. It is read by a whitelist before pandas sees it:
comparisons, ``and``/``or``/``not``, arithmetic, constants, lists, column names (backticks for
names with spaces) and a few read-only Series methods. Anything else (``@`` local variables,
dunder names, other calls such as ``age.to_csv('...')``, which would write a file) is refused, so
a spec can select rows and do nothing else.

Each column is typed as the cohort types it: declared categorical attributes and ids are text
(site ``01`` stays ``'01'``), declared continuous attributes are numbers, and any other column is
a number when every value it holds is one, else text. Missing cells (``n/a``) are NaN: they
compare unequal to everything, so ``site == 'A'`` leaves out a row without a site.
"""

from __future__ import annotations

import ast
import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from neurocl.errors import CohortError

if TYPE_CHECKING:
    from neurocl.cohort.spec import CohortSpec

# Read-only methods a query may call on a column (``x.isna()``) or on its ``.str`` accessor.
METHODS = frozenset({"isna", "notna", "isnull", "notnull", "isin", "between", "startswith", "endswith", "contains",
                     "match", "fullmatch", "lower", "upper", "strip", "len"})
_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.Invert,
          ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd, ast.BitOr,
          ast.Compare, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn,
          ast.Name, ast.Load, ast.Constant, ast.List, ast.Tuple, ast.Attribute, ast.Call, ast.keyword)
_BACKTICKED = re.compile(r"`[^`]*`")


def check_query(query: str) -> None:
    """Refuse (ValueError, one line) a query that is empty, does not parse, or does more than select rows."""
    if not query.strip():
        raise ValueError("an empty query selects nothing (leave include out to keep every row)")
    if "@" in query:
        raise ValueError(f"{query!r}: '@' (a local variable) is not allowed; write the value itself")
    if "__" in query:
        raise ValueError(f"{query!r}: names with '__' are not allowed")
    try:
        tree = ast.parse(_BACKTICKED.sub("column", query).strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"{query!r} is not a valid query ({error.msg})") from None
    for node in ast.walk(tree):
        if not isinstance(node, _NODES):
            raise ValueError(f"{query!r}: {type(node).__name__} is not allowed in a query (comparisons, and/or/not, "
                             "arithmetic, constants and lists only)")
        if isinstance(node, ast.Attribute) and node.attr != "str" and node.attr not in METHODS:
            raise ValueError(f"{query!r}: .{node.attr} is not allowed (allowed: .str, {', '.join(sorted(METHODS))})")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Attribute) and node.func.attr in METHODS):
            raise ValueError(f"{query!r}: only these methods may be called: {', '.join(sorted(METHODS))}")


def query_frame(raw: pd.DataFrame, spec: "CohortSpec") -> pd.DataFrame:
    """The participants table's columns (text as read) typed for a query (see the module docstring)."""
    text = {"participant_id", "session_id"} | {name for name, kind in spec.attributes.items() if kind == "categorical"}
    columns = {}
    for column in raw.columns:
        if column == "row":
            continue
        values = raw[column]
        numbers = pd.to_numeric(values, errors="coerce")
        numeric = spec.attributes.get(column) == "continuous" or (
            column not in text and values.notna().any() and numbers.notna().sum() == values.notna().sum())
        columns[column] = numbers.astype(float) if numeric else values.astype(object)
    return pd.DataFrame(columns, index=raw.index)


def included_rows(raw: pd.DataFrame, spec: "CohortSpec", source: str) -> np.ndarray:
    """Boolean mask of the rows of ``raw`` (participants.tsv as read) that ``spec.include`` selects.

    Raises
    ------
    CohortError
        One line naming ``include``: a listed id that is not in the table, a query naming an
        unknown column, failing on the values, or not giving True/False per row.
    """
    include = spec.include
    if include is None:
        return np.ones(len(raw), dtype=bool)
    if "participant_id" not in raw.columns:
        return np.ones(len(raw), dtype=bool)  # the table is refused for it when the cohort is built
    ids = raw["participant_id"]
    if isinstance(include, list):
        unknown = [pid for pid in dict.fromkeys(include) if pid not in set(ids.dropna())]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f", ... ({len(unknown) - 5} more)" if len(unknown) > 5 else "")
            raise CohortError(f"{source}: include: {shown} not in the participants table")
        return ids.isin(include).to_numpy(dtype=bool)
    frame = query_frame(raw, spec)
    try:
        result = frame.eval(include, engine="python", local_dict={}, global_dict={}, resolvers=())
    except Exception as error:  # pandas raises many types: an unknown name, a str/number comparison, ...
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CohortError(f"{source}: include: {include!r} failed: {message} "
                          f"(columns: {', '.join(frame.columns)})") from None
    if not isinstance(result, pd.Series) or result.dtype != bool:
        raise CohortError(f"{source}: include: {include!r} must give True or False for each row "
                          f"(got {type(result).__name__}{'' if not isinstance(result, pd.Series) else ' of ' + str(result.dtype)})")
    return result.to_numpy(dtype=bool)
