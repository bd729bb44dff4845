"""Atomic output: every file neurocl writes appears whole or not at all.

A killed run must never leave a half-written table, image or checkpoint that a
later run (or a researcher) would read as complete, so everything is written to a
temporary file in the destination folder and renamed into place (rename is
atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    ``suffix`` defaults to the destination's own suffixes so that writers that infer the
    format from the name (nibabel's ``.nii.gz``, matplotlib's ``.png``) keep working.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (NumPy scalars and arrays are converted)."""

    def default(value: Any) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"cannot serialise {type(value).__name__} to JSON")

    return write_text(path, json.dumps(obj, indent=2, default=default) + "\n")


def write_tsv(path: str | os.PathLike, table) -> Path:
    """Write a pandas DataFrame as a BIDS-style TSV (tab-separated, ``n/a`` for missing)."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a")
    return Path(path)


def read_tsv(path: str | os.PathLike):
    """Read a BIDS-style TSV: ``n/a`` (and empty cells) are missing; ids stay strings."""
    import pandas as pd

    return pd.read_csv(
        path,
        sep="\t",
        na_values=["n/a", "N/A", "NA", ""],
        keep_default_na=False,
        dtype={"participant_id": str, "session_id": str},
    )


def save_nifti(img, path: str | os.PathLike) -> Path:
    """Save a nibabel image atomically."""
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically: a checkpoint is only ever replaced by a complete one."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
