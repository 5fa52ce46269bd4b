"""Checkpoints: the one way to save and load a model, and sparse checkpoints that are really smaller.

`save(lm, dir, format="hf"|"sparse")` writes a model; `load(spec)` reads any model spec —
zoo alias, HF directory, .gguf, hub id or a prunelab sparse checkpoint — as a `LoadedModel`;
`iter_tensors(dir)` streams the dense tensors of a checkpoint whatever its encoding.
The sparse format stores every tensor in its smallest lossless encoding (dense, bitmask, CSR
with narrow indices, or N:M packed) in safetensors plus a JSON index; `size_report(dir)`
compares each tensor with its dense size and its information-theoretic bounds. The format is
specified in `prunelab.storage.encodings` (per-tensor encodings) and
`prunelab.storage.checkpoint` (directory layout and index).
"""

from prunelab.storage.api import FORMATS, iter_tensors, load, save
from prunelab.storage.checkpoint import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, is_sparse_checkpoint
from prunelab.storage.encodings import ENCODINGS, EncodedTensor, encode_quantized, encode_tensor, plan_encoding
from prunelab.storage.size import bounds_bytes, size_report, size_tables

__all__ = [
    "ENCODINGS", "FORMATS", "FORMAT_NAME", "FORMAT_VERSION", "INDEX_NAME", "EncodedTensor", "bounds_bytes",
    "encode_quantized", "encode_tensor", "is_sparse_checkpoint", "iter_tensors", "load", "plan_encoding", "save",
    "size_report", "size_tables",
]
