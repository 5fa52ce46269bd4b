"""Safetensors headers, and bounded memory-mapped reads of tensor chunks.

The default scan reads float32/bfloat16/float16 bytes itself (stats.summarize_file_range: `pread` from
compiled code); the windows here serve the other dtypes, in-Python consumers and comparisons.

`safe_open` maps a whole file for as long as it is open, so every page it touches stays in
the process's resident set until the file is closed: streaming a 4 GB shard through it
costs 4 GB of RSS. Here the (tiny, JSON) header is parsed and checked once, and each chunk
of a tensor is mapped on its own window (`mmap` with an offset) and unmapped as soon as it
has been scanned, so peak memory is one chunk regardless of model size. The raw window also
lets bfloat16 be read as uint16 bit patterns without torch.

The header checks are strict — sizes, offsets, dtypes, overlap — because a corrupt file must
become a one-line `CheckpointError`, not a crash or silently wrong statistics.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from prunelab.errors import CheckpointError

#: safetensors dtype → (numpy dtype used to view the bytes, whether it is a float weight we scan).
DTYPES: dict[str, tuple[np.dtype, bool]] = {
    "F64": (np.dtype("<f8"), True),
    "F32": (np.dtype("<f4"), True),
    "F16": (np.dtype("<f2"), True),
    "BF16": (np.dtype("<u2"), True),  # viewed as raw bits; stats.py widens to float32 exactly
    "I64": (np.dtype("<i8"), False),
    "I32": (np.dtype("<i4"), False),
    "I16": (np.dtype("<i2"), False),
    "I8": (np.dtype("i1"), False),
    "U8": (np.dtype("u1"), False),
    "BOOL": (np.dtype("?"), False),
}
_ITEMSIZE_OTHER = {"F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 1024 * 1024
CHUNK_BYTES = 2 * 1024 * 1024  # per mapped window: bounds peak memory (x threads), large enough to amortise
T = TypeVar("T")
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, absolute byte range, dtype and shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in DTYPES and DTYPES[self.dtype][1]


def _bad(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid safetensors file ({reason}): re-download or re-save the checkpoint"
    )


def read_header(path: str | os.PathLike[str]) -> list[TensorInfo]:
    """Parse and validate a safetensors header; tensors in file order."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _bad(path, f"only {len(head)} bytes long")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER or 8 + n > size:
                raise _bad(path, f"header length {n} does not fit a {size}-byte file")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    base = 8 + n
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (TypeError, KeyError, ValueError) as exc:
            raise _bad(path, f"malformed entry for '{name}'") from exc
        itemsize = DTYPES[dtype][0].itemsize if dtype in DTYPES else _ITEMSIZE_OTHER.get(dtype)
        if itemsize is None:
            raise _bad(path, f"unknown dtype '{dtype}' for '{name}'")
        numel = 1
        for d in shape:
            if d < 0:
                raise _bad(path, f"negative dimension in '{name}'")
            numel *= d
        if not 0 <= begin <= end or end - begin != numel * itemsize:
            raise _bad(path, f"byte range of '{name}' does not match its shape and dtype")
        if base + end > size:
            raise _bad(path, f"'{name}' extends past the end of the file (truncated?)")
        tensors.append(TensorInfo(name, path, dtype, shape, base + begin, base + end))
    tensors.sort(key=lambda t: t.start)
    for prev, cur in zip(tensors, tensors[1:], strict=False):
        if cur.start < prev.end:
            raise _bad(path, f"'{prev.name}' and '{cur.name}' overlap")
    return tensors


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
