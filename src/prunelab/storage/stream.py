"""Write a Hugging Face checkpoint one shard at a time, for models that never sit in memory whole.

An out-of-core prune finishes one block at a time; each finished block becomes one safetensors
shard, and `model.safetensors.index.json` (the standard sharded-checkpoint index) is written last,
so the folder loads with any `from_pretrained`. The tensor bytes go straight from the tensor's
memory to the file: `safetensors.torch.save_file` first builds a bytes copy of every tensor,
which would double the peak for the largest one (an embedding matrix).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from prunelab.io import write_json
from prunelab.models.header import TORCH_DTYPES

_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """One safetensors file from CPU tensors without copying their bytes; returns the data bytes written."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for t in tensors.values():
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                fh.write(memoryview(flat.view(torch.uint8).numpy()))
    return offset


class ShardStream:
    """Shards written as they come (`write`), then the index (`finish`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.bytes_written = 0
        self._count = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> Path | None:
        """One shard holding `tensors` (a block, or one large tensor); returns its path."""
        if not tensors:
            return None
        self._count += 1
        name = f"model-{self._count:05d}.safetensors"
        self.total_size += write_safetensors(self.directory / name, tensors)
        self.bytes_written += (self.directory / name).stat().st_size
        self.weight_map.update(dict.fromkeys(tensors, name))
        return self.directory / name

    def finish(self) -> None:
        """The index that makes the shards one checkpoint."""
        write_json(self.directory / INDEX_NAME, {"metadata": {"total_size": self.total_size},
                                                 "weight_map": dict(sorted(self.weight_map.items()))})
