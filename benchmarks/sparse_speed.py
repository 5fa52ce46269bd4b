"""Does sparsity make CPU inference faster? Sparse runtime vs dense fp32, per sparsity, in one run.

For one model (default `zoo:smollm2`, fp32) pruned per matrix by magnitude
(`prunelab.pruning.prune`, method `magnitude-layer`) at 50/70/90/95/99 %, the pruned model is
swapped to the sparse runtime (`sparsify_for_inference`: per shape, sparsity bucket and
rows bucket the fastest measured backend -- dense MKL, our numba SELL-16 kernels, torch CSR,
scipy CSR) and compared with the dense model:

- **decode**: ms/token, batch 1, KV cache on, greedy, fixed `--decode-tokens` after a 16-token prompt;
- **prefill**: tokens/s of one forward over `--prefill-tokens` tokens (batch 1);
- **kernels only**: the same, calling each matrix's chosen kernel directly (no nn.Module and
  torch-tensor glue, ~10 us per call here), i.e. what the kernels achieve against the bound;
- **linears only**: one decode step's worth of the prunable matrices (every matrix once, in
  model order, with a 1-row input; 420 MB dense for SmolLM2, far beyond the last-level
  cache, so weights stream from DRAM as in real decode) -- the kernel-level number;
- **bound**: dense bytes / sparse bytes read per token, for the linears and for the whole
  model (the tied LM head, 113 MB, stays dense), and the achieved fraction
  `speedup / bound`.

Dense and sparse measurements are interleaved repeat by repeat (the machine is shared:
a noisy period hits both) and every ratio is a ratio of medians measured against the same
dense model in the same period. Units: ms/token, tokens/s, bytes; medians of `--repeats`.

    nice -n 0 .venv/bin/python benchmarks/sparse_speed.py [--model zoo:smollm2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def linears_pass(model: torch.nn.Module, names: list[str], xs: dict[int, torch.Tensor],
                 cpu: list[float] | None = None) -> float:
    """Wall seconds to apply every listed linear once to a 1-row input (a decode step's weight traffic)."""
    from prunelab.runtime import SparseLinear

    mods = [model.get_submodule(n) for n in names]
    with torch.no_grad():
        c0 = time.thread_time()
        t0 = time.perf_counter()
        for m in mods:
            if isinstance(m, SparseLinear):
                m(xs[m.in_features])
            elif isinstance(m, torch.nn.Linear):
                F.linear(xs[m.in_features], m.weight, m.bias)
            else:
                m(xs[m.weight.shape[0]])
        wall = time.perf_counter() - t0
        if cpu is not None:
            cpu.append(time.thread_time() - c0)
        return wall


def kernels_pass(model: torch.nn.Module, names: list[str], xs: dict[int, torch.Tensor],
                 cpu: list[float] | None = None) -> float:
    """Like `linears_pass` but calling each matrix's chosen kernel directly (no nn.Module / torch glue):
    what the kernels themselves achieve against the byte bound."""
    from prunelab.runtime import SparseLinear

    calls = []
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, SparseLinear):
            backend = m.plan[1]
            xn = xs[m.in_features].view(-1).numpy()
            if backend in ("sell", "sell_par"):
                calls.append(lambda m=m, xn=xn, p=backend == "sell_par": m.sell.gemv(xn, parallel=p, bias=m._bias_pad))
            elif backend == "scipy":
                calls.append(lambda m=m, xn=xn: m._get_scipy() @ xn)
            else:
                calls.append(lambda m=m, x=xs[m.in_features], b=backend: m._run(b, x))
        else:
            calls.append(lambda m=m, x=xs[m.in_features]: F.linear(x, m.weight, m.bias))
    with torch.no_grad():
        c0 = time.thread_time()
        t0 = time.perf_counter()
        for c in calls:
            c()
        wall = time.perf_counter() - t0
        if cpu is not None:
            cpu.append(time.thread_time() - c0)
        return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:smollm2")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9,0.95,0.99")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch/numba threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse_speed.json"))
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)

    from prunelab.io import write_json
    from prunelab.pruning import PruneConfig, prune
    from prunelab.runtime import sparsify_for_inference, warmup
    from prunelab.runtime.bench import _forward_kwargs, _ids, time_decode, time_prefill, weights_nbytes
    from prunelab.storage import load

    t_start = time.perf_counter()
    warmup()  # numba compile / cache load, never inside a timing
    lm = load(args.model)
    dense = lm.model
    names = [m.name for m in lm.prunable]
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(1, n, generator=g) for n in {m.in_features for m in lm.prunable}}
    vocab = int(lm.config.vocab_size)
    prefill_kw = _forward_kwargs(lm, _ids(args.prefill_tokens, vocab, 0))
    prompt_kw = _forward_kwargs(lm, _ids(16, vocab, 1))
    prunable_dense_bytes = sum(m.numel * 4 for m in lm.prunable)
    whole_dense_bytes = weights_nbytes(dense)
    # Bytes a decode step reads: every weight except the embedding table (one row); tied LM head once.
    emb = dense.get_input_embeddings().weight
    tied = dense.get_output_embeddings() is not None and dense.get_output_embeddings().weight is emb
    step_dense_bytes = whole_dense_bytes - (0 if tied else emb.numel() * 4)

    rows: list[dict[str, Any]] = []
    for s in [float(x) for x in args.sparsities.split(",")]:
        t0 = time.perf_counter()
        lm_s = copy.copy(lm)
        lm_s.model = copy.deepcopy(dense)
        lm_s.prunable = list(lm.prunable)
        prune(lm_s, PruneConfig(method="magnitude-layer", sparsity=s))
        pruned_model = lm_s.model
        # Reference tokens: the pruned model on the dense runtime (the sparse runtime must reproduce them).
        _, ref_tokens = time_decode(pruned_model, lm.family, prompt_kw, args.decode_tokens)
        summary = sparsify_for_inference(lm_s, min_sparsity=0.0)
        build_s = time.perf_counter() - t0
        sparse_read = summary.read_bytes_decode
        step_sparse_bytes = step_dense_bytes - prunable_dense_bytes + sparse_read
        variants = {"dense": dense, "sparse": pruned_model}
        meas: dict[str, dict[str, list[float]]] = {
            k: {"decode": [], "prefill": [], "linears": [], "decode_cpu": [], "prefill_cpu": [], "linears_cpu": [],
                "kernels": [], "kernels_cpu": []}
            for k in variants}
        toks: dict[str, list[int]] = {}
        for model in variants.values():  # warm-up (lazy decisions for the prompt's rows bucket, allocator)
            time_prefill(model, prefill_kw, True)
            time_decode(model, lm.family, prompt_kw, 2)
            linears_pass(model, names, xs)
        for _ in range(args.repeats):
            for name, model in variants.items():
                gc.collect()
                mm = meas[name]
                dt, toks[name] = time_decode(model, lm.family, prompt_kw, args.decode_tokens, cpu=mm["decode_cpu"])
                mm["decode"].append(dt * 1e3)
                mm["linears"].append(linears_pass(model, names, xs, cpu=mm["linears_cpu"]) * 1e3)
                mm["kernels"].append(kernels_pass(model, names, xs, cpu=mm["kernels_cpu"]) * 1e3)
                mm["prefill"].append(args.prefill_tokens / time_prefill(model, prefill_kw, True, cpu=mm["prefill_cpu"]))
            for mm in meas.values():  # seconds -> ms (decode per token, linears per pass); prefill -> tokens per CPU s
                mm["decode_cpu"][-1] *= 1e3
                mm["linears_cpu"][-1] *= 1e3
                mm["kernels_cpu"][-1] *= 1e3
                mm["prefill_cpu"][-1] = args.prefill_tokens / mm["prefill_cpu"][-1]
        med = {k: {q: _median(v) for q, v in d.items()} for k, d in meas.items()}
        bound_lin = prunable_dense_bytes / sparse_read
        bound_model = step_dense_bytes / step_sparse_bytes
        speed_dec = med["dense"]["decode"] / med["sparse"]["decode"]
        speed_lin = med["dense"]["linears"] / med["sparse"]["linears"]
        cpu_dec = med["dense"]["decode_cpu"] / med["sparse"]["decode_cpu"]
        cpu_lin = med["dense"]["linears_cpu"] / med["sparse"]["linears_cpu"]
        cpu_ker = med["dense"]["kernels_cpu"] / med["sparse"]["kernels_cpu"]
        plans: dict[str, int] = {}
        for m in summary.modules:
            for b, backend in sorted(m.plan.items()) if m.swapped else [("-", "dense (not swapped)")]:
                plans[f"rows<={b}:{backend}"] = plans.get(f"rows<={b}:{backend}", 0) + 1
        row = {
            "sparsity": s,
            "achieved_sparsity_prunable": 1 - sum((1 - m.sparsity) * m.dense_bytes for m in summary.modules)
            / prunable_dense_bytes,
            "swapped": summary.swapped, "of": len(summary.modules), "plans": plans,
            "dense_decode_ms_per_token": med["dense"]["decode"], "sparse_decode_ms_per_token": med["sparse"]["decode"],
            "decode_speedup": speed_dec,
            "dense_prefill_tokens_per_s": med["dense"]["prefill"],
            "sparse_prefill_tokens_per_s": med["sparse"]["prefill"],
            "prefill_speedup": med["sparse"]["prefill"] / med["dense"]["prefill"],
            "dense_linears_ms": med["dense"]["linears"], "sparse_linears_ms": med["sparse"]["linears"],
            "linears_speedup": speed_lin,
            "linears_dense_bytes": prunable_dense_bytes, "linears_sparse_bytes": sparse_read,
            "bound_linears": bound_lin, "achieved_of_bound_linears": speed_lin / bound_lin,
            "step_dense_bytes": step_dense_bytes, "step_sparse_bytes": step_sparse_bytes,
            "bound_model": bound_model, "achieved_of_bound_model": speed_dec / bound_model,
            "same_greedy_tokens_as_pruned_dense": toks["sparse"] == ref_tokens,
            "cpu_time": {
                "dense_decode_ms_per_token": med["dense"]["decode_cpu"],
                "sparse_decode_ms_per_token": med["sparse"]["decode_cpu"],
                "decode_speedup": cpu_dec, "achieved_of_bound_model": cpu_dec / bound_model,
                "dense_linears_ms": med["dense"]["linears_cpu"], "sparse_linears_ms": med["sparse"]["linears_cpu"],
                "linears_speedup": cpu_lin, "achieved_of_bound_linears": cpu_lin / bound_lin,
                "dense_kernels_ms": med["dense"]["kernels_cpu"], "sparse_kernels_ms": med["sparse"]["kernels_cpu"],
                "kernels_speedup": cpu_ker, "achieved_of_bound_kernels": cpu_ker / bound_lin,
                "prefill_speedup": med["sparse"]["prefill_cpu"] / med["dense"]["prefill_cpu"],
                "dense_prefill_tokens_per_cpu_s": med["dense"]["prefill_cpu"],
                "sparse_prefill_tokens_per_cpu_s": med["sparse"]["prefill_cpu"],
            },
            "runs": meas, "build_s": build_s,
        }
        rows.append(row)
        print(f"s={s:.2f}: decode {row['dense_decode_ms_per_token']:.1f} -> {row['sparse_decode_ms_per_token']:.1f} "
              f"ms/token ({speed_dec:.2f}x, bound {bound_model:.2f}x); linears {speed_lin:.2f}x of bound "
              f"{bound_lin:.2f}x; prefill {row['prefill_speedup']:.2f}x", file=sys.stderr, flush=True)
        del variants, pruned_model, lm_s
        gc.collect()

    hdr = (f"{'sparsity':>8} {'dense ms/tok':>12} {'sparse ms/tok':>13} {'decode x':>8} {'model bound':>11} "
           f"{'of bound':>8} | {'linears x':>9} {'lin bound':>9} {'of bound':>8} | {'prefill tok/s d/s':>19} "
           f"{'prefill x':>9} | same tokens as pruned dense")
    print(f"\n{args.model}, fp32, {torch.get_num_threads()} threads, medians of {args.repeats} interleaved runs")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['sparsity']:>8.2f} {r['dense_decode_ms_per_token']:>12.2f} {r['sparse_decode_ms_per_token']:>13.2f} "
              f"{r['decode_speedup']:>8.2f} {r['bound_model']:>11.2f} {r['achieved_of_bound_model']:>8.2f} | "
              f"{r['linears_speedup']:>9.2f} {r['bound_linears']:>9.2f} {r['achieved_of_bound_linears']:>8.2f} | "
              f"{r['dense_prefill_tokens_per_s']:>8.0f}/{r['sparse_prefill_tokens_per_s']:<10.0f} "
              f"{r['prefill_speedup']:>9.2f} | {r['same_greedy_tokens_as_pruned_dense']}")
    print("\nsame runs, CPU time of this thread (excludes time the OS gave to other processes; complete at 1 thread)")
    hdr2 = (f"{'sparsity':>8} {'dense ms/tok':>12} {'sparse ms/tok':>13} {'decode x':>8} {'of bound':>8} | "
            f"{'dense lin ms':>12} {'sparse lin ms':>13} {'linears x':>9} {'of bound':>8} | "
            f"{'kernels x':>9} {'of bound':>8} | {'prefill x':>9}")
    print(hdr2)
    print("-" * len(hdr2))
    for r in rows:
        c = r["cpu_time"]
        print(f"{r['sparsity']:>8.2f} {c['dense_decode_ms_per_token']:>12.2f} {c['sparse_decode_ms_per_token']:>13.2f} "
              f"{c['decode_speedup']:>8.2f} {c['achieved_of_bound_model']:>8.2f} | {c['dense_linears_ms']:>12.2f} "
              f"{c['sparse_linears_ms']:>13.2f} {c['linears_speedup']:>9.2f} {c['achieved_of_bound_linears']:>8.2f} | "
              f"{c['kernels_speedup']:>9.2f} {c['achieved_of_bound_kernels']:>8.2f} | {c['prefill_speedup']:>9.2f}")
    goals = {
        "decode_faster_from_70": all(r["decode_speedup"] > 1.0 for r in rows if r["sparsity"] >= 0.7),
        "linears_0.7_of_bound_at_90_95": all(r["achieved_of_bound_linears"] >= 0.7 for r in rows
                                             if 0.9 <= r["sparsity"] <= 0.95),
        "model_0.7_of_bound_at_90_95": all(r["achieved_of_bound_model"] >= 0.7 for r in rows
                                           if 0.9 <= r["sparsity"] <= 0.95),
        "cpu_time_decode_faster_from_70": all(r["cpu_time"]["decode_speedup"] > 1.0 for r in rows
                                              if r["sparsity"] >= 0.7),
        "cpu_time_linears_0.7_of_bound_at_90_95": all(r["cpu_time"]["achieved_of_bound_linears"] >= 0.7 for r in rows
                                                      if 0.9 <= r["sparsity"] <= 0.95),
        "cpu_time_kernels_0.7_of_bound_at_90_95": all(r["cpu_time"]["achieved_of_bound_kernels"] >= 0.7 for r in rows
                                                      if 0.9 <= r["sparsity"] <= 0.95),
        "cpu_time_model_0.7_of_bound_at_90_95": all(r["cpu_time"]["achieved_of_bound_model"] >= 0.7 for r in rows
                                                    if 0.9 <= r["sparsity"] <= 0.95),
    }
    print("goals:", ", ".join(f"{k}={'met' if v else 'NOT met'}" for k, v in goals.items()))
    result = {
        "model": args.model, "dtype": "float32", "threads": torch.get_num_threads(), "repeats": args.repeats,
        "decode_tokens": args.decode_tokens, "prefill_tokens": args.prefill_tokens, "cpu": _cpu(),
        "units": {"decode": "ms/token (median)", "prefill": "tokens/s (median)", "linears": "ms per pass (median)",
                  "bytes": "bytes read per decode step"},
        "rows": rows, "goals": goals, "wall_s": time.perf_counter() - t_start,
    }
    write_json(args.out, result)
    print(f"results: {args.out}")
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return f"{os.cpu_count()} cpus"


if __name__ == "__main__":
    sys.exit(main())
