"""Embeddings: a trained model loaded back, every subject embedded, and the one cohort/embeddings join.

A subject is one row of the cohort, one row of the store and one row of ``embeddings.tsv``; the
three are matched on the subject key (:data:`neurocl.cohort.KEY_COLUMNS`, ``participant_id`` and
``session_id`` when present), never on position: :meth:`neurocl.store.VolumeStore.rows_for` gives
the store row of each cohort row, :func:`join_embeddings` the cohort's group and attributes of each
embeddings row. Every consumer (probes, separation, maps) joins through :func:`join_embeddings`.

Embeddings carry a small sidecar (``embeddings.json`` beside ``embeddings.tsv``) with the
fingerprint of the cohort they were made from, so that probing them against another cohort
(synthetic ids overlap) is refused unless asked for (:func:`check_cohort`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from neurocl.cohort import Cohort, key_columns
from neurocl.logs import progress_console
from neurocl.errors import CohortError, ConfigError, NeuroclError
from neurocl.images import Grid, read_grid
from neurocl.io import read_tsv, torch_load_failure, write_json, write_tsv
from neurocl.methods import BaseMethod, method_from_checkpoint
from neurocl.outputs import claim_files, record_files
from neurocl.store import PreprocessConfig, VolumeStore

console = progress_console()

__all__ = [
    "check_cohort",
    "cohort_fingerprint",
    "embed_cohort",
    "embedding_spaces",
    "embeddings_table",
    "join_embeddings",
    "load_model",
    "read_embeddings",
    "sidecar_path",
    "write_embeddings",
]

_SPACE_COLUMN = re.compile(r"^(?P<prefix>[A-Za-z][A-Za-z0-9]*)_(?P<index>\d+)$")


# ---------------------------------------------------------------- trained models


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU; otherwise ``device`` itself."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU on this machine (use cpu or auto)")
    return resolved


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "auto") -> BaseMethod:
    """The trained method of a checkpoint (eval mode, on ``device``: a GPU when there is one by
    default), loaded with ``weights_only=True``.

    The module's ``grid`` holds the training store's affine, mask and preprocessing (for
    embedding new subjects on the same grid).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a damaged file
        raise ConfigError(f"checkpoint {path} cannot be read ({torch_load_failure(error)})") from None
    if not isinstance(state, dict) or "hyper_parameters" not in state or "state_dict" not in state:
        raise ConfigError(f"checkpoint {path} is not a neurocl training checkpoint")
    try:
        module = method_from_checkpoint(state).to(resolve_device(device))
    except NeuroclError as error:
        raise ConfigError(f"{path}: the checkpoint's settings are invalid ({error})") from None
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        # load_state_dict lists every mismatched tensor; the first line says what kind of mismatch.
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ConfigError(
            f"{path}: the checkpoint's settings (hyper_parameters) do not match its weights "
            f"({type(error).__name__}: {first[:200]})"
        ) from None
    module.grid = state.get("neurocl_grid")
    return module


def grid_record(store: VolumeStore) -> dict:
    """What embedding new subjects needs of the training store: its grid, mask and preprocessing."""
    return {
        "preprocess": store.config.model_dump(mode="json"),
        "affine": store.affine.tolist(),
        "mask": torch.as_tensor(np.asarray(store.mask, dtype=bool)),
    }


# ---------------------------------------------------------------- embedding


def embeddings_table(module, store: VolumeStore, cohort: Cohort, splits=None, batch_size: int = 16,
                     progress: bool = False) -> pd.DataFrame:
    """embeddings.tsv of every cohort row: keys, split, group, then ``<space>_<i>`` (``BaseMethod.embed``)."""
    representations = module.embed_store(store, store.rows_for(cohort), batch_size, progress=progress)
    table = cohort.keys().reset_index(drop=True)
    table["split"] = np.nan if splits is None else _split_labels(splits, cohort)
    table["group"] = cohort.table["group"].to_numpy()
    columns = {f"{space}_{i}": values[:, i] for space, values in representations.items() for i in range(values.shape[1])}
    return pd.concat([table, pd.DataFrame(columns)], axis=1)


def _split_labels(splits, cohort: Cohort) -> np.ndarray:
    labels = np.full(len(cohort), "n/a", dtype=object)
    for name in ("train", "val", "test"):
        labels[splits.rows(cohort, name)] = name
    return labels


def embed_cohort(checkpoint: str | os.PathLike, cohort_yaml: str | os.PathLike, out_tsv: str | os.PathLike,
                 device: str = "auto", batch_size: int = 16, overwrite: bool = False) -> Path:
    """``neurocl embed``: embeddings.tsv of new subjects, preprocessed onto the training store's grid.

    The images are resampled onto the stored (cropped) grid of the training run, masked with
    its brain mask and normalised the same way, in a temporary store that is removed after.
    An existing ``out_tsv`` (or its sidecar), e.g. a run's own embeddings, is replaced only with
    ``overwrite``; the refusal comes before any work. The network runs on ``device`` (a GPU
    when there is one by default), ``batch_size`` subjects at a time.
    """
    cohort = Cohort.from_yaml(cohort_yaml)
    outputs = [Path(out_tsv), sidecar_path(out_tsv)]
    claim_files(outputs, overwrite, {"checkpoint": Path(checkpoint), **cohort.input_paths()})
    module = load_model(checkpoint, device)
    if not module.grid:
        raise ConfigError(f"checkpoint {checkpoint} has no training grid record; it was not written by neurocl run")
    check_dimensions(module, cohort, checkpoint)
    cohort.check(check_images=True)
    affine = np.asarray(module.grid["affine"], dtype=float)
    mask = module.grid["mask"].numpy().astype(np.uint8)
    with tempfile.TemporaryDirectory(prefix="neurocl-embed-") as scratch:
        scratch = Path(scratch)
        nib.save(nib.Nifti1Image(mask, affine), scratch / "mask.nii.gz")
        preprocess = PreprocessConfig.model_validate(module.grid["preprocess"]).model_copy(update={
            "voxel_size": None, "reference": scratch / "mask.nii.gz", "mask": scratch / "mask.nii.gz",
            "crop_to_mask": False,
        })
        store = VolumeStore.build(cohort, scratch / "volumes", preprocess, progress=True)
        embeddings = embeddings_table(module, store, cohort, batch_size=batch_size)
    write_embeddings(out_tsv, embeddings, cohort)
    record_files(outputs)
    return Path(out_tsv)


def check_dimensions(module, cohort: Cohort, checkpoint: str | os.PathLike) -> None:
    """Refuse, in one line, a cohort of 2D images for a 3D checkpoint or the reverse (read from the first image's header)."""
    trained = int(module.grid["mask"].ndim)
    first = next((Path(image) for image in cohort.table["image"] if isinstance(image, str)), None)
    grid = read_grid(first, cohort.spec.kind, cohort.spec.grid) if first is not None else None
    if isinstance(grid, Grid) and len(grid.shape) != trained:
        raise ConfigError(f"{checkpoint}: the model was trained on {trained}D images but {cohort.source} holds "
                          f"{len(grid.shape)}D images ({first.name}: shape {grid.shape}); embed it with a "
                          f"{len(grid.shape)}D model")


def read_embeddings(path: str | os.PathLike) -> pd.DataFrame:
    """Read an embeddings table, refusing one whose embedding cells are not all finite numbers.

    A ``nan`` or a word in a ``<space>_<i>`` column would make the column non-numeric, or leave a
    hole, and the probes would then silently drop that dimension. The error names each such
    column and its TSV lines (header = line 1).
    """
    path = Path(path)
    try:
        table = read_tsv(path, CohortError, "embeddings table")
    except pd.errors.EmptyDataError:
        raise CohortError(f"{path}: embeddings table is empty (expected a header with participant_id and "
                          "<space>_<i> columns)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise CohortError(f"{path}: cannot read the embeddings table ({error})") from None
    problems = []
    for column in table.columns:
        if _SPACE_COLUMN.match(str(column)) is None or column in ("participant_id", "session_id"):
            continue
        numbers = pd.to_numeric(table[column], errors="coerce")
        bad = ~np.isfinite(numbers.to_numpy(dtype=float))
        if bad.any():
            rows = np.flatnonzero(bad)
            cells = ", ".join(f"{_cell(table[column].iloc[row])}" for row in rows[:3])
            lines = ", ".join(str(row + 2) for row in rows[:5]) + (" ..." if len(rows) > 5 else "")
            problems.append(f"{column} at line{'s' if len(rows) > 1 else ''} {lines} ({cells})")
    if problems:
        raise CohortError(f"{path}: embedding cells that are not finite numbers: {'; '.join(problems)}; "
                          "fix or re-make the table (a missing dimension would silently change the probes)")
    return table


def _cell(value) -> str:
    return "empty/n/a" if pd.isna(value) and not isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


# ---------------------------------------------------------------- cohort sidecar


def cohort_fingerprint(cohort: Cohort) -> str:
    """sha256 of what a cohort says about its subjects: keys, group and attributes (as text), row by row.

    Moving the cohort's folder leaves it unchanged; another cohort, an edited label or an added
    subject changes it.
    """
    columns = [*cohort.key_columns, "group", *cohort.attribute_kinds]
    text = cohort.table[columns].astype(str).to_csv(sep="\t", index=False)
    text += json.dumps(cohort.attribute_kinds, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def sidecar_path(embeddings_tsv: str | os.PathLike) -> Path:
    """The sidecar of an embeddings table: same name, ``.json`` (``embeddings.tsv`` -> ``embeddings.json``)."""
    return Path(embeddings_tsv).with_suffix(".json")


def write_embeddings(path: str | os.PathLike, table: pd.DataFrame, cohort: Cohort) -> Path:
    """Write an embeddings table and its sidecar (the cohort it was made from and its fingerprint)."""
    path = write_tsv(path, table)
    write_json(sidecar_path(path), {"cohort": str(cohort.source), "cohort_fingerprint": cohort_fingerprint(cohort)})
    return path


def check_cohort(embeddings_tsv: str | os.PathLike, cohort: Cohort, allow_other: bool = False) -> None:
    """Refuse to use embeddings with a cohort other than the one they were made from.

    Embeddings without a sidecar (made elsewhere, or copied without it) are refused too, since
    nothing then says which cohort they describe; with ``allow_other`` either is only reported.
    """
    sidecar = sidecar_path(embeddings_tsv)
    if not sidecar.is_file():
        message = f"{embeddings_tsv} has no sidecar {sidecar.name}, so nothing says which cohort it was made from"
        if not allow_other:
            # Ids alone cannot tell: two cohorts of sub-0001 ... sub-0200 would be joined row by row.
            raise CohortError(f"{message}; copy the sidecar with it, or pass --other-cohort to probe it against "
                              f"{cohort.source} anyway")
        console.print(f"[yellow]warning:[/] {message}; probing it against {cohort.source} anyway (--other-cohort)")
        return
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CohortError(f"{sidecar}: unreadable embeddings sidecar ({error})") from None
    if record.get("cohort_fingerprint") == cohort_fingerprint(cohort):
        return
    message = (f"{embeddings_tsv} was made from cohort {record.get('cohort')}, not from {cohort.source} "
               "(other subjects, groups or attributes)")
    if not allow_other:
        raise CohortError(message + "; pass --other-cohort to probe it against this cohort anyway")
    console.print(f"[yellow]warning:[/] {message}; probing it anyway (--other-cohort)")


# ---------------------------------------------------------------- the join


def embedding_spaces(embeddings: pd.DataFrame) -> dict[str, list[str]]:
    """Group the numeric ``prefix_<i>`` columns of an embeddings table into spaces.

    Returns
    -------
    dict
        ``{"common": ["common_0", ...], "salient": [...]}`` in column-index order,
        spaces in the order they first appear.
    """
    spaces: dict[str, list[tuple[int, str]]] = {}
    keys = set(key_columns(embeddings))
    for column in embeddings.columns:
        match = _SPACE_COLUMN.match(str(column))
        if match is None or column in keys or not pd.api.types.is_numeric_dtype(embeddings[column]):
            continue
        spaces.setdefault(match["prefix"], []).append((int(match["index"]), column))
    return {prefix: [name for _, name in sorted(columns)] for prefix, columns in spaces.items()}


def join_embeddings(embeddings: pd.DataFrame, cohort: Cohort, source: str = "embeddings",
                    strict: bool = False) -> pd.DataFrame:
    """Attach each embeddings row's cohort row, group and attributes, by subject key.

    Parameters
    ----------
    embeddings : DataFrame
        ``participant_id``, [``session_id``], [``split``], then ``<space>_<i>`` columns.
    cohort : Cohort
    source : str
        Name of the embeddings in messages.
    strict : bool
        Refuse embeddings rows that are not in the cohort (otherwise they are ignored, with a notice).

    Returns
    -------
    DataFrame
        The embeddings' keys, split and space columns, then ``cohort_row`` (position in the
        cohort table), ``group`` and every cohort attribute (from the cohort, not from the
        embeddings); one row per matched embeddings row, in the embeddings' order.

    Raises
    ------
    CohortError
        An empty join, duplicated keys, a missing key column, or (``strict``) unknown rows.
    """
    if "participant_id" not in embeddings.columns:
        raise CohortError(f"{source}: no participant_id column (columns: {list(embeddings.columns)})")
    table = cohort.table
    keys = ["participant_id"]
    if "session_id" in embeddings.columns and "session_id" in table.columns:
        keys.append("session_id")
    elif cohort.has_sessions:
        raise CohortError(f"{source}: the cohort has sessions but the embeddings have no session_id column")
    duplicated = embeddings.duplicated(keys, keep=False)
    if duplicated.any():
        first = embeddings.loc[duplicated, keys].iloc[0].tolist()
        raise CohortError(f"{source}: {int(duplicated.sum())} rows share their {'/'.join(keys)} (first: {first})")
    space_columns = [column for columns in embedding_spaces(embeddings).values() for column in columns]
    left = embeddings[keys + [c for c in ("split",) if c in embeddings.columns] + space_columns].copy()
    attribute_names = list(cohort.attribute_kinds)
    right = table[keys + ["group"] + attribute_names].copy()
    right["cohort_row"] = np.arange(len(table))
    for key in keys:
        left[key] = left[key].astype(str)
        right[key] = right[key].astype(str)
    merged = left.merge(right, on=keys, how="outer", indicator=True)  # sorted by key
    only_embeddings = merged.loc[merged["_merge"] == "left_only", keys]
    only_cohort = merged.loc[merged["_merge"] == "right_only", keys]
    if len(only_embeddings):
        message = (f"{source}: {len(only_embeddings)} rows not in the cohort "
                   f"(e.g. {', '.join(only_embeddings['participant_id'].head(5))})")
        if strict:
            raise CohortError(message)
        console.print(f"[yellow]note:[/] {message}, ignored")
    if len(only_cohort):
        console.print(f"[yellow]note:[/] {len(only_cohort)} cohort rows have no embedding in {source} "
                      f"(e.g. {', '.join(only_cohort['participant_id'].head(5))})")
    merged = merged[merged["_merge"] == "both"].drop(columns="_merge").reset_index(drop=True)
    if merged.empty:
        raise CohortError(
            f"{source}: no row matches the cohort by {'/'.join(keys)} "
            f"(first ids: embeddings {embeddings['participant_id'].head(3).tolist()}, cohort {table['participant_id'].head(3).tolist()})"
        )
    merged["cohort_row"] = merged["cohort_row"].astype(int)
    return merged
