"""Bounded memory-mapped reads of tensor chunks (headers: `prunelab.models.header`).

The default scan reads float32/bfloat16/float16 bytes itself (stats.summarize_file_range: `pread` from
compiled code); the windows here serve the other dtypes, in-Python consumers and comparisons.

`safe_open` maps a whole file for as long as it is open, so every page it touches stays in
the process's resident set until the file is closed: streaming a 4 GB shard through it
costs 4 GB of RSS. Here the (tiny, JSON) header is parsed and checked once, and each chunk
of a tensor is mapped on its own window (`mmap` with an offset) and unmapped as soon as it
has been scanned, so peak memory is one chunk regardless of model size. The raw window also
lets bfloat16 be read as uint16 bit patterns without torch. The header is parsed by the one
safetensors parser, `prunelab.models.header.read_header` (re-exported here for the scan).
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np

from prunelab.errors import CheckpointError
from prunelab.models.header import DTYPES, TensorInfo, read_header

__all__ = ["CHUNK_BYTES", "DTYPES", "IO_MODES", "TensorInfo", "chunk_ranges", "iter_read_chunks", "read_header",
           "scan_chunks", "with_chunk"]

CHUNK_BYTES = 2 * 1024 * 1024  # per mapped window: bounds peak memory (x threads), large enough to amortise
T = TypeVar("T")
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def chunk_ranges(info: TensorInfo, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """(absolute offset, length) of consecutive chunks of a tensor, whole elements each."""
    item = DTYPES[info.dtype][0].itemsize
    step = max(item, chunk_bytes - chunk_bytes % item)
    return [(off, min(step, info.end - off)) for off in range(info.start, info.end, step)]


IO_MODES = ("mmap", "read")
_LOCAL = threading.local()


def _buffer(nbytes: int) -> bytearray:
    """This thread's reusable read buffer (grown on demand): small enough to stay in L2/L3."""
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _LOCAL.buf = bytearray(max(nbytes, CHUNK_BYTES))
    return buf


def with_chunk(info: TensorInfo, off: int, length: int, consume: Callable[[np.ndarray], T], *,
               io: str = "mmap") -> T:
    """Call `consume(1-D array)` on bytes [off, off+length) of the tensor's file.

    `io="mmap"` (default) maps just this window (pre-faulted) and unmaps it afterwards;
    `io="read"` `preadv`s the bytes into a per-thread reusable buffer instead. Both keep peak
    memory at one chunk per thread and measured the same speed here (the scan kernel, not
    the I/O, is the bottleneck; see benchmarks/analyze_speed.py).
    The array is only valid during the call: `consume` must not keep it.
    """
    np_dtype = DTYPES[info.dtype][0]
    count = length // np_dtype.itemsize
    if io == "read":
        buf = _buffer(length)
        try:
            fd = os.open(info.file, os.O_RDONLY)
            try:
                got = os.preadv(fd, [memoryview(buf)[:length]], off)
            finally:
                os.close(fd)
        except OSError as exc:
            raise CheckpointError(f"cannot read '{info.name}' from {info.file}: {exc.strerror or exc}") from exc
        if got != length:
            raise CheckpointError(f"{info.file} ended early while reading '{info.name}' (truncated?)")
        return consume(np.frombuffer(buf, dtype=np_dtype, count=count))
    gran = mmap.ALLOCATIONGRANULARITY
    aligned = off - off % gran
    try:
        with open(info.file, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), off - aligned + length, flags=_MAP_FLAGS, prot=mmap.PROT_READ,
                           offset=aligned)
    except ValueError as exc:  # the window reaches past the end: the file shrank since its header was read
        raise CheckpointError(f"{info.file} ended early while reading '{info.name}' (truncated?)") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read '{info.name}' from {info.file}: {exc.strerror or exc}") from exc
    try:
        view = np.frombuffer(mm, dtype=np_dtype, count=count, offset=off - aligned)
        result = consume(view)
        del view
        return result
    finally:
        try:
            mm.close()
        except BufferError:  # something still holds a view (a compiler's argument cache): unmapped with it
            pass


def scan_chunks(info: TensorInfo, consume: Callable[[np.ndarray], object], *, chunk_bytes: int = CHUNK_BYTES,
                io: str = "mmap") -> None:
    """Call `consume(array)` on consecutive 1-D chunks of a tensor, one chunk in memory at a time."""
    for off, length in chunk_ranges(info, chunk_bytes):
        with_chunk(info, off, length, consume, io=io)


def iter_read_chunks(info: TensorInfo, buf: bytearray) -> Iterator[memoryview]:
    """Plain `readinto` of the same byte ranges: the baseline the benchmark compares against."""
    mv = memoryview(buf)
    with open(info.file, "rb", buffering=0) as fh:
        fh.seek(info.start)
        left = info.nbytes
        while left > 0:
            got = fh.readinto(mv[: min(len(buf), left)])
            if not got:
                raise CheckpointError(f"{info.file} ended early while reading '{info.name}'")
            left -= got
            yield mv[:got]
