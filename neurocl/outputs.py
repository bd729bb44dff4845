"""Where neurocl writes: only inside its own outputs, and never over a file it did not write.

The one rule every command follows, enforced here and nowhere else:

1. **Inputs are never written.** Every ``--out`` is compared with the command's inputs
   (:func:`check_outside_inputs`): the cohort spec, its participants table, its root folder and
   the folder holding its images, the pipeline file, a checkpoint or embeddings table read. An
   output that is an input, lies inside an input folder, or (for a folder output) would hold an
   input file is refused before anything is written.
2. **Ownership is recorded, never guessed from file names.** An output folder that neurocl
   writes into holds a hidden folder ``.neurocl/`` (:class:`OutputFolder`): ``run.json`` marks a
   run folder (everything in it is neurocl's), ``written.json`` lists the other files neurocl
   wrote there with their sha256. ``--overwrite`` replaces a file only when that record says
   neurocl wrote it and the file is unchanged since; a user's ``config.yaml`` or
   ``participants.tsv`` is never taken for neurocl's, whatever its name.
3. **One process per output folder.** :meth:`OutputFolder.hold` takes an OS file lock
   (``fcntl.flock``: the kernel releases it when the holder dies) on ``.neurocl/lock`` for a
   command's whole life, and records the holder in ``.neurocl/owner.json``. A second command on a
   held folder is refused, naming the holder's pid; a record left by a process that died (killed,
   out of memory) is taken over with a message.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterable, Iterator

from neurocl import __version__
from neurocl.errors import OutputError
from neurocl.io import write_json
from neurocl.logs import progress_console

__all__ = ["OutputFolder", "check_outside_inputs", "claim_files", "file_sha256", "record_files"]

console = progress_console()

# A folder path with fewer parts ('/', '/data') would protect half the filesystem: such a
# "common parent" of scattered inputs protects nothing.
_MIN_PROTECTED_PARTS = 3


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_outside_inputs(outputs: Iterable[str | os.PathLike], inputs: dict[str, str | os.PathLike | None],
                         option: str = "--out", folder: bool = False) -> None:
    """Refuse outputs that are, or lie inside, or (``folder`` outputs) contain one of ``inputs``.

    Parameters
    ----------
    outputs : paths
        What the command will write: a folder (``folder=True``) or files.
    inputs : dict
        Role -> path of what the command reads ("cohort root", "participants table", "pipeline",
        ...); folders protect everything inside them, files themselves. ``None`` entries are skipped.
    option : str
        The option named in the message.
    """
    resolved = {role: Path(path).resolve() for role, path in inputs.items() if path is not None}
    for output in outputs:
        output = Path(output).resolve()
        for role, path in resolved.items():
            if output == path:
                raise OutputError(f"{option} {output} is this command's {role}; neurocl never writes over its "
                                  f"inputs: choose another {option}")
            if path.is_dir() and len(path.parts) >= _MIN_PROTECTED_PARTS and path in output.parents:
                raise OutputError(f"{option} {output} lies inside the {role} {path}; neurocl never writes into "
                                  f"its inputs' folders: choose a folder outside it")
            if folder and output in path.parents:
                raise OutputError(f"{option} {output} holds the {role} {path}; an output folder is neurocl's "
                                  f"alone: choose a new folder outside the inputs")


def claim_files(paths: Iterable[str | os.PathLike], overwrite: bool, inputs: dict[str, str | os.PathLike | None],
                option: str = "--out") -> None:
    """The checks before a command writes ``paths`` (files): none is an input or inside an input
    folder, and none exists unless ``overwrite`` and neurocl wrote it (:meth:`OutputFolder.check_replace`)."""
    paths = [Path(path) for path in paths]
    check_outside_inputs(paths, inputs, option)
    for path in paths:
        if path.is_dir():
            raise OutputError(f"{option} {path} is a folder; give a file name")
        OutputFolder(path.parent).check_replace([path], overwrite)


def record_files(paths: Iterable[str | os.PathLike]) -> None:
    """Record files a command just wrote as neurocl's (so that ``--overwrite`` may replace them later)."""
    for path in paths:
        OutputFolder(Path(path).parent).record([path])


class OutputFolder:
    """``FOLDER/.neurocl/``: what neurocl wrote in an output folder, and who is writing there now.

    Parameters
    ----------
    path : path
        The output folder (a run folder, ``neurocl probe --out``, the folder of an ``--out`` file).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.own = self.path / ".neurocl"
        self.run_marker = self.own / "run.json"
        self.written = self.own / "written.json"
        self.lock_file = self.own / "lock"
        self.owner = self.own / "owner.json"

    def __repr__(self) -> str:
        return f"OutputFolder({str(self.path)!r})"

    # ------------------------------------------------------------ ownership

    def is_run(self) -> bool:
        """Whether neurocl made this folder as a run folder (its marker, not its file names, says so)."""
        return self.run_marker.is_file()

    def mark_run(self) -> None:
        """Mark the folder as a neurocl run folder (kept as it is when already marked)."""
        if not self.is_run():
            write_json(self.run_marker, {"neurocl": __version__, "created": _now()})

    def contents(self) -> list[Path]:
        """What the folder holds besides neurocl's own record (empty when the folder does not exist)."""
        if not self.path.is_dir():
            return []
        return [path for path in self.path.iterdir() if path != self.own]

    def _records(self) -> dict[str, str]:
        try:
            records = json.loads(self.written.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return records if isinstance(records, dict) else {}

    def owns(self, path: str | os.PathLike) -> bool:
        """Whether neurocl wrote ``path`` (inside this folder) and nobody changed it since: recorded
        with its current sha256, or inside a run folder (this one or one above it)."""
        path = Path(path)
        if any(OutputFolder(folder).is_run() for folder in (self.path, *self.path.absolute().parents)):
            return True
        recorded = self._records().get(path.name)
        return recorded is not None and path.is_file() and recorded == file_sha256(path)

    def check_replace(self, paths: Iterable[str | os.PathLike], overwrite: bool) -> None:
        """Refuse, before any work, to replace files that exist, unless ``overwrite`` and neurocl wrote them."""
        existing = [Path(path) for path in paths if Path(path).exists()]
        if not existing:
            return
        names = ", ".join(str(path) for path in existing)
        if not overwrite:
            raise OutputError(f"{names} already exist{'s' if len(existing) == 1 else ''}; pass --overwrite to "
                              "replace, or choose another --out")
        foreign = [str(path) for path in existing if not self.owns(path)]
        if foreign:
            raise OutputError(f"{', '.join(foreign)}: not written by neurocl (or changed since it was); --overwrite "
                              "replaces only neurocl's own outputs: choose another --out")

    def record(self, paths: Iterable[str | os.PathLike]) -> None:
        """Record ``paths`` (just written, inside this folder) as neurocl's, with their sha256."""
        if self.is_run():
            return  # everything in a run folder is neurocl's
        with self._ledger_lock():
            records = self._records()
            records.update({Path(path).name: file_sha256(path) for path in paths})
            write_json(self.written, records)

    @contextlib.contextmanager
    def _ledger_lock(self) -> Iterator[None]:
        self.own.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.own / "written.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------ the lock

    @contextlib.contextmanager
    def hold(self, option: str = "--out") -> Iterator[None]:
        """Hold this folder for the command's life; refuse when another live process holds it.

        The folder (and ``.neurocl/``) is created here, and removed again when the command wrote
        nothing else (a check that failed under the lock leaves ``--out`` as it was). A holder record
        left behind by a process that is gone is taken over, with a message naming it.
        """
        created = [folder for folder in (self.path, self.own) if not folder.exists()]
        try:
            self.own.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except FileExistsError:
            raise OutputError(f"{option} {self.path}: a file is in the way of the folder") from None
        except OSError as error:
            raise OutputError(f"{option} {self.path}: cannot write here ({error.strerror or error})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputError(f"{option} {self.path} is in use by {self._describe_holder()}; wait for it to "
                                  f"finish, or choose another {option}") from None
            previous = self._holder()
            if previous is not None:
                console.print(f"[yellow]note:[/] {self.path}: taking over from neurocl process {previous.get('pid')} "
                              f"({previous.get('command', '?')}), which stopped without finishing", highlight=False,
                              soft_wrap=True)
            write_json(self.owner, {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                                    "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])})
            try:
                yield
            finally:
                with contextlib.suppress(FileNotFoundError):
                    self.owner.unlink()
        finally:
            os.close(fd)  # releases the flock
            if created and not self.contents() and set(os.listdir(self.own)) <= {self.lock_file.name}:
                shutil.rmtree(self.own, ignore_errors=True)
                if self.path in created:
                    with contextlib.suppress(OSError):
                        self.path.rmdir()

    def _holder(self) -> dict | None:
        try:
            record = json.loads(self.owner.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def _describe_holder(self) -> str:
        holder = self._holder()
        if holder is None:
            return "another neurocl process"
        return (f"neurocl process {holder.get('pid')} on {holder.get('host', '?')} (started {holder.get('started', '?')}: "
                f"{holder.get('command', '?')})")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
