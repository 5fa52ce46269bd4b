"""The one safetensors header parser: where every tensor of a file lives, checked strictly.

Every reader of raw safetensors uses it: the sparse checkpoint (`storage.checkpoint`, whose
shards hold encoded components), the streaming statistics of `analysis` (which map byte
ranges of dense weights itself) and the out-of-core model (`models.offload`, which reads one
block's tensors at a time). It sits in `models` so that all three can import it. The checks
are strict — sizes, offsets, dtypes, overlap — because a corrupt or truncated file must become
a one-line `CheckpointError` naming what is damaged, not a crash or silently wrong numbers.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prunelab.errors import CheckpointError

#: safetensors dtype → (numpy dtype used to view the bytes, whether it is a float weight we scan).
DTYPES: dict[str, tuple[np.dtype, bool]] = {
    "F64": (np.dtype("<f8"), True),
    "F32": (np.dtype("<f4"), True),
    "F16": (np.dtype("<f2"), True),
    "BF16": (np.dtype("<u2"), True),  # viewed as raw bits; analysis widens to float32 exactly
    "I64": (np.dtype("<i8"), False),
    "I32": (np.dtype("<i4"), False),
    "I16": (np.dtype("<i2"), False),
    "I8": (np.dtype("i1"), False),
    "U8": (np.dtype("u1"), False),
    "BOOL": (np.dtype("?"), False),
}
_ITEMSIZE_OTHER = {"F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
#: safetensors dtype ↔ torch dtype, for readers and writers that build tensors from the bytes.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 1024 * 1024


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


def _bad(path: Path, reason: str, tensor: str | None = None) -> CheckpointError:
    prefix = f"tensor {tensor}: " if tensor is not None else ""
    return CheckpointError(
        f"{prefix}{path} is not a valid safetensors file ({reason}): re-download or re-save the checkpoint"
    )


def _raw_header(path: Path) -> tuple[bytes, int, int]:
    """(header JSON bytes, header length, file size); a file too short for its header is truncated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _bad(path, f"only {len(head)} bytes long: truncated")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER or 8 + n > size:
                raise _bad(path, f"header length {n} does not fit a {size}-byte file: truncated?")
            return fh.read(n), n, size
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _entry(path: Path, name: str, entry: object, base: int, size: int, tensor: str | None) -> TensorInfo:
    try:
        dtype = entry["dtype"]  # type: ignore[index]
        shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
        begin, end = (int(o) for o in entry["data_offsets"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError) as exc:
        raise _bad(path, f"malformed entry for '{name}'", tensor) from exc
    itemsize = DTYPES[dtype][0].itemsize if dtype in DTYPES else _ITEMSIZE_OTHER.get(dtype)
    if itemsize is None:
        raise _bad(path, f"unknown dtype '{dtype}' for '{name}'", tensor)
    numel = 1
    for d in shape:
        if d < 0:
            raise _bad(path, f"negative dimension in '{name}'", tensor)
        numel *= d
    if not 0 <= begin <= end or end - begin != numel * itemsize:
        raise _bad(path, f"byte range of '{name}' does not match its shape and dtype", tensor)
    if base + end > size:
        raise _bad(path, f"'{name}' extends past the end of the file (truncated?)", tensor)
    return TensorInfo(name, path, dtype, shape, base + begin, base + end)


def read_header(path: str | os.PathLike[str], *, tensor_of: Callable[[str], str] | None = None) -> list[TensorInfo]:
    """Parse and validate a safetensors header; tensors in file order.

    `tensor_of(key)` names the logical tensor a stored key belongs to (a sparse checkpoint
    stores `<tensor>::<component>` keys), so that a damaged entry's message names the tensor.
    """
    path = Path(path)
    raw, n, size = _raw_header(path)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    tensors = [
        _entry(path, name, entry, 8 + n, size, tensor_of(name) if tensor_of else None)
        for name, entry in header.items() if name != "__metadata__"
    ]
    tensors.sort(key=lambda t: t.start)
    for prev, cur in zip(tensors, tensors[1:], strict=False):
        if cur.start < prev.end:
            raise _bad(path, f"'{prev.name}' and '{cur.name}' overlap", tensor_of(cur.name) if tensor_of else None)
    return tensors
