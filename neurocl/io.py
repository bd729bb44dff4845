"""Safe input and atomic output: what neurocl reads cannot blow up, what it writes appears whole or not at all.

A killed run must never leave a half-written table, image or checkpoint that a
later run (or a researcher) would read as complete, so everything is written to a
temporary file in the destination folder and renamed into place (rename is
atomic on POSIX within one filesystem). The file gets the mode an ordinary
``open`` would give it under the user's umask (``mkstemp`` alone makes it 0600,
which would hide a shared store or report from colleagues). A full disk surfaces as
one :class:`~neurocl.errors.OutputError` naming the file, and nothing half-written.

YAML (pipeline and cohort specs) is read by one loader, :func:`load_yaml`: safe
(no Python objects) and with alias expansion bounded, so a "billion laughs" file is
refused in microseconds instead of exhausting memory downstream. A mapping that gives one key
twice is refused too: YAML keeps the last silently, so a second ``group:`` block would swap a
cohort's patients and controls without a word. Tables (:func:`read_tsv`) are refused when a
column name is repeated, for the same reason (pandas would rename the second ``age`` to
``age.1`` and every reader would use the first).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

from neurocl.errors import NeuroclError, OutputError

# A spec with every alias expanded may hold at most this many YAML nodes. Real pipeline and
# cohort specs hold a few hundred; a billion-laughs bomb holds 10^9 from a few hundred bytes.
YAML_MAX_EXPANDED_NODES = 100_000
# Error numbers that mean "the disk (or quota) is full": said as such, naming the file.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(path: Path, error: BaseException) -> OutputError:
    free = free_bytes(path.parent)
    where = "" if free is None else f", {format_bytes(free)} free"
    return OutputError(f"{path}: disk full while writing ({error.strerror if isinstance(error, OSError) else error}{where}); "
                       "nothing was written, free some space and run again")


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free bytes for this user on the filesystem holding ``folder`` (None if it cannot be asked)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def preallocate(path: str | os.PathLike, size: int) -> None:
    """Reserve ``size`` bytes for ``path`` on disk now, so a full disk is an error here and not a
    SIGBUS later when a memory map writes into a page the filesystem cannot back."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno in DISK_FULL:
            raise _disk_full(path, error) from None
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        # Filesystems without fallocate: glibc's emulation is missing too, so write the zeros.
        with os.fdopen(os.dup(fd), "r+b") as handle:
            handle.seek(0)
            block = b"\0" * (1 << 20)
            try:
                for start in range(0, size, len(block)):
                    handle.write(block[: min(len(block), size - start)])
                handle.flush()
            except OSError as write_error:
                if write_error.errno in DISK_FULL:
                    raise _disk_full(path, write_error) from None
                raise
    finally:
        os.close(fd)


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes into ``folder`` when the filesystem has fewer free."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise OutputError(
            f"{folder}: not enough free space for {what}: needs {format_bytes(needed)}, "
            f"{format_bytes(free)} free"
        )


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
        os.chmod(tmp_path, 0o666 & ~current_umask())
        try:
            os.replace(tmp_path, path)
        except OSError as error:  # e.g. a folder standing where the file goes
            raise OutputError(f"{path}: cannot write here ({error.strerror or error})") from None
    except OSError as error:
        if error.errno in DISK_FULL:
            raise _disk_full(path, error) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
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


def read_tsv(path: str | os.PathLike, error: type[NeuroclError] = NeuroclError, what: str = "table"):
    """Read a BIDS-style TSV: ``n/a`` (and empty cells) are missing; ids stay strings.

    A column name given twice is refused as one ``error`` naming the file and the columns
    (``what`` names the table's role).
    """
    import pandas as pd

    table = pd.read_csv(
        path,
        sep="\t",
        na_values=["n/a", "N/A", "NA", ""],
        keep_default_na=False,
        dtype={"participant_id": str, "session_id": str},
    )
    refuse_duplicate_columns(path, error, what)
    return table


def refuse_duplicate_columns(path: str | os.PathLike, error: type[NeuroclError], what: str,
                             encoding: str = "utf-8") -> None:
    """Raise ``error`` when the header line of the TSV ``path`` names a column twice.

    The header is read as written (pandas renames a repeated ``age`` to ``age.1``, and that name
    could also be a genuine column), its names stripped of surrounding spaces as the tables'
    readers strip them.
    """
    with open(path, encoding=encoding, newline="") as handle:
        header = next(csv.reader(handle, delimiter="\t"), [])
    positions: dict[str, list[int]] = {}
    for position, name in enumerate(header, start=1):
        positions.setdefault(name.strip(), []).append(position)
    repeated = {name: where for name, where in positions.items() if len(where) > 1}
    if repeated:
        said = "; ".join(f"{name!r} in columns {', '.join(map(str, where))}" for name, where in repeated.items())
        raise error(f"{path}: {what} names a column more than once ({said}); "
                    "only the first would be read: rename or remove the others")


def save_nifti(img, path: str | os.PathLike) -> Path:
    """Save a nibabel image atomically."""
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically: a checkpoint is only ever replaced by a complete one.

    The checkpoint is serialised in memory and written with an ordinary file write, so that a
    full disk is an ``ENOSPC`` naming the file (torch's own writer reports it as an assertion
    about stream positions).
    """
    import io as _io

    import torch

    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(buffer.getbuffer())
    return Path(path)


def torch_load_failure(error: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in a few words.

    torch's messages run to paragraphs that advise ``weights_only=False`` (which would run the
    file's code): neurocl never does that, so the advice is dropped and only what is wrong stays.
    """
    text = str(error)
    blocked = re.search(r"(?:GLOBAL|global:?) (?:GLOBAL )?([\w.]+)", text)
    if "Weights only load failed" in text or blocked:
        what = f" ({blocked.group(1)})" if blocked else ""
        return f"it holds a Python object{what} beyond tensors and plain data, which neurocl never loads"
    if "zip archive" in text or "central directory" in text or isinstance(error, (EOFError, KeyError)):
        return "damaged or truncated: not a complete torch file"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    sentence = first.split(". ")[0].rstrip(".")
    return f"{type(error).__name__}: {sentence if len(sentence) <= 120 else sentence[:117].rsplit(' ', 1)[0] + ' ...'}"


def load_yaml(path: str | os.PathLike, error: type[NeuroclError], what: str) -> Any:
    """Read a YAML file safely: plain data only, alias expansion bounded, errors as one ``error`` line.

    ``what`` names the file's role in messages ("pipeline", "cohort spec"). See :func:`parse_yaml`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: {what} is a folder, expected a YAML file") from None
    except UnicodeDecodeError as problem:
        raise error(f"{path}: {what} is not UTF-8 text ({problem.reason} at byte {problem.start})") from None
    except OSError as problem:
        raise error(f"{path}: cannot read the {what} ({problem.strerror or problem})") from None
    return parse_yaml(text, error, str(path), what)


def parse_yaml(text: str, error: type[NeuroclError], source: str, what: str = "YAML") -> Any:
    """YAML text as plain data, or one ``error`` line starting with ``source`` (a path, a --set option).

    The document is composed into YAML nodes first and its size with every alias expanded is
    counted (each node once, by identity, so the count itself is linear); beyond
    :data:`YAML_MAX_EXPANDED_NODES`, or with an alias that contains itself, the text is refused
    before any Python object is built. A mapping that gives a key twice is refused, naming the key
    and both lines (merge keys ``<<`` may still be overridden, as YAML defines them).
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, set())
        if size > YAML_MAX_EXPANDED_NODES:
            raise error(
                f"{source}: {what} expands to more than {YAML_MAX_EXPANDED_NODES:,} values through YAML aliases "
                "(an alias bomb?); refused"
            )
        repeated = _repeated_key(loader, node, "", set())
        if repeated:
            raise error(f"{source}: {repeated}; YAML would keep only the last one silently: remove or rename one")
        return loader.construct_document(node)
    except yaml.YAMLError as problem:
        message = " ".join(str(problem).split())
        raise error(f"{source}: not valid YAML ({message})") from None
    except RecursionError:
        raise error(f"{source}: {what} is nested too deeply to be a spec; refused") from None
    finally:
        loader.dispose()


def _repeated_key(loader, node, where: str, seen: set[int]) -> str | None:
    """The first key given twice in one mapping under ``node`` ("duplicate key ... (lines i and j)"), or None.

    Keys compare as the values they construct to (``1`` and ``0x1`` are one key, ``1`` and ``"1"``
    are two); only scalar keys are compared. Each node is visited once, so aliases cost nothing.
    """
    if id(node) in seen:
        return None
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = [(f"{where}[{index}]", child) for index, child in enumerate(node.value)]
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[Any, Any] = {}
        children = []
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = loader.construct_object(key_node)
                mark = key_node.start_mark
                with contextlib.suppress(TypeError):  # an unhashable key is the constructor's to refuse
                    if key in first_line:
                        inside = f" in {where}" if where else ""
                        return f"duplicate key {key!r}{inside} ({_two_places(first_line[key], mark)})"
                    first_line[key] = mark
                children.append((f"{where}.{key}" if where else str(key), value_node))
            else:
                children.append((where, value_node))
    else:
        return None
    for child_where, child in children:
        found = _repeated_key(loader, child, child_where, seen)
        if found:
            return found
    return None


def _two_places(first, second) -> str:
    """Where two YAML marks are, for a message: "lines 3 and 9", or columns when on one line."""
    if first.line == second.line:
        return f"line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"
    return f"lines {first.line + 1} and {second.line + 1}"


def _expanded_size(node, sizes: dict[int, int], active: set[int]) -> int:
    """Nodes in ``node`` with aliases expanded; memoised per node, a node inside itself is refused."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise yaml.YAMLError(f"an alias refers to a value that contains it (line {node.start_mark.line + 1})")
    active.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            total += _expanded_size(child, sizes, active)
            if total > YAML_MAX_EXPANDED_NODES:
                break
    elif isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            total += _expanded_size(key_node, sizes, active) + _expanded_size(value_node, sizes, active)
            if total > YAML_MAX_EXPANDED_NODES:
                break
    active.discard(key)
    sizes[key] = total
    return total
