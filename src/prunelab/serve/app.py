"""`prunelab serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batching scheduler.

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (`stream: true` as server-sent events),
/health (200 once the model is loaded and its kernels compiled), /metrics (Prometheus text).

Why errors are built here and not left to the framework: OpenAI clients read `{"error": {...}}` bodies,
and a malformed request must cost one log line, never a traceback or the server. Every request is logged
as one line (method, path, status, time, and the reason for an error); uvicorn's access log is off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from prunelab.errors import ConfigError, PrunelabError
from prunelab.serve.model import PromptTooLong, Sampler, SamplingParams, ServedModel
from prunelab.serve.scheduler import Job, QueueFull, Scheduler

log = logging.getLogger("prunelab.serve")
DEFAULT_MAX_TOKENS = 256


class HTTPError(PrunelabError):
    """An error answered to the client as an OpenAI error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


@dataclass
class ServeConfig:
    """Server settings; `step_delay_s` only slows the scheduler down (tests of a full queue)."""

    model_name: str
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    timeout_s: float = 600.0
    token_budget: int = 64
    step_delay_s: float = 0.0
    threads: int | None = None  # numba threads of the batching thread (None: numba's default)


class Metrics:
    """Request counters and latency sums for /metrics."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.latency_sum: dict[str, float] = {}
        self.latency_count: dict[str, int] = {}
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.started = time.time()

    def record(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
        self.latency_sum[path] = self.latency_sum.get(path, 0.0) + seconds
        self.latency_count[path] = self.latency_count.get(path, 0) + 1


def _error_body(status: int, message: str, kind: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _text_of(content: Any) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") not in ("text", None) for p in content):
            raise HTTPError(400, "only text content parts are supported", param="messages")
        return "".join(str(p.get("text", "")) for p in content)
    if content is None:
        return ""
    raise HTTPError(400, "message content must be a string or a list of text parts", param="messages")


def _int(body: dict, key: str, default: int | None) -> int | None:
    v = body.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise HTTPError(400, f"'{key}' must be an integer (got {v!r})", param=key)
    return v


def _float(body: dict, key: str, default: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise HTTPError(400, f"'{key}' must be a number (got {v!r})", param=key)
    return float(v)


def create_app(served: ServedModel, cfg: ServeConfig) -> Any:
    """The FastAPI application; the scheduler thread starts with it and stops at shutdown."""
    scheduler = Scheduler(served, max_batch=cfg.max_batch, max_queue=cfg.max_queue, token_budget=cfg.token_budget,
                          step_delay_s=cfg.step_delay_s, threads=cfg.threads)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="prunelab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> Response:
        return JSONResponse(_error_body(status, message, kind, param), status_code=status)

    @app.middleware("http")
    async def one_line_log(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        request.state.reason = ""
        path = request.url.path
        protected = path.startswith("/v1") or path == "/metrics"
        given = request.headers.get("authorization", "")
        if cfg.api_key and protected and not secrets.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
            request.state.reason = "missing or wrong API key"
            response = error(401, "invalid API key: send 'Authorization: Bearer <key>'", "authentication_error")
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # noqa: BLE001 - one line in the log, an error object to the client
                first = str(exc).splitlines()[0] if str(exc) else ""
                request.state.reason = f"internal error: {type(exc).__name__}: {first}"
                response = error(500, "internal server error", "server_error")
        dt = time.perf_counter() - t0
        metrics.record(path, response.status_code, dt)
        reason = getattr(request.state, "reason", "")
        line = f"{request.method} {path} {response.status_code} {dt * 1e3:.0f} ms" + (f": {reason}" if reason else "")
        (log.warning if response.status_code >= 400 else log.info)(line)
        return response

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, exc: HTTPError) -> Response:
        request.state.reason = str(exc)
        return error(exc.status, str(exc), exc.kind, exc.param)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": cfg.model_name, "engine": served.engine}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        if name != cfg.model_name:
            raise HTTPError(404, f"model '{name}' not found: this server serves '{cfg.model_name}'", param="model")
        return _model_card()

    def _model_card() -> dict[str, Any]:
        return {"id": cfg.model_name, "object": "model", "created": int(metrics.started), "owned_by": "prunelab",
                "engine": served.engine, "context_length": served.context}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(_metrics_text(scheduler, metrics), media_type="text/plain; version=0.0.4")

    async def _body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"malformed JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != cfg.model_name:
            raise HTTPError(404, f"model '{model}' not found: this server serves '{cfg.model_name}'", param="model")
        if body.get("n", 1) != 1:
            raise HTTPError(400, "only n=1 is supported", param="n")
        return body

    def _job(body: dict[str, Any], prompt: list[int], default_max: int | None) -> Job:
        max_tokens = _int(body, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", default_max)
        if max_tokens is None:
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, served.context - len(prompt)))
        if max_tokens <= 0:
            raise HTTPError(400, f"'max_tokens' must be at least 1 (got {max_tokens})", param="max_tokens")
        params = SamplingParams(_float(body, "temperature", 1.0), _int(body, "top_k", 0) or 0,
                                _float(body, "top_p", 1.0), _int(body, "seed", None))
        try:
            sampler = Sampler(params)
            served.check_length(len(prompt), max_tokens)
        except PromptTooLong as exc:
            raise HTTPError(413, str(exc), param="messages" if "messages" in body else "prompt") from None
        except ConfigError as exc:
            raise HTTPError(400, str(exc)) from None
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise HTTPError(400, "'ignore_eos' must be true or false", param="ignore_eos")
        loop = asyncio.get_running_loop()
        return Job(prompt, max_tokens, sampler, time.monotonic() + cfg.timeout_s, loop, asyncio.Queue(),
                   ignore_eos=ignore_eos)

    def _stops(body: dict[str, Any]) -> list[str]:
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise HTTPError(400, "'stop' must be a string or a list of strings", param="stop")
        return [s for s in stops if s]

    def _submit(job: Job) -> Job:
        try:
            return scheduler.submit(job)
        except QueueFull as exc:
            raise HTTPError(429, str(exc), "rate_limit_error") from None

    async def _events(request: Request, job: Job, stops: list[str]) -> AsyncIterator[tuple[str, Any]]:
        """("text", piece) ... then ("done", finish_reason); cancels the job if the consumer stops early."""
        from prunelab.serve.model import Detokenizer

        detok, held = Detokenizer(served.tokenizer), ""
        finished = False
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.queue.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                kind, value = event
                if kind == "token":
                    held += detok.add(value)
                elif kind == "done":
                    held += detok.flush()
                if stops:
                    cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        yield "text", held[:cut]
                        finished = True
                        yield "done", "stop"
                        return
                    keep = max(len(s) for s in stops) - 1  # a stop string may still be forming
                    if kind == "token" and keep > 0:
                        out, held = held[:-keep] if len(held) > keep else "", held[-keep:] if len(held) > keep else held
                    else:
                        out, held = held, ""
                else:
                    out, held = held, ""
                if out:
                    yield "text", out
                if kind == "done":
                    finished = True
                    yield "done", value
                    return
                if kind == "error":
                    finished = True
                    yield "error", value
                    return
        finally:
            if not finished:
                scheduler.cancel(job)

    def _usage(job: Job) -> dict[str, int]:
        n = len(job.generated)
        return {"prompt_tokens": len(job.prompt), "completion_tokens": n, "total_tokens": len(job.prompt) + n}

    async def _collect(request: Request, job: Job, stops: list[str]) -> tuple[str, str]:
        text, reason = [], "length"
        try:
            async for kind, value in _events(request, job, stops):
                if kind == "text":
                    text.append(value)
                elif kind == "done":
                    reason = value
                else:
                    status = 504 if value == "timeout" else 500
                    raise HTTPError(status, f"request failed: {value}", "server_error")
        finally:
            scheduler.cancel(job)  # a no-op once finished; frees the slot if the client went away
        return "".join(text), reason

    def _sse(request: Request, job: Job, stops: list[str], chunk: Any, final: Any) -> Response:
        async def stream() -> AsyncIterator[str]:
            try:
                async for kind, value in _events(request, job, stops):
                    if kind == "text":
                        yield f"data: {json.dumps(chunk(value))}\n\n"
                    elif kind == "done":
                        yield f"data: {json.dumps(final(value))}\n\n"
                    else:
                        body = _error_body(500, f"request failed: {value}", "server_error", None)
                        yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                scheduler.cancel(job)  # a no-op once finished; frees the slot when the client went away

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPError(400, "'messages' is required: a non-empty list of {role, content}", param="messages")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise HTTPError(400, "every message needs a 'role' and a 'content'", param="messages")
        msgs = [{"role": m["role"], "content": _text_of(m.get("content"))} for m in messages]
        try:
            prompt = served.encode_chat(msgs)
        except PrunelabError as exc:
            raise HTTPError(400, str(exc), param="messages") from None
        except Exception as exc:  # noqa: BLE001 - a template that rejects these messages (e.g. roles)
            raise HTTPError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        job = _job(body, prompt, None)
        stops = _stops(body)
        _submit(job)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": cid, "created": created, "model": cfg.model_name}
        if body.get("stream"):
            first = True

            def chunk(text: str) -> dict[str, Any]:
                nonlocal first
                delta = {"role": "assistant", "content": text} if first else {"content": text}
                first = False
                return {**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

            def final(reason: str) -> dict[str, Any]:
                out = {**base, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}
                if (body.get("stream_options") or {}).get("include_usage"):
                    out["usage"] = _usage(job)
                return out

            return _sse(request, job, stops, chunk, final)
        text, reason = await _collect(request, job, stops)
        return {**base, "object": "chat.completion", "usage": _usage(job),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": reason, "logprobs": None}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = served.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            if not all(0 <= t < served.vocab for t in prompt):
                raise HTTPError(400, f"token ids must lie in [0, {served.vocab})", param="prompt")
            ids = list(prompt)
        else:
            raise HTTPError(400, "'prompt' is required: a string, or a list of token ids", param="prompt")
        job = _job(body, ids, 16)
        stops = _stops(body)
        _submit(job)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": cid, "object": "text_completion", "created": created, "model": cfg.model_name}
        if body.get("stream"):
            def chunk(text: str) -> dict[str, Any]:
                return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}

            def final(reason: str) -> dict[str, Any]:
                out = {**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}]}
                if (body.get("stream_options") or {}).get("include_usage"):
                    out["usage"] = _usage(job)
                return out

            return _sse(request, job, stops, chunk, final)
        text, reason = await _collect(request, job, stops)
        return {**base, "usage": _usage(job),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

    return app


def _metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> list[str]:
    """One Prometheus metric: HELP, TYPE and its samples (label text, value)."""
    return [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"] + [f"{name}{lab} {v:g}" for lab, v in samples]


def _metrics_text(scheduler: Scheduler, metrics: Metrics) -> str:
    """Prometheus exposition text (0.0.4): requests, latency, tokens, steps, queue depth, batch occupancy."""
    s = scheduler.stats
    lines = _metric("prunelab_requests_total", "counter", "HTTP requests by path and status.",
                    [(f'{{path="{p}",status="{c}"}}', n) for (p, c), n in sorted(metrics.requests.items())])
    lat = [(f'_sum{{path="{p}"}}', metrics.latency_sum[p]) for p in sorted(metrics.latency_sum)]
    lat += [(f'_count{{path="{p}"}}', metrics.latency_count[p]) for p in sorted(metrics.latency_count)]
    lines += _metric("prunelab_request_latency_seconds", "summary", "Time to the end of the HTTP response.", lat)
    lines += _metric("prunelab_generated_tokens_total", "counter", "Tokens generated.", [("", s.generated_tokens)])
    lines += _metric("prunelab_prompt_tokens_total", "counter", "Prompt tokens fed.", [("", s.prompt_tokens)])
    lines += _metric("prunelab_steps_total", "counter", "Batched model steps.", [("", s.steps)])
    lines += _metric("prunelab_step_entries_total", "counter", "Tokens fed over all steps.", [("", s.step_entries)])
    lines += _metric("prunelab_finished_total", "counter", "Finished sequences by reason.",
                     [(f'{{reason="{r}"}}', n) for r, n in sorted(s.finished.items())])
    lines += _metric("prunelab_queue_depth", "gauge", "Requests waiting for a slot.", [("", scheduler.queue_depth)])
    lines += _metric("prunelab_active_sequences", "gauge", "Requests in the running batch.", [("", scheduler.active)])
    lines += _metric("prunelab_batch_slots", "gauge", "Slots of the running batch (--max-batch).",
                     [("", scheduler.max_batch)])
    return "\n".join(lines) + "\n"


def warm_up(served: ServedModel) -> None:
    """Compile (or load from numba's cache) the batched step before the port opens, so /health means ready."""
    b = served.batcher(1, 4)
    b.step([0, 0], [0, 0], [0, 1], [False, True])
    if served.fused is not None:
        from prunelab.runtime.fused_decode import BatchDecoder

        BatchDecoder(served.fused, 4, max_entries=4).step([0] * 4, [0, 1, 2, 3], [0] * 4, [True] * 4)


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 16,
          max_queue: int = 64, timeout_s: float = 600.0, model_name: str | None = None, threads: int | None = None,
          log_level: str = "info") -> None:
    """`prunelab serve`: load `model`, compile, then answer HTTP on `host:port` until interrupted."""
    import uvicorn

    from prunelab.serve.model import load_model

    if max_batch < 1 or max_queue < 0 or timeout_s <= 0 or (threads is not None and threads < 1):
        raise ConfigError("--max-batch and --threads must be >= 1, --max-queue >= 0 and --timeout > 0")
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535 (got {port})")
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    served = load_model(model)
    for note in served.notes:
        log.warning(note)
    if threads:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    warm_up(served)
    name = model_name or model
    cfg = ServeConfig(name, api_key, max_batch, max_queue, timeout_s, threads=threads)
    app = create_app(served, cfg)
    log.info("serving %s as '%s' on http://%s:%d (%s, batch %d, queue %d)", model, name, host, port, served.engine,
             max_batch, max_queue)
    try:
        uvicorn.run(app, host=host, port=port, access_log=False, log_level=log_level, timeout_graceful_shutdown=5)
    except SystemExit as exc:  # uvicorn exits when the port is taken
        raise ConfigError(f"could not listen on {host}:{port} (in use, or not an address of this machine)") from exc
