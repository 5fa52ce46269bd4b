"""How small is a pruned checkpoint really? Sparse format vs dense and vs the information bounds.

For one model (default `zoo:smollm2`, fp32) pruned per matrix by magnitude at several
unstructured sparsities and with a 2:4 pattern, this writes the sparse checkpoint
(`prunelab.storage.save(..., format="sparse")`), reads its size report, loads it back
(`prunelab.storage.load`) and checks the round trip: every state-dict tensor bit-identical and the
logits on a fixed 64-token input identical (`torch.equal`). It also writes the dense HF
checkpoint once (`save_pretrained`, safetensors) for the whole-checkpoint comparison.

Checks (the issue's must-show): stored bytes of the pruned matrices ≤ 1.02 × their bitmask
bound, Σ n·((1−s)·bits + 1) bits; round trip exact. Sizes are bytes (tensor data for
matrices; files on disk for checkpoints); times are single-run wall seconds: `save` =
save (encode + write), `decode` = read + checksum + decode every tensor (`iter_tensors`),
`load` = load (decode + build the HF model); in brackets the process CPU seconds,
which are the better guide on a shared machine.

    .venv/bin/python benchmarks/sparse_size.py [--model zoo:smollm2] [--out benchmarks/results/sparse_size.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MB = 1e6


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _prune(lm: Any, sparsity: float, pattern: str) -> str:
    """Prune in place with prunelab's magnitude-layer; fall back to per-matrix magnitude masking."""
    try:
        from prunelab.pruning import PruneConfig, prune
    except ImportError:
        prune = None
    if prune is not None:
        prune(lm, PruneConfig(method="magnitude-layer", sparsity=sparsity, pattern=pattern))
        return "prunelab.pruning magnitude-layer"
    with torch.no_grad():
        for m in lm.prunable:
            w = m.weight(lm.model)
            if pattern == "2:4":
                g = w.abs().reshape(w.shape[0], -1, 4)
                drop = g.argsort(-1)[..., :2]
                keep = torch.ones_like(g, dtype=torch.bool).scatter_(-1, drop, False).reshape(w.shape)
            else:
                k = round(sparsity * w.numel())
                order = w.abs().reshape(-1).argsort(stable=True)
                keep = torch.ones(w.numel(), dtype=torch.bool)
                keep[order[:k]] = False
                keep = keep.reshape(w.shape)
            w.masked_fill_(~keep, 0.0)
    return "per-matrix magnitude (benchmark fallback)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="zoo:smollm2")
    ap.add_argument("--sparsities", default="0.5,0.9,0.95,0.99")
    ap.add_argument("--nm", default="2:4", help="N:M pattern to add ('' for none)")
    ap.add_argument("--out", default="benchmarks/results/sparse_size.json")
    ap.add_argument("--workdir", default=None, help="Where checkpoints are written (default: a temp dir)")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from prunelab.io import write_json
    from prunelab.storage import iter_tensors, load, save, size_report

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    lm = load(args.model)
    original = {m.param_name: m.module(lm.model).weight.detach().clone() for m in lm.prunable}
    ids = torch.arange(64).unsqueeze(0) * 37 % min(lm.model.config.vocab_size, 30000) + 100
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparse_size-"))
    work.mkdir(parents=True, exist_ok=True)

    dense_dir = work / "dense"
    t = time.perf_counter()
    lm.model.save_pretrained(dense_dir, safe_serialization=True)
    dense_save_s = time.perf_counter() - t
    dense_weights = sum(p.stat().st_size for p in dense_dir.glob("*.safetensors"))
    dense_total = _dir_bytes(dense_dir)

    configs = [(f"{float(s):.0%}", float(s), "unstructured") for s in args.sparsities.split(",") if s]
    if args.nm:
        configs.append((args.nm, 0.5, args.nm))
    rows: list[dict[str, Any]] = []
    method = ""
    for label, sparsity, pattern in configs:
        with torch.no_grad():
            for m in lm.prunable:
                m.module(lm.model).weight.copy_(original[m.param_name])
        method = _prune(lm, sparsity, pattern)
        ck = work / f"sparse-{label.replace('%', 'pct').replace(':', 'of')}"
        t, c = time.perf_counter(), time.process_time()
        save(lm, ck, format="sparse")
        save_s, save_cpu = time.perf_counter() - t, time.process_time() - c
        rep = size_report(ck)
        t, c = time.perf_counter(), time.process_time()
        dict(iter_tensors(ck))
        decode_s, decode_cpu = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        loaded = load(ck).model
        load_s, load_cpu = time.perf_counter() - t, time.process_time() - c
        before, after = lm.model.state_dict(), loaded.state_dict()
        state_exact = before.keys() == after.keys() and all(
            before[k].dtype == after[k].dtype and before[k].shape == after[k].shape
            and torch.equal(_bits(before[k]), _bits(after[k])) for k in before
        )
        with torch.no_grad():
            logits_exact = torch.equal(lm.model(input_ids=ids).logits, loaded(input_ids=ids).logits)
        del loaded, after
        pr, ckr = rep["totals"]["pruned"], rep["checkpoint"]
        rows.append({
            "config": label,
            "pattern": pattern,
            "sparsity_pruned": pr["sparsity"],
            "pruned_dense_bytes": pr["dense_bytes"],
            "pruned_stored_bytes": pr["stored_bytes"],
            "pruned_bitmask_bound_bytes": pr["bitmask_bound_bytes"],
            "pruned_entropy_bound_bytes": pr["entropy_bound_bytes"],
            "stored_vs_bitmask_bound": pr["stored_vs_bitmask_bound"],
            "stored_vs_entropy_bound": pr["stored_vs_entropy_bound"],
            "within_1_02_bitmask_bound": pr["stored_vs_bitmask_bound"] <= 1.02,
            "pruned_encodings": pr["encodings"],
            "checkpoint_total_file_bytes": ckr["total_file_bytes"],
            "dense_checkpoint_file_bytes": dense_total,
            "checkpoint_vs_dense": ckr["total_file_bytes"] / dense_total,
            "weights_file_bytes": ckr["weights_file_bytes"],
            "dense_weights_file_bytes": dense_weights,
            "save_s": save_s,
            "decode_s": decode_s,
            "load_s": load_s,
            "save_cpu_s": save_cpu,
            "decode_cpu_s": decode_cpu,
            "load_cpu_s": load_cpu,
            "state_dict_bit_exact": state_exact,
            "logits_identical": logits_exact,
        })
        print(f"{label}: stored/bound {pr['stored_vs_bitmask_bound']:.4f}, exact={state_exact and logits_exact}, "
              f"save {save_s:.1f}s load {load_s:.1f}s", file=sys.stderr)

    table = Table(title=f"sparse checkpoint size, {args.model} ({lm.model.dtype}), pruned by {method}")
    for col in ("config", "sparsity", "pruned dense MB", "pruned stored MB", "bitmask bound MB", "entropy bound MB",
                "stored/bitmask bound", "encodings", "ckpt MB", "dense ckpt MB", "ckpt/dense", "save s (cpu)",
                "decode s (cpu)", "load s (cpu)", "bit-exact"):
        table.add_column(col)
    for r in rows:
        enc = ", ".join(f"{k}×{v}" for k, v in r["pruned_encodings"].items())
        table.add_row(
            r["config"], f"{r['sparsity_pruned']:.2%}", f"{r['pruned_dense_bytes'] / MB:.1f}",
            f"{r['pruned_stored_bytes'] / MB:.2f}", f"{r['pruned_bitmask_bound_bytes'] / MB:.2f}",
            f"{r['pruned_entropy_bound_bytes'] / MB:.2f}", f"{r['stored_vs_bitmask_bound']:.4f}"
            + ("" if r["within_1_02_bitmask_bound"] else " (> 1.02!)"), enc,
            f"{r['checkpoint_total_file_bytes'] / MB:.1f}", f"{r['dense_checkpoint_file_bytes'] / MB:.1f}",
            f"{r['checkpoint_vs_dense']:.3f}", f"{r['save_s']:.1f} ({r['save_cpu_s']:.1f})",
            f"{r['decode_s']:.1f} ({r['decode_cpu_s']:.1f})", f"{r['load_s']:.1f} ({r['load_cpu_s']:.1f})",
            "yes" if r["state_dict_bit_exact"] and r["logits_identical"] else "NO",
        )
    Console(width=220).print(table)
    ok = all(r["within_1_02_bitmask_bound"] and r["state_dict_bit_exact"] and r["logits_identical"] for r in rows)
    result = {
        "benchmark": "sparse_size",
        "model": args.model,
        "dtype": str(lm.model.dtype),
        "method": method,
        "units": "bytes (tensor data for pruned matrices, files on disk for checkpoints); seconds wall "
                 "(*_cpu_s: process CPU seconds), one run",
        "dense_save_s": dense_save_s,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "all_checks_pass": ok,
        "wall_s": time.perf_counter() - t0,
    }
    write_json(args.out, result)
    print(f"all checks pass: {ok}; JSON: {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
