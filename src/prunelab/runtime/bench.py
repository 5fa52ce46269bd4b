"""`bench_model`: what a (pruned) model costs to store, to hold in memory and to run, dense vs sparse runtime.

Measured, in one call:

- **size on disk**: the model as a dense safetensors checkpoint and as a sparse checkpoint
  (`prunelab.storage.save`, formats hf and sparse), in bytes;
- **resident memory after load**: RSS growth of a fresh subprocess that loads the dense
  checkpoint and runs one short forward (so lazily mapped weights count), then swaps in the
  sparse runtime (RSS again after `malloc_trim`), so that nothing this process already holds
  pollutes the number; plus the exact bytes of parameters / sparse formats held (the
  reliable figure: RSS also keeps whatever the allocator does not give back);
- **prefill throughput**: tokens/s of one forward pass over `prefill_tokens` tokens (batch 1,
  KV cache built), clamped to the model's position limit;
- **decode latency**: ms/token of `decode_tokens` greedy steps (batch 1, KV cache on, fixed
  count, no early stop) after a short prompt.

Speech models (Whisper) are measured the same way on real input: the encoder over one spoken
sentence in the 30 s log-mel window is the prefill (frames/s), and decode times the greedy
transcript tokens against the cached encoder output.

Dense and sparse runs are interleaved repeat by repeat (the machine is shared and noisy; a
slow period hits both) and summarised by medians; every repetition is kept in the output.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunelab import storage
from prunelab.errors import ConfigError
from prunelab.models.types import LoadedModel
from prunelab.runtime.sparsify import sparsify_for_inference

ProgressFn = Callable[[str, int, int], None]


def _dir_bytes(d: Path, suffix: str | None = None) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and (suffix is None or p.name.endswith(suffix)))


def _vocab(config: Any) -> int:
    return int(getattr(config, "vocab_size", 0) or 0) or 256


def weights_nbytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (tied tensors once) plus the sparse formats of `SparseLinear`s."""
    from prunelab.runtime.sparse_linear import SparseLinear

    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, SparseLinear):
            total += m.resident_nbytes() - (0 if m.bias is None else m.bias.numel() * 4)
    return total


# ----------------------------------------------------------------------------------------------
# Timed runs
# ----------------------------------------------------------------------------------------------


def _ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(5, vocab - 1), vocab, (1, n), generator=g)


def _speech_kwargs(lm: LoadedModel) -> dict[str, Any]:
    """Whisper's input: one spoken benchmark sentence in the 30 s log-mel window, and the transcription
    prefix as decoder prompt, so the greedy tokens are a real transcript (dense and sparse can be compared)."""
    from prunelab.data.speech import eval_clips, input_features, prefix_ids

    feats = input_features(lm.processor, eval_clips(1))
    return {"input_features": feats, "decoder_input_ids": torch.tensor([prefix_ids(lm.tokenizer)])}


def _forward_kwargs(lm: LoadedModel, ids: torch.Tensor) -> dict[str, Any]:
    if lm.is_speech:
        return _speech_kwargs(lm)
    if lm.family == "encoder-decoder":
        start = getattr(lm.config, "decoder_start_token_id", None) or 0
        return {"input_ids": ids, "decoder_input_ids": torch.full((1, 1), start, dtype=torch.long)}
    return {"input_ids": ids}


def time_prefill(model: torch.nn.Module, kwargs: dict[str, Any], use_cache: bool,
                 cpu: list[float] | None = None) -> float:
    """Wall seconds for one forward pass; with `cpu`, also appends this thread's CPU seconds.

    CPU time of the calling thread is the cost without the time the OS gave to other
    processes -- the better number on a shared machine, and complete when torch and numba
    run single-threaded (all work then happens in this thread).
    """
    with torch.no_grad():
        c0 = time.thread_time()
        t0 = time.perf_counter()
        model(**kwargs, use_cache=use_cache) if use_cache else model(**kwargs)
        wall = time.perf_counter() - t0
        if cpu is not None:
            cpu.append(time.thread_time() - c0)
        return wall


def _cache_kw(model: torch.nn.Module) -> str:
    """transformers >= 5.2x names the KV cache argument `cache` (older: `past_key_values`)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def time_decode(model: torch.nn.Module, family: str, prompt: dict[str, Any], steps: int,
                cpu: list[float] | None = None) -> tuple[float, list[int]]:
    """Wall seconds per generated token for `steps` greedy steps with the KV cache, and the tokens.

    With `cpu`, also appends this thread's CPU seconds per token (see `time_prefill`).
    """
    tokens: list[int] = []
    kw = _cache_kw(model)
    with torch.no_grad():
        if family == "encoder-decoder":
            enc = model.get_encoder()(**{k: v for k, v in prompt.items() if k != "decoder_input_ids"})
            out = model(encoder_outputs=enc, decoder_input_ids=prompt["decoder_input_ids"], use_cache=True)
        else:
            enc = None
            out = model(input_ids=prompt["input_ids"], use_cache=True)
        past = getattr(out, "cache", None) or out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        c0 = time.thread_time()
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens.append(int(nxt))
            if enc is not None:
                out = model(encoder_outputs=enc, decoder_input_ids=nxt, use_cache=True, **{kw: past})
            else:
                out = model(input_ids=nxt, use_cache=True, **{kw: past})
            past = getattr(out, "cache", None) or out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        wall = (time.perf_counter() - t0) / steps
        if cpu is not None:
            cpu.append((time.thread_time() - c0) / steps)
        return wall, tokens


# ----------------------------------------------------------------------------------------------
# Memory in a fresh process
# ----------------------------------------------------------------------------------------------

_RSS_SCRIPT = r"""
import ctypes, gc, json, sys, psutil, torch
torch.set_num_threads(int(sys.argv[3]))
proc = psutil.Process()
import transformers, prunelab.runtime, prunelab.storage  # imports are not the model's memory
prunelab.runtime.warmup()  # nor is numba's compiled code
try:
    _trim = ctypes.CDLL("libc.so.6").malloc_trim
except OSError:
    _trim = lambda _n: None
def rss():
    gc.collect(); _trim(0)  # hand freed heap back to the OS so RSS shows what is still held
    return proc.memory_info().rss
def touch(model):  # one short forward: every weight page is read (safetensors may be mapped lazily)
    ids = torch.tensor([[5, 6, 7, 8]])
    kw = {"input_ids": ids}
    if hasattr(model.config, "num_mel_bins"):  # speech: one (silent) 30 s window of log-mel features
        kw = {"input_features": torch.zeros(1, model.config.num_mel_bins, 2 * model.config.max_source_positions)}
    if getattr(model.config, "is_encoder_decoder", False):
        kw["decoder_input_ids"] = ids[:, :1]
    with torch.no_grad():
        model(**kw)
r0 = rss()
from prunelab.storage import load
lm = load(sys.argv[1]); touch(lm.model); r1 = rss()
out = {"dense_rss_delta_bytes": r1 - r0}
if sys.argv[2] == "1":
    from prunelab.runtime import sparsify_for_inference
    s = sparsify_for_inference(lm, **json.loads(sys.argv[4]))
    touch(lm.model); r2 = rss()
    out["sparse_rss_delta_bytes"] = r2 - r0
    out["swapped"] = s.swapped
print("RSS_JSON" + json.dumps(out))
"""


def rss_after_load(checkpoint: Path, *, sparse: bool, sparsify_kwargs: dict[str, Any]) -> dict[str, Any]:
    """RSS growth of a fresh Python process loading `checkpoint` (then sparsifying it)."""
    env = dict(os.environ)
    cmd = [sys.executable, "-c", _RSS_SCRIPT, str(checkpoint), "1" if sparse else "0",
           str(torch.get_num_threads()), json.dumps(sparsify_kwargs)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    for line in res.stdout.splitlines():
        if line.startswith("RSS_JSON"):
            return json.loads(line[len("RSS_JSON"):])
    tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"memory subprocess failed: {tail[0]}"}


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------


def _median(xs: list[float]) -> float | None:
    return float(np.median(xs)) if xs else None


def _token_counts(lm: LoadedModel, prefill_tokens: int, decode_tokens: int, prompt_tokens: int,
                  notes: list[str]) -> tuple[int, int]:
    """(prefill, prompt) token counts that fit the model's positions; a clamp is noted."""
    limit = lm.context_length
    if lm.is_speech:  # prefill is the encoder over one 30 s window, counted in mel frames
        notes.append("speech model: prefill = the encoder over one 30 s log-mel window (3000 frames, "
                     "reported as frames/s) plus the decoder prompt; decode = greedy transcript tokens")
        return 2 * lm.config.max_source_positions, prompt_tokens  # the padded window, whatever the clip
    n_prefill = prefill_tokens
    if limit is not None and lm.family != "encoder-decoder" and prefill_tokens > limit:
        n_prefill = limit
        notes.append(f"prefill clamped to the model's {limit} positions")
    n_prompt = min(prompt_tokens, (limit or prompt_tokens + decode_tokens) - decode_tokens)
    if n_prompt < 1:
        raise ConfigError(f"--decode-tokens {decode_tokens} exceeds the model's {limit} positions")
    return n_prefill, n_prompt


def _measure_on_disk(lm: LoadedModel, result: dict[str, Any], *, measure_size: bool, measure_rss: bool,
                     sparse: bool, sparsify_kwargs: dict[str, Any], tick: Callable[[str], None]) -> None:
    """Size of the dense and sparse checkpoints, and RSS of a fresh process loading the dense one."""
    with tempfile.TemporaryDirectory(prefix="prunelab-bench-") as tmpd:
        tmp = Path(tmpd)
        dense_dir = storage.save(lm.model, tmp / "dense", format="hf", tokenizer=lm.tokenizer)
        size: dict[str, Any] = {"dense_safetensors_bytes": _dir_bytes(dense_dir, ".safetensors")}
        if measure_size:
            sparse_dir = storage.save(lm, tmp / "sparse", format="sparse")
            size["sparse_format_bytes"] = _dir_bytes(sparse_dir, ".safetensors")
            size["ratio_dense_over_sparse"] = size["dense_safetensors_bytes"] / max(1, size["sparse_format_bytes"])
        result["size_on_disk"] = size
        tick("size on disk")
        result["memory"] = (rss_after_load(dense_dir, sparse=sparse, sparsify_kwargs=sparsify_kwargs)
                            if measure_rss else {})
        tick("resident memory")


def _variants(lm: LoadedModel, result: dict[str, Any], *, sparse: bool,
              sparsify_kwargs: dict[str, Any]) -> dict[str, torch.nn.Module]:
    """The dense model and, with `sparse`, a sparsified copy (its runtime summary goes into `result`)."""
    variants: dict[str, torch.nn.Module] = {"dense": lm.model}
    if sparse:
        model_s = copy.deepcopy(lm.model)
        summary = sparsify_for_inference(model_s, list(lm.prunable), **sparsify_kwargs)
        variants["sparse"] = model_s
        result["runtime"] = {k: v for k, v in summary.to_dict().items() if k != "modules"}
        result["runtime"]["plans"] = _plan_counts(summary)
    result["memory"]["weights_bytes"] = {k: weights_nbytes(m) for k, m in variants.items()}
    return variants


def _time_variants(lm: LoadedModel, variants: dict[str, torch.nn.Module], prefill_kw: dict[str, Any],
                   prompt_kw: dict[str, Any], *, decode_tokens: int, repeats: int,
                   tick: Callable[[str], None]) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[int]]]:
    """Prefill and decode times per variant, interleaved repeat by repeat after one untimed warm-up each."""
    decodes = lm.family != "encoder"
    use_cache = lm.family != "encoder"
    times: dict[str, dict[str, list[float]]] = {
        k: {"prefill_s": [], "decode_s_per_token": [], "prefill_cpu_s": [], "decode_cpu_s_per_token": []}
        for k in variants}
    tokens: dict[str, list[int]] = {}
    for name, model in variants.items():  # warm-up: kernels, lazy decisions, allocator
        time_prefill(model, prefill_kw, use_cache)
        if decodes:
            _, tokens[name] = time_decode(model, lm.family, prompt_kw, min(decode_tokens, 4))
    for _r in range(repeats):
        for name, model in variants.items():
            gc.collect()
            times[name]["prefill_s"].append(time_prefill(model, prefill_kw, use_cache,
                                                         cpu=times[name]["prefill_cpu_s"]))
            if decodes:
                dt, tokens[name] = time_decode(model, lm.family, prompt_kw, decode_tokens,
                                               cpu=times[name]["decode_cpu_s_per_token"])
                times[name]["decode_s_per_token"].append(dt)
        tick("speed")
    return times, tokens


def _speed(times: dict[str, dict[str, list[float]]], tokens: dict[str, list[int]], n_prefill: int,
           decodes: bool) -> dict[str, Any]:
    """Medians per variant, and the sparse/dense speedups when both ran."""
    speed: dict[str, Any] = {}
    for name, t in times.items():
        pre = _median(t["prefill_s"])
        dec = _median(t["decode_s_per_token"])
        pre_cpu = _median(t["prefill_cpu_s"])
        dec_cpu = _median(t["decode_cpu_s_per_token"])
        speed[name] = {
            "prefill_tokens_per_s": n_prefill / pre if pre else None,
            "decode_ms_per_token": dec * 1e3 if dec is not None else None,
            "prefill_tokens_per_cpu_s": n_prefill / pre_cpu if pre_cpu else None,
            "decode_cpu_ms_per_token": dec_cpu * 1e3 if dec_cpu is not None else None,
            "prefill_s_runs": t["prefill_s"],
            "decode_s_per_token_runs": t["decode_s_per_token"],
        }
    if "sparse" in times:
        d, s = speed["dense"], speed["sparse"]
        speed["sparse_vs_dense"] = {
            "prefill_speedup": (s["prefill_tokens_per_s"] / d["prefill_tokens_per_s"])
            if d["prefill_tokens_per_s"] else None,
            "decode_speedup": (d["decode_ms_per_token"] / s["decode_ms_per_token"])
            if decodes and s["decode_ms_per_token"] else None,
            "same_greedy_tokens": tokens.get("dense") == tokens.get("sparse") if decodes else None,
        }
    return speed


def bench_model(
    lm: LoadedModel,
    *,
    sparse: bool = True,
    prefill_tokens: int = 512,
    decode_tokens: int = 32,
    prompt_tokens: int = 16,
    repeats: int = 5,
    measure_size: bool = True,
    measure_rss: bool = True,
    sparsify_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Benchmark `lm` (left unchanged) dense and, with `sparse`, with the sparse runtime; JSON-ready dict.

    Speed numbers are medians over `repeats` interleaved repetitions (after one untimed warm-up
    of each variant, which also compiles kernels and makes the runtime's per-shape decisions).
    """
    if repeats < 1 or decode_tokens < 1 or prefill_tokens < 1:
        raise ConfigError("bench needs --repeats, --decode-tokens and --prefill-tokens >= 1")
    sparsify_kwargs = dict(sparsify_kwargs or {})
    notes: list[str] = []
    n_prefill, n_prompt = _token_counts(lm, prefill_tokens, decode_tokens, prompt_tokens, notes)
    result: dict[str, Any] = {
        "model": lm.name, "family": lm.family, "threads": torch.get_num_threads(),
        "units": {"size": "bytes", "rss": "bytes", "prefill": "tokens/s", "decode": "ms/token"},
        "settings": {"prefill_tokens": n_prefill, "decode_tokens": decode_tokens, "prompt_tokens": n_prompt,
                     "repeats": repeats, "seed": seed, "sparse": sparse},
        "notes": notes,
    }
    steps = iter(range(1, 3 + repeats))

    def tick(msg: str) -> None:
        step = next(steps)
        if progress:
            progress(msg, step, 2 + repeats)

    _measure_on_disk(lm, result, measure_size=measure_size, measure_rss=measure_rss, sparse=sparse,
                     sparsify_kwargs=sparsify_kwargs, tick=tick)
    variants = _variants(lm, result, sparse=sparse, sparsify_kwargs=sparsify_kwargs)
    vocab = _vocab(lm.config)
    prefill_kw = _forward_kwargs(lm, _ids(n_prefill, vocab, seed))
    # speech: the same clip and transcription prefix serve both (synthesized once)
    prompt_kw = prefill_kw if lm.is_speech else _forward_kwargs(lm, _ids(n_prompt, vocab, seed + 1))
    times, tokens = _time_variants(lm, variants, prefill_kw, prompt_kw, decode_tokens=decode_tokens,
                                   repeats=repeats, tick=tick)
    result["speed"] = _speed(times, tokens, n_prefill, lm.family != "encoder")
    return result


def _plan_counts(summary: Any) -> dict[str, int]:
    """How many matrices use which backend per rows bucket (e.g. {"rows<=1:sell": 180})."""
    counts: dict[str, int] = {}
    for m in summary.modules:
        if not m.swapped:
            counts["not swapped"] = counts.get("not swapped", 0) + 1
            continue
        for b, backend in sorted(m.plan.items()):
            key = f"rows<={b}:{backend}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def run_bench(spec: str, out_file: str | os.PathLike[str], **kwargs: Any) -> dict[str, Any]:
    """Load `spec`, `bench_model` it, write the JSON atomically to `out_file`; return the result."""
    from prunelab.io import write_json

    t0 = time.perf_counter()
    lm = storage.load(spec)
    result = bench_model(lm, **kwargs)
    result["wall_time_s"] = time.perf_counter() - t0
    write_json(out_file, result)
    return result
