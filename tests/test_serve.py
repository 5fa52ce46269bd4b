"""prunelab serve: the OpenAI client against a live localhost server on a tiny pruned + int8 Llama.

The independent reference is transformers' `generate` on the same (dequantized) checkpoint: greedy text
from /v1/chat/completions (plain and streamed) and /v1/completions must equal it and `prunelab generate`.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from prunelab.pruning import PruneConfig, prune
from prunelab.serve import SamplingParams, ServeConfig, complete, create_app, load_model
from prunelab.storage import load, save

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")
KEY = "sk-test"


@pytest.fixture(scope="module")
def checkpoint(tiny_dirs, tmp_path_factory) -> Path:
    """The tiny Llama, 70 % sparse + int8, saved in prunelab's sparse format, with a chat template."""
    lm = load(str(tiny_dirs["llama"]))
    prune(lm, PruneConfig(method="magnitude", sparsity=0.7, quant="int8"))
    lm.tokenizer.chat_template = CHAT_TEMPLATE
    return Path(save(lm, tmp_path_factory.mktemp("serve") / "q", format="sparse"))


@pytest.fixture(scope="module")
def served(checkpoint):
    m = load_model(str(checkpoint))
    assert m.engine == "prunelab fused engine"
    return m


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a thread on a free localhost port; `url` once /health answers 200."""

    def __init__(self, served, **cfg) -> None:
        import uvicorn

        self.port = _free_port()
        self.app = create_app(served, ServeConfig(**{"model_name": "tiny", "threads": 1, **cfg}))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, access_log=False,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        _wait_healthy(self.url)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _wait_healthy(url: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url}/health never answered 200")


@pytest.fixture(scope="module")
def server(served) -> Iterator[LiveServer]:
    s = LiveServer(served, api_key=KEY, max_batch=4, max_queue=8)
    yield s
    s.close()


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def _hf_greedy_text(checkpoint: Path, ids: list[int], n: int) -> str:
    lm = load(str(checkpoint))
    with torch.no_grad():
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return lm.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_openai_client_greedy_equals_transformers_and_generate(client, served, checkpoint) -> None:
    n = 12
    messages = [{"role": "user", "content": "Say hi"}]
    chat_ids = served.encode_chat(messages)
    ref_chat = _hf_greedy_text(checkpoint, chat_ids, n)
    ours = complete(served, chat_ids, n, SamplingParams()).text  # what `prunelab generate --chat` prints
    assert ours == ref_chat

    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=n, temperature=0)
    assert r.choices[0].message.content == ref_chat
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(chat_ids) and 1 <= r.usage.completion_tokens <= n

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=n, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref_chat
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    prompt = "The quick brown fox"
    ref = _hf_greedy_text(checkpoint, served.encode(prompt), n)
    c = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
    assert c.choices[0].text == ref == complete(served, served.encode(prompt), n, SamplingParams()).text
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_concurrent_requests_batch_and_match_sequential(client, server) -> None:
    """Six clients at once (batch of 4 + queue): each gets what it gets alone; the batch really held > 1."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"prompt number {i} " * (i + 1) for i in range(6)]

    def ask(p: str) -> str:
        return client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    steps0 = server.app.state.scheduler.stats.steps
    entries0 = server.app.state.scheduler.stats.step_entries
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    stats = server.app.state.scheduler.stats
    assert stats.step_entries - entries0 > stats.steps - steps0  # some steps fed several sequences


def test_sampling_is_seeded(client) -> None:
    kw = {"model": "tiny", "prompt": "abc", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b


def test_bad_requests_get_error_objects_and_server_keeps_serving(server, caplog) -> None:
    h = {"Authorization": f"Bearer {KEY}"}
    u = server.url
    long_prompt = "x" * 200  # the tiny model's context is 128 tokens
    cases = [
        ("malformed JSON", f"{u}/v1/chat/completions", b"{not json", h, 400),
        ("missing messages", f"{u}/v1/chat/completions", {"model": "tiny"}, h, 400),
        ("max_tokens 0", f"{u}/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                                                      "max_tokens": 0}, h, 400),
        ("too long", f"{u}/v1/completions", {"model": "tiny", "prompt": long_prompt, "max_tokens": 4}, h, 413),
        ("unknown model", f"{u}/v1/completions", {"model": "gpt-9", "prompt": "a"}, h, 404),
        ("wrong key", f"{u}/v1/completions", {"model": "tiny", "prompt": "a"}, {"Authorization": "Bearer no"}, 401),
        ("no key", f"{u}/v1/models", None, {}, 401),
    ]
    for label, url, body, headers, status in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="prunelab.serve"):
            if body is None:
                r = httpx.get(url, headers=headers)
            elif isinstance(body, bytes):
                r = httpx.post(url, content=body, headers={**headers, "Content-Type": "application/json"})
            else:
                r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == status, label
        err = r.json()["error"]
        assert err["message"] and err["type"], label
        lines = [rec for rec in caplog.records if rec.name == "prunelab.serve"]
        assert len(lines) == 1 and str(status) in lines[0].getMessage(), (label, [x.getMessage() for x in lines])
        assert "\n" not in lines[0].getMessage()
    ok = httpx.post(f"{u}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 3}, headers=h)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(f"{u}/health").status_code == 200  # no key needed
    metrics = httpx.get(f"{u}/metrics", headers=h).text
    for name in ("prunelab_requests_total", "prunelab_generated_tokens_total", "prunelab_queue_depth",
                 "prunelab_request_latency_seconds_sum", "prunelab_active_sequences"):
        assert name in metrics
    assert 'status="413"' in metrics


def test_killed_stream_frees_slot_and_full_queue_answers_429(served) -> None:
    """One slot, queue of one, slow steps: a dropped stream is cancelled at once; a third request gets 429."""
    s = LiveServer(served, max_batch=1, max_queue=1, step_delay_s=0.05)
    try:
        body = {"model": "tiny", "prompt": "a", "max_tokens": 100, "temperature": 0, "stream": True,
                "ignore_eos": True}
        sched = s.app.state.scheduler
        with httpx.Client(timeout=30) as c, c.stream("POST", f"{s.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped iterator closes the response (a disconnect)
            next(lines)  # the stream has started: the only slot is taken
            assert sched.active == 1
            waiting: list[httpx.Response] = []
            t = threading.Thread(target=lambda: waiting.append(
                httpx.post(f"{s.url}/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=30)))
            t.start()
            end = time.monotonic() + 10
            while sched.queue_depth < 1 and time.monotonic() < end:
                time.sleep(0.01)
            full = httpx.post(f"{s.url}/v1/completions", json={**body, "stream": False}, timeout=30)
            assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
        # the streaming client is gone (connection closed after 1 of 100 tokens): the queued one runs now
        t0 = time.monotonic()
        t.join(timeout=20)
        assert waiting and waiting[0].status_code == 200
        assert time.monotonic() - t0 < 3  # not after the 99 remaining steps x 50 ms of the dropped stream
        assert sched.stats.finished["cancelled"] == 1
    finally:
        s.close()


def test_batched_rows_equal_single_rows_bit_for_bit() -> None:
    """mat_rows_batch (4 inputs per row decode + a remainder) == mat_rows per input bit for bit (group sizes
    16/32: up to fp32 rounding); mat_rows_t (16 transposed inputs, sparse matrices) up to fp32 rounding."""
    from prunelab.quant import QuantScheme, quantize_rtn
    from prunelab.runtime.qkernels import FAST, LANES, M_DENSE, M_GS, PAD, QPack, mat_rows, mat_rows_batch, mat_rows_t

    torch.manual_seed(0)
    pack, mats = QPack(), []
    for bits, gs, dense in ((8, None, False), (4, 64, False), (None, None, False), (8, None, True), (4, 128, True),
                            (None, None, True), (8, 32, False), (4, 16, False), (8, 32, True), (4, 32, True)):
        w = torch.randn(40, 256)
        w[torch.rand_like(w) < (0 if dense else 0.6)] = 0
        info = None
        if bits:
            _, info = quantize_rtn(w, QuantScheme(bits, gs), "m")
            w = info.dequantize(info.ints(w))
        mats.append(pack.add(w, info, dense=dense))
    b = pack.finalize().buffers()
    n, xs, ys = 7, 256 + 8, 50
    x = np.random.default_rng(0).standard_normal(n * xs + PAD).astype(np.float32)
    for fast in {FAST, False}:
        for m in mats:
            one, many = np.zeros(n * ys, np.float32), np.zeros(n * ys, np.float32)
            for e in range(n):
                mat_rows(b[0], m, 0, 40, *b[1:], x, e * xs, one, e * ys + 3, fast)
            mat_rows_batch(b[0], m, 0, 40, *b[1:], x, xs, n, many, 3, ys, fast)
            if fast and b[0][m, M_GS] < 64:  # group 16/32 batched: word scaled first, q*s*x rounding
                assert np.abs(one - many).max() <= 1e-5 * np.abs(one).max(), (m, fast)
            else:
                assert np.array_equal(one, many), (m, fast)
            if fast and b[0][m, M_DENSE] == 0:  # sparse: the transposed kernel (one FMA per kept weight)
                xt = np.zeros(256 * LANES + PAD, np.float32)
                xt[: 256 * LANES].reshape(256, LANES)[:, :n] = x[: n * xs].reshape(n, xs)[:, :256].T
                yt = np.zeros(40 * LANES + PAD, np.float32)
                mat_rows_t(b[0], m, 0, 40, b[1], b[3], b[4], b[5], b[6], xt, yt, 0)
                ref = one.reshape(n, ys)[:, 3:43]
                got = yt[: 40 * LANES].reshape(40, LANES)[:, :n].T
                assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), m


def test_batch_decoder_equals_single_engine(tiny_dirs) -> None:
    """int4 groups of 16 (split kernel), fp32 and the scalar path: a batched step mixing prompt chunks of
    several sequences gives each one's logits as the single engine does (up to fp32 summation order)."""
    from prunelab.runtime.fused_decode import BatchDecoder, DecodeEngine

    for recipe, fast in (({"method": "magnitude", "sparsity": 0.5, "quant": "int4", "group_size": 16}, None),
                         ({"method": "magnitude", "sparsity": 0.7}, None),
                         ({"method": "magnitude", "sparsity": 0.7, "quant": "int8"}, False)):
        lm = load(str(tiny_dirs["llama"]))
        prune(lm, PruneConfig(**recipe))
        eng = DecodeEngine.from_model(lm, fast=fast)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(5, 260, size=k).tolist() for k in (13, 9, 4, 16, 5)]
        refs = [eng.logits(p) for p in prompts]
        batch = BatchDecoder(eng, len(prompts), max_entries=32)
        got: list[list[np.ndarray]] = [[] for _ in prompts]
        fed = [0] * len(prompts)
        while any(f < len(p) for f, p in zip(fed, prompts, strict=True)):
            toks, slots, poss = [], [], []
            for i, p in enumerate(prompts):  # up to 4 tokens of every sequence per step: 20, 13, 9, 5, ... entries
                for _ in range(4):
                    if fed[i] < len(p):
                        toks.append(p[fed[i]])
                        slots.append(i)
                        poss.append(fed[i])
                        fed[i] += 1
            rows = batch.step(toks, slots, poss, [True] * len(toks))
            for row, i in zip(rows, slots, strict=True):
                got[i].append(row.copy())
        for g, r in zip(got, refs, strict=True):
            assert np.abs(np.array(g) - r).max() <= 1e-5 * np.abs(r).max()
            assert (np.array(g).argmax(-1) == r.argmax(-1)).all()


def test_cli_serve_answers_health_and_a_completion(checkpoint) -> None:
    port = _free_port()
    exe = str(Path(sys.executable).parent / "prunelab")
    proc = subprocess.Popen([exe, "serve", str(checkpoint), "--port", str(port), "--model-name", "tiny",
                             "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", timeout=120)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "serving" in out and "Traceback" not in out, out


def test_transformers_fallback_serves_concurrent_requests(tiny_dirs) -> None:
    """GPT-2 has no fused engine: the server runs transformers per slot, same greedy text as its generate."""
    from concurrent.futures import ThreadPoolExecutor

    served = load_model(str(tiny_dirs["gpt2"]))
    assert served.engine == "transformers"
    s = LiveServer(served, max_batch=2)
    try:
        prompts = ["hello world", "abc", "the end"]
        refs = [_hf_greedy_text(tiny_dirs["gpt2"], served.encode(p), 8) for p in prompts]

        def ask(p: str) -> str:
            r = httpx.post(f"{s.url}/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0}, timeout=60)
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(ask, prompts)) == refs
    finally:
        s.close()


def test_request_timeout_answers_504_and_frees_the_slot(served) -> None:
    s = LiveServer(served, max_batch=1, timeout_s=0.3, step_delay_s=0.02)
    try:
        body = {"model": "tiny", "prompt": "a", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
        ok = httpx.post(f"{s.url}/v1/completions", json={**body, "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200
        assert s.app.state.scheduler.stats.finished["timeout"] == 1
    finally:
        s.close()
