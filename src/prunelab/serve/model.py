"""A loaded language model as `generate` and `serve` use it: prompt encoding, a batched step, sampling, text.

Why one object for both: the CLI's `generate` and the server must give the same tokens for the same
checkpoint and prompt, so they share the engine choice (prunelab's fused engine when the checkpoint is a
Llama-architecture decoder, transformers otherwise), the chat template, the stop tokens, the sampler and
the incremental detokenizer. Both drive the model through one interface, `Batcher.step`: entries of
(token, sequence slot, position, want logits) — a single `generate` is a batch of one slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from prunelab.errors import ConfigError
from prunelab.models.types import LoadedModel

FUSED, TRANSFORMERS = "prunelab fused engine", "transformers"


class Batcher(Protocol):
    """Feeds entries through the model; keeps one KV cache per slot."""

    slots: int
    max_entries: int

    def step(self, tokens: list[int], slots: list[int], positions: list[int], want: list[bool]) -> np.ndarray:
        """The logits `(sum(want), vocab)` of the wanted entries, in entry order."""
        ...


class FusedBatcher:
    """`BatchDecoder` over the engine's packed sparse / quantized weights."""

    def __init__(self, engine: Any, slots: int, max_entries: int = 64) -> None:
        from prunelab.runtime.fused_decode import BatchDecoder

        self.batch = BatchDecoder(engine, slots, max_entries=max_entries)
        self.slots, self.max_entries = slots, max_entries

    def step(self, tokens: list[int], slots: list[int], positions: list[int], want: list[bool]) -> np.ndarray:
        return self.batch.step(tokens, slots, positions, want)


class TransformersBatcher:
    """The transformers model, one forward per slot present in the step (no shared pass: the fallback)."""

    def __init__(self, model: torch.nn.Module, slots: int, max_entries: int = 64) -> None:
        self.model, self.slots, self.max_entries = model, slots, max_entries
        self.caches: list[Any] = [None] * slots
        self.lengths = [0] * slots

    def step(self, tokens: list[int], slots: list[int], positions: list[int], want: list[bool]) -> np.ndarray:
        from transformers import DynamicCache

        rows: list[np.ndarray] = []
        order = list(dict.fromkeys(slots))  # slots in order of first appearance
        by_entry: dict[int, np.ndarray] = {}
        for s in order:
            idx = [e for e, se in enumerate(slots) if se == s]
            first = positions[idx[0]]
            if first == 0 or self.caches[s] is None:
                self.caches[s], self.lengths[s] = DynamicCache(), 0
            if first != self.lengths[s] or [positions[e] for e in idx] != list(range(first, first + len(idx))):
                raise ConfigError(f"slot {s}: positions must continue the sequence (at {self.lengths[s]})")
            ids = torch.tensor([[tokens[e] for e in idx]])
            with torch.no_grad():
                out = self.model(input_ids=ids, cache=self.caches[s], use_cache=True,
                                 position_ids=torch.arange(first, first + len(idx))[None])
            self.caches[s], self.lengths[s] = out.cache, first + len(idx)
            logits = out.logits[0].float().numpy()
            for k, e in enumerate(idx):
                if want[e]:
                    by_entry[e] = logits[k]
        rows = [by_entry[e] for e in range(len(tokens)) if want[e]]
        return np.stack(rows) if rows else np.zeros((0, int(self.model.config.vocab_size)), np.float32)


@dataclass
class ServedModel:
    """What generation needs of a checkpoint; the float model is kept only on the transformers path."""

    name: str
    tokenizer: Any
    engine: str  # FUSED or TRANSFORMERS
    context: int
    eos_ids: set[int]
    vocab: int
    fused: Any = None  # DecodeEngine
    model: Any = None  # the transformers model (fallback)
    notes: list[str] = field(default_factory=list)

    def batcher(self, slots: int, max_entries: int = 64) -> Batcher:
        if self.fused is not None:
            return FusedBatcher(self.fused, slots, max_entries)
        return TransformersBatcher(self.model, slots, max_entries)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Prompt text → ids with the tokenizer's usual specials (BOS where the model wants one)."""
        if isinstance(prompt, list):
            return [int(t) for t in prompt]
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages → ids through the tokenizer's chat template, with the assistant's turn opened."""
        if not self.has_chat_template:
            raise ConfigError(f"{self.name}'s tokenizer has no chat template: send a plain prompt instead")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_length(self, n_prompt: int, max_new: int) -> None:
        if n_prompt < 1:
            raise ConfigError("the prompt is empty")
        if n_prompt + max_new > self.context:
            raise PromptTooLong(f"prompt ({n_prompt} tokens) + max tokens ({max_new}) exceed {self.name}'s "
                                f"context of {self.context} tokens")


class PromptTooLong(ConfigError):
    """Prompt plus requested tokens do not fit the model's context (HTTP 413)."""


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(lm.model, "generation_config", None), lm.config):
        e = getattr(src, "eos_token_id", None)
        ids.update([e] if isinstance(e, int) else (e or []))
    if lm.tokenizer is not None and lm.tokenizer.eos_token_id is not None:
        ids.add(int(lm.tokenizer.eos_token_id))
    return ids


def load_model(spec: str, *, engine: str = "auto") -> ServedModel:
    """Load a decoder LM for generation: prunelab's fused engine where the checkpoint allows it
    (`engine="auto"` or "fused"), transformers otherwise (or with `engine="transformers"`)."""
    from prunelab.runtime.fused_decode import DecodeEngine
    from prunelab.storage import load

    if engine not in ("auto", "fused", "transformers"):
        raise ConfigError(f"unknown engine {engine!r}: choose auto, fused or transformers")
    lm = load(spec)
    if lm.family != "decoder" or lm.is_speech:
        kind = "speech" if lm.is_speech else lm.family
        raise ConfigError(f"{spec} is an {kind} model ({getattr(lm.config, 'model_type', '?')}): "
                          "generate and serve need a decoder language model")
    if lm.tokenizer is None:
        raise ConfigError(f"{spec} has no tokenizer: generate and serve need one to read and write text")
    context = lm.context_length or 2048
    served = ServedModel(str(spec), lm.tokenizer, TRANSFORMERS, context, _eos_ids(lm), int(lm.config.vocab_size))
    if engine != "transformers":
        try:
            served.fused = DecodeEngine.from_model(lm)
            served.engine = FUSED
        except ConfigError as exc:
            if engine == "fused":
                raise
            served.notes.append(f"fused engine unavailable ({exc}); running on transformers")
    if served.fused is None:
        served.model = lm.model
    return served


@dataclass
class SamplingParams:
    """temperature 0 (or top_k 1) is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> SamplingParams:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (got {self.top_p})")
        return self


class Sampler:
    """Next token from logits: argmax when greedy, else temperature → top-k → top-p → a seeded draw."""

    def __init__(self, params: SamplingParams) -> None:
        self.p = params.validate()
        self.rng = np.random.default_rng(params.seed)

    @property
    def greedy(self) -> bool:
        return self.p.temperature == 0 or self.p.top_k == 1

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.p.temperature
        z = np.exp(z - z.max())
        probs = z / z.sum()
        k = self.p.top_k if 0 < self.p.top_k < z.size else 0
        if self.p.top_p < 1 and not k:
            k = min(256, z.size)  # the nucleus nearly always lies in the top 256: no full sort per token
        idx = np.argpartition(-probs, k - 1)[:k] if 0 < k < z.size else np.arange(z.size)
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        p = probs[idx]
        if self.p.top_k:
            p = p / p.sum()  # top-k first, then top-p on what is left (transformers' order)
        if self.p.top_p < 1:
            cum = np.cumsum(p)
            if cum[-1] < self.p.top_p and idx.size < z.size:  # rare flat distribution: the whole vocabulary
                idx = np.argsort(-probs, kind="stable")
                p = probs[idx]
                cum = np.cumsum(p)
            keep = int(np.searchsorted(cum, self.p.top_p)) + 1
            idx, p = idx[:keep], p[:keep]
        p = p / p.sum()
        return int(idx[self.rng.choice(p.size, p=p)])


class Detokenizer:
    """Incremental text from a growing token list: each `add` returns only the new, complete characters.

    Why not decode the whole list each time: that is quadratic, and a byte-level token can end inside a
    multi-byte character (decoded as U+FFFD until the next token completes it), so text is released only
    when it no longer ends in a replacement character; `flush` returns whatever is left at the end."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok, self.ids, self.prefix, self.read, self.emitted = tokenizer, [], 0, 0, ""

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            delta = now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.emitted += delta
            return delta
        return ""

    def flush(self) -> str:
        full = self._decode(self.ids)
        rest = full[len(self.emitted):] if full.startswith(self.emitted) else ""
        self.emitted += rest
        return rest

    @property
    def text(self) -> str:
        return self.emitted
