"""Sparse checkpoints that are really smaller: per-tensor lossless encodings, save/load, size accounting.

`save_sparse(model_or_lm, dir)` writes the smallest lossless encoding of every tensor (dense,
bitmask, CSR with narrow indices, or N:M packed) into safetensors plus a JSON index;
`load_sparse(dir)` rebuilds the Hugging Face model exactly; `size_report(dir)` compares each
tensor with its dense size and its information-theoretic bounds. The format is specified in
`prunelab.storage.encodings` (per-tensor encodings) and `prunelab.storage.checkpoint`
(directory layout and index).
"""

from prunelab.storage.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    is_sparse_checkpoint,
    load_sparse,
    load_state_dict_sparse,
    read_sparse_tensors,
    save_sparse,
)
from prunelab.storage.encodings import ENCODINGS, EncodedTensor, encode_tensor, plan_encoding
from prunelab.storage.size import bounds_bytes, size_report, size_tables

__all__ = [
    "ENCODINGS", "FORMAT_NAME", "FORMAT_VERSION", "INDEX_NAME", "EncodedTensor", "bounds_bytes",
    "encode_tensor", "is_sparse_checkpoint", "load_sparse", "load_state_dict_sparse", "plan_encoding",
    "read_sparse_tensors", "save_sparse", "size_report", "size_tables",
]
