"""`prunelab generate`: text from a (pruned, quantized) checkpoint, streamed as it is produced.

Why a loop of our own rather than `model.generate`: the fused engine has no HF generate, and the server
must give the same tokens; both run `stream_tokens` (one slot of the same `Batcher` the server batches).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

from prunelab.errors import ConfigError
from prunelab.serve.model import Batcher, Detokenizer, Sampler, SamplingParams, ServedModel, load_model

PREFILL_CHUNK = 64  # prompt tokens per step: one pass over the weights serves the whole chunk


def stream_tokens(served: ServedModel, batcher: Batcher, prompt: list[int], max_new_tokens: int,
                  sampler: Sampler, slot: int = 0) -> Iterator[int]:
    """New tokens of one sequence in `slot`, stopping after an end-of-sequence token or `max_new_tokens`."""
    served.check_length(len(prompt), max_new_tokens)
    chunk = min(PREFILL_CHUNK, batcher.max_entries)
    logits = None
    for s in range(0, len(prompt), chunk):
        part = prompt[s:s + chunk]
        want = [False] * (len(part) - 1) + [s + len(part) == len(prompt)]
        logits = batcher.step(part, [slot] * len(part), list(range(s, s + len(part))), want)
    pos = len(prompt)
    for i in range(max_new_tokens):
        tok = sampler(logits[0])
        yield tok
        if tok in served.eos_ids or i == max_new_tokens - 1:
            return
        logits = batcher.step([tok], [slot], [pos], [True])
        pos += 1


@dataclass
class GenerateResult:
    """One completion: its text and tokens, which engine ran it, and how fast."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    engine: str
    seconds: float
    first_token_s: float
    finish_reason: str
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode rate: tokens after the first over the time after the first (prefill excluded)."""
        n, t = len(self.tokens) - 1, self.seconds - self.first_token_s
        return n / t if n > 0 and t > 0 else 0.0

    def summary(self) -> str:
        return (f"[{self.engine}] {len(self.tokens)} tokens ({self.finish_reason}), {self.tokens_per_s:.1f} tokens/s "
                f"decode; prompt {self.prompt_tokens} tokens, first token after {self.first_token_s * 1e3:.0f} ms")


def complete(served: ServedModel, prompt: list[int], max_new_tokens: int, params: SamplingParams,
             out: TextIO | None = None, batcher: Batcher | None = None) -> GenerateResult:
    """Generate after `prompt` (ids), writing text to `out` as it comes; the result with timings."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    sampler = Sampler(params)
    batcher = batcher or served.batcher(1)
    detok = Detokenizer(served.tokenizer)
    t0, first, tokens = time.perf_counter(), 0.0, []
    for tok in stream_tokens(served, batcher, prompt, max_new_tokens, sampler):
        if not tokens:
            first = time.perf_counter() - t0
        tokens.append(tok)
        piece = detok.add(tok)
        if out is not None and piece:
            out.write(piece)
            out.flush()
    rest = detok.flush()
    if out is not None:
        out.write(rest + "\n")
        out.flush()
    reason = "stop" if tokens and tokens[-1] in served.eos_ids else "length"
    return GenerateResult(detok.text, tokens, len(prompt), served.engine, time.perf_counter() - t0, first, reason,
                          list(served.notes))


def generate(model: str, *, prompt: str | None = None, chat: bool = False, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             out: TextIO | None = None, err: TextIO | None = None,
             stdin: TextIO | None = None) -> list[GenerateResult]:
    """`prunelab generate`: one completion of `prompt` (or standard input when it is piped), or with `chat`
    the chat template applied — one turn from `prompt` / piped input, or interactive turns from a terminal.
    Text streams to `out`; after each completion a line on `err` names the engine and its tokens/s."""
    out, err, stdin = out or sys.stdout, err or sys.stderr, stdin or sys.stdin
    params = SamplingParams(temperature, top_k, top_p, seed).validate()
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    interactive = chat and prompt is None and stdin.isatty()
    if prompt is None and not interactive:
        if stdin.isatty():
            raise ConfigError("give --prompt TEXT, pipe a prompt on standard input, or use --chat")
        prompt = stdin.read()
    served = load_model(model)
    if chat and not served.has_chat_template:
        raise ConfigError(f"{model}'s tokenizer has no chat template: use --prompt without --chat")
    for note in served.notes:
        err.write(f"note: {note}\n")
    batcher = served.batcher(1)
    results: list[GenerateResult] = []
    if not chat:
        results.append(complete(served, served.encode(prompt or ""), max_new_tokens, params, out, batcher))
        err.write(results[-1].summary() + "\n")
        return results
    messages: list[dict[str, str]] = []
    while True:
        if interactive:
            err.write("you> ")
            err.flush()
            line = stdin.readline()
            if not line or line.strip() in ("/exit", "/quit"):
                return results
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
        else:
            messages.append({"role": "user", "content": prompt or ""})
        res = complete(served, served.encode_chat(messages), max_new_tokens, params, out, batcher)
        messages.append({"role": "assistant", "content": res.text})
        results.append(res)
        err.write(res.summary() + "\n")
        if not interactive:
            return results
