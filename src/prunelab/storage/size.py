"""Size accounting for a sparse checkpoint: what each tensor costs, and what it could cost.

Two information-theoretic references per tensor of `n` elements, `nnz` nonzeros, sparsity
`s = 1 − nnz/n` and `bits` bits per value:

* bitmask bound  = n · ((1 − s)·bits + 1) bits — the values plus one presence bit each; the
  yardstick the issue sets (stored ≤ 1.02 × this for pruned matrices);
* entropy bound  = n · (H(s) + (1 − s)·bits) bits, H the binary entropy — the least any
  lossless code can spend on the positions of an i.i.d. random mask of that sparsity.
  Structured (N:M) masks can go below it; their own bound is log2 C(M, K) bits per group,
  reported as `pattern_bound_bytes` for `nm` tensors.

All sizes are bytes of raw tensor data (safetensors headers and the JSON index are counted
separately under `checkpoint`). The numbers come from the index and file sizes, but a report
must not vouch for a damaged checkpoint: every tensor is first read back, checksummed and
structurally validated (streamed one tensor at a time, never decoded), so a truncated or
bit-flipped file is a `CheckpointError` naming the tensor instead of a table.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunelab.models import module_type_of, weight_files
from prunelab.storage.api import iter_tensors
from prunelab.storage.checkpoint import (
    INDEX_NAME,
    checkpoint_file_bytes,
    is_sparse_checkpoint,
    iter_encoded,
    read_index,
)
from prunelab.storage.encodings import DTYPES, dtype_name, nonzero_mask, plan_encoding


def binary_entropy(p: float) -> float:
    """H(p) in bits."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def bounds_bytes(numel: int, nnz: int, bits: int) -> tuple[float, float]:
    """(bitmask bound, entropy bound) in bytes for `nnz` of `numel` values of `bits` bits."""
    s = 1.0 - nnz / numel if numel else 0.0
    bitmask = (nnz * bits + numel) / 8
    entropy = (numel * binary_entropy(s) + nnz * bits) / 8
    return bitmask, entropy


def _bits(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size() * 8


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    dense = sum(r["dense_bytes"] for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    bm = sum(r["bitmask_bound_bytes"] for r in rows)
    ent = sum(r["entropy_bound_bytes"] for r in rows)
    numel = sum(r["numel"] for r in rows)
    nnz = sum(r["nnz"] for r in rows)
    return {
        "count": len(rows),
        "numel": numel,
        "nnz": nnz,
        "sparsity": 1 - nnz / numel if numel else 0.0,
        "dense_bytes": dense,
        "stored_bytes": stored,
        "ratio": stored / dense if dense else 1.0,
        "bitmask_bound_bytes": bm,
        "entropy_bound_bytes": ent,
        "stored_vs_bitmask_bound": stored / bm if bm else 1.0,
        "stored_vs_entropy_bound": stored / ent if ent else 1.0,
        "encodings": dict(Counter(r["encoding"] for r in rows)),
        "bytes_per_kept_weight": stored / nnz if nnz else None,
    }


def _quant_label(params: dict[str, Any]) -> str | None:
    """`int4/g128`, `int8/row` for a quantized tensor (integers + scales), None otherwise."""
    if "quant" not in params:
        return None
    return f"{params['quant']}/" + (f"g{params['group_size']}" if params.get("group_size") else "row")


def _scale_bytes(entry: dict[str, Any]) -> int:
    comps = entry.get("components", {})
    scales, zeros = comps.get("scales"), comps.get("zeros")  # float32 scales, uint8 int4 zero points
    return (math.prod(scales["shape"]) * 4 if scales else 0) + (math.prod(zeros["shape"]) if zeros else 0)


def _row(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """One report row from an index entry (encoding, params, shape, dtype, nnz, byte counts, flags).

    A quantized tensor's bounds use its integer width (`bits`) plus the bytes of its scales, and
    `bytes_per_kept_weight` (stored bytes / nonzeros) says what one surviving weight costs.
    """
    enc, params = entry["encoding"], entry.get("params", {})
    numel = math.prod(entry["shape"])
    quant = _quant_label(params)
    bits = int(params["bits"]) if quant else _bits(entry["dtype"])
    nnz = entry["nnz"]
    scale_bytes = _scale_bytes(entry)
    bm, ent = (b + scale_bytes for b in bounds_bytes(numel, nnz, bits))
    label = enc + (f"({params.get('index')})" if enc == "csr" else
                   f"({params['n']}:{params['m']})" if enc == "nm" else "") + (f" {quant}" if quant else "")
    row: dict[str, Any] = {
        "name": name,
        "encoding": label,
        "shape": entry["shape"],
        "dtype": entry["dtype"],
        "numel": numel,
        "nnz": nnz,
        "sparsity": 1 - nnz / numel if numel else 0.0,
        "prunable": bool(entry.get("prunable")),
        "module_type": entry.get("module_type"),
        "dense_bytes": entry["dense_bytes"],
        "stored_bytes": entry["stored_bytes"],
        "ratio": entry["stored_bytes"] / entry["dense_bytes"] if entry["dense_bytes"] else 1.0,
        "bitmask_bound_bytes": bm,
        "entropy_bound_bytes": ent,
        "stored_vs_bitmask_bound": entry["stored_bytes"] / bm if bm else 1.0,
        "bits": bits,
        "quant": quant,
        "bytes_per_kept_weight": entry["stored_bytes"] / nnz if nnz else None,
    }
    if enc == "nm":
        m, k = params["m"], params["m"] - params["n"]
        row["pattern_bound_bytes"] = ((numel // m) * math.log2(math.comb(m, k)) + nnz * bits) / 8 + scale_bytes
    return row


_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")


def _planned_entry(name: str, t: torch.Tensor) -> dict[str, Any]:
    """The index entry `save` would write for one tensor (encoding planned, nothing stored)."""
    eligible = t.numel() > 0 and t.dtype != torch.bool and not t.is_complex()
    mask = nonzero_mask(t) if eligible else None
    enc, params, cost = plan_encoding(t, mask)
    nnz = int(np.count_nonzero(mask.numpy())) if mask is not None else t.numel()
    module = name.removesuffix(".weight")
    mtype = module_type_of(module) if name.endswith(".weight") and t.dim() == 2 else "other"
    prunable = bool(_BLOCK.search(name)) and mtype != "other"
    return {
        "encoding": enc, "params": params, "shape": list(t.shape), "dtype": dtype_name(t.dtype),
        "nnz": nnz, "dense_bytes": t.numel() * t.element_size(), "stored_bytes": cost,
        "prunable": prunable, **({"module_type": mtype} if prunable else {}),
    }


def _estimated_index(directory: Path) -> dict[str, Any]:
    """An index-like dict for a plain HF safetensors checkpoint: the encodings `save(format="sparse")` would pick.

    Tensors are streamed one at a time; "prunable" is guessed from names (a 2-D `.weight` inside
    a numbered block whose leaf name is a known linear role), since no model is instantiated.
    """
    entries = {name: _planned_entry(name, t) for name, t in iter_tensors(directory)}
    index: dict[str, Any] = {"format": "hf-safetensors", "version": None,
                             "files": [f.name for f in weight_files(directory)], "tensors": entries}
    try:
        index["model_class"] = (json.loads((directory / "config.json").read_text()).get("architectures")
                                or [None])[0]
    except (json.JSONDecodeError, OSError):
        index["model_class"] = None
    dtypes = [e["dtype"] for e in entries.values() if e["dtype"].startswith(("float", "bfloat"))]
    index["dtype"] = dtypes[0] if dtypes else None
    return index


def verified_index(directory: Path) -> dict[str, Any]:
    """The index of a sparse checkpoint whose every tensor was read back and checked against it.

    Streams tensor by tensor (checksums + structural validation, no decoding), so the check
    costs the memory of one tensor and the report never describes bytes that are not there.
    """
    index = read_index(directory)
    for _name, _enc in iter_encoded(directory, index):
        pass
    return index


def _checkpoint_bytes(directory: Path, index: dict[str, Any], rows: list[dict[str, Any]],
                      estimated: bool) -> dict[str, Any]:
    """File sizes on disk against the dense equivalent (and, for an HF checkpoint, the estimated sparse size)."""
    files = checkpoint_file_bytes(directory)
    dense_tensors = sum(r["dense_bytes"] for r in rows)
    others = sum(v for k, v in files.items() if k not in index["files"] and k != INDEX_NAME
                 and not k.endswith(".safetensors.index.json"))
    total = sum(files.values())
    checkpoint: dict[str, Any] = {
        "weights_file_bytes": sum(files.get(f, 0) for f in index["files"]),
        "index_file_bytes": files.get(INDEX_NAME, 0),
        "other_file_bytes": others,
        "total_file_bytes": total,
        "dense_tensor_bytes": dense_tensors,
        "dense_equivalent_bytes": dense_tensors + others,
        "ratio": total / (dense_tensors + others) if dense_tensors + others else 1.0,
    }
    if estimated:  # what --format sparse would write: tensor data + others (+ small headers/index)
        stored_tensors = sum(r["stored_bytes"] for r in rows)
        checkpoint["estimated_sparse_bytes"] = stored_tensors + others
        checkpoint["ratio"] = (stored_tensors + others) / total if total else 1.0
    return checkpoint


def size_report(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Per-tensor and total sizes of a checkpoint against dense and the two bounds.

    For a sparse checkpoint the numbers are read from its index, after every tensor has been
    read back and checked (a damaged checkpoint is a `CheckpointError` naming the tensor). For a
    plain HF safetensors checkpoint (e.g. `prune --format hf`) every tensor is planned as
    `save(format="sparse")` would encode it, so the report says what the sparse format *would* store
    (`"estimated": true`). Returns {"dir", "format", "estimated", "tensors": [...],
    "totals": {"pruned": ..., "all": ...}, "checkpoint": {...}}. "pruned" covers the
    matrices prunelab prunes; when none is flagged, every 2-D tensor with zeros. Ratios are
    stored / dense; `stored_vs_*_bound` are stored / bound.
    """
    directory = Path(directory)
    estimated = not is_sparse_checkpoint(directory) and (directory / "config.json").is_file()
    index = _estimated_index(directory) if estimated else verified_index(directory)
    rows = [_row(name, e) for name, e in index["tensors"].items() if "alias_of" not in e]
    pruned = [r for r in rows if r["prunable"]]
    if not pruned:
        pruned = [r for r in rows if len(r["shape"]) == 2 and r["nnz"] < r["numel"]]
    return {
        "dir": str(directory),
        "format": index["format"],
        "version": index["version"],
        "estimated": estimated,
        "model_class": index.get("model_class"),
        "dtype": index.get("dtype"),
        "units": "bytes of raw tensor data unless named *_file_bytes; bounds may be fractional",
        "tensors": rows,
        "totals": {"pruned": _totals(pruned), "all": _totals(rows)},
        "checkpoint": _checkpoint_bytes(directory, index, rows, estimated),
    }


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def size_tables(report: dict[str, Any], *, by_type: bool = False) -> list[Any]:
    """rich Tables for `prunelab size`: per tensor (or per module type), then totals."""
    from rich.table import Table

    cols = ("dense", "stored", "ratio", "bitmask bound", "entropy bound", "stored/bitmask bound")

    def cells(r: dict[str, Any]) -> list[str]:
        return [human_bytes(r["dense_bytes"]), human_bytes(r["stored_bytes"]), f"{r['ratio']:.3f}",
                human_bytes(r["bitmask_bound_bytes"]), human_bytes(r["entropy_bound_bytes"]),
                f"{r['stored_vs_bitmask_bound']:.3f}"]

    what = ("dense HF checkpoint, sizes as --format sparse would store them (estimated):"
            if report.get("estimated") else "sparse checkpoint")
    if by_type:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in report["tensors"]:
            key = r["module_type"] or ("other (pruned)" if r["prunable"] else "not pruned")
            groups.setdefault(key, []).append(r)
        main = Table("module type", "tensors", "sparsity", "encodings", *cols,
                     title=f"{what} {report['dir']} by module type")
        for key, rs in groups.items():
            t = _totals(rs)
            enc = ", ".join(f"{k}×{v}" for k, v in t["encodings"].items())
            main.add_row(key, str(t["count"]), f"{t['sparsity']:.1%}", enc, *cells(t))
    else:
        main = Table("tensor", "encoding", "shape", "sparsity", "bits", *cols, "bytes/kept",
                     title=f"{what} {report['dir']}")
        for r in report["tensors"]:
            per_kept = r.get("bytes_per_kept_weight")
            main.add_row(r["name"], r["encoding"], "×".join(map(str, r["shape"])), f"{r['sparsity']:.1%}",
                         str(r.get("bits", "")), *cells(r), f"{per_kept:.3f}" if per_kept is not None else "-")
    totals = Table("totals", "tensors", "sparsity", *cols, title="totals (bytes of tensor data)")
    for label, key in (("pruned matrices", "pruned"), ("all tensors", "all")):
        t = report["totals"][key]
        totals.add_row(label, str(t["count"]), f"{t['sparsity']:.1%}", *cells(t))
    ck = report["checkpoint"]
    files = Table("checkpoint on disk", "bytes", title="files")
    files.add_row("weights files", human_bytes(ck["weights_file_bytes"]))
    if report.get("estimated"):
        files.add_row("config, tokenizer, other", human_bytes(ck["other_file_bytes"]))
        files.add_row("total (dense HF checkpoint)", human_bytes(ck["total_file_bytes"]))
        files.add_row("with --format sparse (estimated)", human_bytes(ck["estimated_sparse_bytes"]))
        files.add_row("sparse / dense", f"{ck['ratio']:.3f}")
        return [main, totals, files]
    files.add_row("index", human_bytes(ck["index_file_bytes"]))
    files.add_row("config, tokenizer, other", human_bytes(ck["other_file_bytes"]))
    files.add_row("total", human_bytes(ck["total_file_bytes"]))
    files.add_row("dense equivalent (tensors + other files)", human_bytes(ck["dense_equivalent_bytes"]))
    files.add_row("total / dense", f"{ck['ratio']:.3f}")
    return [main, totals, files]
