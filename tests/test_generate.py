"""prunelab generate: streamed text equals transformers' greedy `generate` on the same checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from prunelab.pruning import PruneConfig, prune
from prunelab.serve import SamplingParams, complete, load_model
from prunelab.serve.model import Sampler
from prunelab.storage import load, save

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")


@pytest.fixture(scope="module")
def pruned_llama(tiny_dirs, tmp_path_factory) -> Path:
    lm = load(str(tiny_dirs["llama"]))
    prune(lm, PruneConfig(method="magnitude", sparsity=0.7, quant="int8"))
    lm.tokenizer.chat_template = TEMPLATE
    return Path(save(lm, tmp_path_factory.mktemp("gen") / "q", format="sparse"))


def _hf_greedy(spec: str, ids: list[int], n: int) -> str:
    lm = load(spec)
    with torch.no_grad():
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return lm.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_cli_generate_streams_transformers_greedy_text(pruned_llama, monkeypatch, capsys) -> None:
    prompt, n = "Once upon a time", 16
    served = load_model(str(pruned_llama))
    ref = _hf_greedy(str(pruned_llama), served.encode(prompt), n)
    code, text = run_cli(monkeypatch, capsys, "generate", str(pruned_llama), "--prompt", prompt,
                         "--max-new-tokens", str(n))
    assert code == 0, text
    assert text.startswith(ref + "\n")
    assert "[prunelab fused engine]" in text and "tokens/s" in text


def test_chat_uses_the_template(pruned_llama, monkeypatch, capsys) -> None:
    served = load_model(str(pruned_llama))
    ids = served.encode_chat([{"role": "user", "content": "hello"}])
    ref = _hf_greedy(str(pruned_llama), ids, 10)
    monkeypatch.setattr("sys.stdin", open("/dev/null"))  # noqa: SIM115 - not a terminal: one turn
    code, text = run_cli(monkeypatch, capsys, "generate", str(pruned_llama), "--chat", "--prompt", "hello",
                         "--max-new-tokens", "10")
    assert code == 0, text
    assert text.startswith(ref + "\n")


def test_non_llama_runs_on_transformers(tiny_dirs) -> None:
    """GPT-2 has no fused engine: the transformers path, same greedy text as transformers' generate."""
    served = load_model(str(tiny_dirs["gpt2"]))
    assert served.engine == "transformers" and served.notes
    ids = served.encode("abc def")
    res = complete(served, ids, 12, SamplingParams())
    assert res.text == _hf_greedy(str(tiny_dirs["gpt2"]), ids, 12)


def test_sampling_seeded_and_top_k_one_is_greedy(pruned_llama) -> None:
    served = load_model(str(pruned_llama))
    ids = served.encode("xyz")
    runs = [complete(served, ids, 12, SamplingParams(temperature=1.0, top_p=0.95, seed=3)).tokens for _ in range(2)]
    assert runs[0] == runs[1]
    greedy = complete(served, ids, 12, SamplingParams()).tokens
    assert complete(served, ids, 12, SamplingParams(temperature=0.7, top_k=1, seed=1)).tokens == greedy


def test_sampler_filters() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    top_p = Sampler(SamplingParams(temperature=1.0, top_p=0.6, seed=0))
    assert {top_p(logits) for _ in range(200)} == {0, 1}  # 0.5 < 0.6: the nucleus needs the second token
    top_k = Sampler(SamplingParams(temperature=1.0, top_k=3, seed=0))
    draws = [top_k(logits) for _ in range(2000)]
    assert set(draws) == {0, 1, 2}
    assert abs(draws.count(0) / 2000 - 0.5 / 0.95) < 0.05


@pytest.mark.parametrize("which", ["missing", "bert"])
def test_bad_model_is_one_line_exit_2(which, tiny_dirs, tmp_path, monkeypatch, capsys) -> None:
    spec = str(tmp_path / "nope") if which == "missing" else str(tiny_dirs["bert"])
    code, text = run_cli(monkeypatch, capsys, "generate", spec, "--prompt", "hi")
    assert code == 2
    assert len(text.strip().splitlines()) == 1 and text.startswith("error:"), text


@pytest.mark.slow
def test_smollm2_server_chat_equals_transformers(tmp_path) -> None:
    """Realism: SmolLM2-135M-Instruct 70 % + int8 saved sparse, its chat template, the live server's greedy
    chat completion (openai client) == transformers' greedy generate == `complete` on the same checkpoint."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn
    from openai import OpenAI

    from prunelab.serve import ServeConfig, create_app

    lm = load("zoo:smollm2")
    prune(lm, PruneConfig(method="magnitude", sparsity=0.7, quant="int8"))
    folder = save(lm, tmp_path / "q", format="sparse")
    del lm
    served = load_model(str(folder))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = served.encode_chat(messages)
    ref = _hf_greedy(str(folder), ids, 12)
    assert complete(served, ids, 12, SamplingParams()).text == ref
    app = create_app(served, ServeConfig("smollm2", threads=1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == ref
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_interactive_chat_turns_from_a_terminal(pruned_llama) -> None:
    """--chat on a terminal: one completion per line typed, the conversation carried over, /exit ends it."""
    import io

    from prunelab.serve import generate

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out, err = io.StringIO(), io.StringIO()
    results = generate(str(pruned_llama), chat=True, max_new_tokens=5, out=out, err=err,
                       stdin=Tty("hello\n\nhow are you\n/exit\n"))
    assert len(results) == 2
    assert results[1].prompt_tokens > results[0].prompt_tokens + len(results[0].tokens)  # history included
    assert err.getvalue().count("you> ") == 4 and err.getvalue().count("tokens/s") == 2
