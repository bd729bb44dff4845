"""The cache folder of a store: its lock, the commit record's format, the manifest's entries (one
per image, with its content hash) and what an earlier build there lets a new one reuse."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout
from rich.console import Console

from neurocl.cohort import key_columns
from neurocl.errors import CohortError, ConfigError, StoreError
from neurocl.io import read_tsv
from neurocl.store.rowfile import RowFile

if TYPE_CHECKING:
    from neurocl.cohort import Cohort

STORE_FORMAT = 1


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


LOCK_NAME = ".store.lock"


@contextlib.contextmanager
def store_lock(cache_dir: Path, progress: bool = True) -> Iterator[None]:
    """Hold the store folder's lock (an OS file lock: released by the kernel if the process dies).

    Two runs sharing one store would otherwise interleave their builds, one removing the
    other's temporary files as stale. The second run waits, then finds the first one's build
    and reuses it. The folder is created here; one that cannot be (read-only, a file in the
    way) is a one-line error naming it.
    """
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cache_dir / LOCK_NAME))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if progress:
                _stderr().print(f"waiting for another process building the store in {cache_dir} ...", highlight=False)
            lock.acquire()
    except FileExistsError:
        raise StoreError(f"{cache_dir}: cannot hold the store: a file (not a folder) is in the way") from None
    except OSError as error:
        raise StoreError(f"{cache_dir}: cannot write the store here ({error.strerror or error})") from None
    try:
        yield
    finally:
        lock.release()


def _stderr():
    return Console(stderr=True)


def _refuse_input_folder(cache_dir: Path, cohort: "Cohort") -> None:
    """Refuse a cache inside the folder that holds the cohort's images (inputs are never written)."""
    root = cohort.input_folder()
    if root is not None and (cache_dir == root or root in cache_dir.parents):
        raise ConfigError(f"cache_dir {cache_dir} lies inside the cohort's input folder {root}; choose another")


def _known_hashes(previous: dict | None) -> dict[tuple[str, int, float], str]:
    """(source, size, mtime) -> sha256 of the files the previous build hashed."""
    if previous is None:
        return {}
    old = previous["manifest"]
    return {(str(row.source), int(row.size), float(row.mtime)): str(row.sha256)
            for row in old.itertuples(index=False) if isinstance(row.sha256, str)}


def _entries(cohort: "Cohort", params: str, known: dict | None = None) -> pd.DataFrame:
    """One manifest row per cohort row: keys, source, size, mtime, sha256, params.

    A file whose path, size and modification time match the previous build's keeps that build's
    hash (as make and rsync decide): a training job that opens a store prepared beforehand reads
    no image again. Any other file is hashed.
    """
    known = known or {}
    table = cohort.table
    keys = key_columns(table)
    rows = []
    for position, (_, row) in enumerate(table.iterrows()):
        source = Path(row["image"])
        label = f"row {row['row']} ({row['participant_id']})" if "row" in table.columns else str(row["participant_id"])
        if not source.is_file():
            raise CohortError(f"{label}: image {source} does not exist")
        status = source.stat()
        rows.append({
            **{key: row[key] for key in keys},
            "source": str(source),
            "size": int(status.st_size),
            "mtime": float(status.st_mtime),
            "sha256": known.get((str(source), int(status.st_size), float(status.st_mtime))) or sha256_file(source),
            "params": params,
            "_label": label,
        })
    return pd.DataFrame(rows)


def _with_index(entries: pd.DataFrame) -> pd.DataFrame:
    table = entries.drop(columns=["_label"], errors="ignore").copy()
    table.insert(0, "index", np.arange(len(table)))
    return table


def _previous_build(cache_dir: Path) -> dict | None:
    """The committed build in ``cache_dir`` (record, manifest, stage-1 memmap), or None."""
    record_path = cache_dir / "store.json"
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        if record.get("format") != STORE_FORMAT:
            return None
        return {
            "record": record,
            "manifest": read_tsv(cache_dir / record["manifest"]),
            "resampled": RowFile.open(
                cache_dir / record["resampled"],
                scales=np.load(cache_dir / record["scales"]) if "scales" in record else None,
            ),
        }
    except (OSError, ValueError, KeyError, TypeError, StoreError):
        return None  # an unreadable cache (or one made by from_array) is rebuilt from scratch, never trusted


def _reusable(entries: pd.DataFrame, previous: dict | None) -> dict[int, int]:
    """New index -> old index of entries whose content hash and stage-1 parameters are unchanged."""
    if previous is None:
        return {}
    keys = key_columns(entries)
    old = previous["manifest"]
    if any(key not in old.columns for key in keys):
        return {}
    old_lookup = {
        (tuple(str(v) for v in row[keys]), row["sha256"], row["params"]): int(row["index"]) for _, row in old.iterrows()
    }
    reuse = {}
    for new_index, row in entries.iterrows():
        key = (tuple(str(v) for v in row[keys]), row["sha256"], row["params"])
        if key in old_lookup:
            reuse[int(new_index)] = old_lookup[key]
    return reuse


def _same_order(previous: dict, entries: pd.DataFrame) -> bool:
    keys = key_columns(entries)
    old = previous["manifest"]
    return len(old) == len(entries) and all(
        old[key].astype(str).tolist() == entries[key].astype(str).tolist() for key in keys
    )


def _remove_stale(cache_dir: Path, keep: set[str]) -> None:
    """Delete files of earlier builds (and temporaries of interrupted ones) that the record no longer names.

    Called with the store's lock held: every builder takes that lock, so a temporary file that is
    not ours belongs to a build that was killed, never to one still running.
    """
    prefixes = tuple(f"{dot}{kind}-" for dot in ("", ".") for kind in ("resampled", "scales", "volumes", "mask", "manifest"))
    for path in cache_dir.iterdir():
        if path.name.startswith(prefixes) and path.name not in keep:
            try:
                path.unlink()
            except OSError:
                pass  # a file another process still maps is removed by the next build
