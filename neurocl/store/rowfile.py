"""An ``.npy`` file written and read one row at a time (:class:`RowFile`), and a preallocated memory map."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from neurocl.errors import StoreError
from neurocl.io import preallocate


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a C-ordered ``.npy`` file."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = reader(handle)
        if fortran_order:
            raise ValueError(f"{path}: Fortran-ordered array")
        return tuple(shape), np.dtype(dtype), handle.tell()


class RowFile:
    """An ``.npy`` file of ``(N, *row_shape)`` rows written and read one row at a time with plain file I/O.

    No memory map: a build's resident memory stays about one row per worker whatever N is
    (a mapped file's pages count as the process's memory until the kernel writes them back),
    and the file is preallocated after a free-space check, so a full disk is a clear error
    naming the folder before any work instead of a SIGBUS at a later page fault.

    With ``scales`` (an ``(N,)`` float64 array the caller keeps) each row is stored divided by its
    largest absolute value, so that a float16 file holds raw scanner intensities (which may exceed
    float16's 65504) with float16's relative precision; :meth:`read` multiplies it back.
    """

    def __init__(self, path: Path, dtype, n_rows: int, row_shape: Sequence[int], create: bool = False,
                 scales: np.ndarray | None = None):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(int(n) for n in row_shape)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.n_rows = int(n_rows)
        self.scales = scales
        if create:
            self._create()
        else:
            shape, dtype, self.offset = _npy_header(self.path)
            if tuple(shape) != (self.n_rows, *self.row_shape) or np.dtype(dtype) != self.dtype:
                raise ValueError(f"{self.path}: holds {shape} {dtype}, expected {(self.n_rows, *self.row_shape)} {self.dtype}")
        self._handle = open(self.path, "r+b" if create else "rb")

    @classmethod
    def open(cls, path: Path, scales: np.ndarray | None = None) -> "RowFile":
        """An existing ``.npy`` file (e.g. a previous build's stage 1) for reading rows."""
        shape, dtype, _ = _npy_header(path)
        return cls(path, dtype, shape[0], shape[1:], scales=scales)

    def _create(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.n_rows, *self.row_shape)}
        total = self.row_bytes * self.n_rows
        free = shutil.disk_usage(self.path.parent).free
        if total > free:
            raise StoreError(f"{self.path.parent}: not enough free disk space for the store: "
                             f"{total / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free")
        with open(self.path, "wb") as handle:
            np.lib.format.write_array_header_2_0(handle, header)
            self.offset = handle.tell()
            try:
                os.posix_fallocate(handle.fileno(), 0, self.offset + total)
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise StoreError(f"{self.path.parent}: disk full while reserving {total / 1e9:.2f} GB "
                                     "for the store") from None
                handle.truncate(self.offset + total)  # a file system without fallocate: sparse file

    def write(self, index: int, row: np.ndarray) -> None:
        if self.scales is not None:
            row = np.asarray(row, dtype=np.float32)
            peak = float(np.abs(row).max()) if row.size else 0.0
            self.scales[index] = peak if np.isfinite(peak) and peak > 0 else 1.0
            row = row / np.float32(self.scales[index])
        data = np.ascontiguousarray(row, dtype=self.dtype)
        assert data.shape == self.row_shape, (data.shape, self.row_shape)
        try:
            os.pwrite(self._handle.fileno(), data.tobytes(), self.offset + index * self.row_bytes)
        except OSError as error:
            raise StoreError(f"{self.path}: cannot write ({error.strerror})") from None

    def read(self, index: int) -> np.ndarray:
        raw = os.pread(self._handle.fileno(), self.row_bytes, self.offset + index * self.row_bytes)
        row = np.frombuffer(raw, dtype=self.dtype).reshape(self.row_shape).astype(np.float32)
        if self.scales is not None:
            row *= np.float32(self.scales[index])
        return row

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()


def _new_memmap(path: Path, dtype, shape: Sequence[int]) -> np.memmap:
    """A ``.npy`` memory map whose disk blocks are reserved before any write (see :func:`preallocate`)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    try:
        preallocate(path, os.path.getsize(path))
    except BaseException:
        del array
        raise
    return array
