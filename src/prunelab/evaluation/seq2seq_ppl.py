"""Teacher-forced perplexity of a text encoder-decoder, over target tokens only.

The bug this module exists to prevent: averaging the loss over padding (or over a prompt the
decoder is fed) rewards a destroyed model, because padding is trivially predictable. Here
labels are -100 on padding and prompt positions, the loss is summed over the remaining
positions and divided by their count, so the value does not depend on batch composition.

Default task, deterministic from `seed`: WikiText-2 (same text as `ppl`) tokenized once
without special tokens, cut into chunks; each chunk is rebuilt from a corrupted copy using the
model's own pretraining objective where one is defined:
- T5 family (sentinel tokens): span corruption, 15 % noise, mean span 3; the target is
  "<extra_id_0> span0 <extra_id_1> span1 … <extra_id_n> </s>".
- BART family (mask token): token masking, 15 % of tokens replaced by <mask>; the target is
  the whole chunk "<s> chunk </s>".
- anything else: identity reconstruction (input = target = chunk + </s>).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from prunelab.data.wikitext import load_wikitext, token_stream
from prunelab.errors import ConfigError, DataError
from prunelab.evaluation.common import Blocks, ppl_result, ratio_interval_data, require_tokenizer, summed_nll
from prunelab.evaluation.types import EvalOptions, EvalResult
from prunelab.models.types import LoadedModel

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0
DEFAULT_CAP = 256  # input length (chunk + specials) when --seqlen is not given
T5_TYPES = {"t5", "mt5", "umt5", "longt5", "switch_transformers"}
BART_TYPES = {"bart", "mbart", "plbart", "bigbird_pegasus"}


@dataclass
class Seq2SeqExample:
    """Encoder input, a decoder prompt that is fed but not scored, and the scored target."""

    input_ids: list[int]
    target_ids: list[int]
    prompt_ids: list[int] = field(default_factory=list)


def _sentinel_ids(tokenizer: Any) -> list[int]:
    ids: list[int] = []
    unk = getattr(tokenizer, "unk_token_id", None)
    vocab = tokenizer.get_vocab()
    while f"<extra_id_{len(ids)}>" in vocab:
        tid = tokenizer.convert_tokens_to_ids(f"<extra_id_{len(ids)}>")
        if tid is None or tid == unk:
            break
        ids.append(int(tid))
    return ids


def task_for(lm: LoadedModel) -> str:
    """Which corruption the model was pretrained with: 't5-span', 'bart-mask' or 'copy'."""
    model_type = getattr(lm.model.config, "model_type", "")
    tok = lm.tokenizer
    if model_type in T5_TYPES and len(_sentinel_ids(tok)) >= 2:
        return "t5-span"
    if model_type in BART_TYPES and getattr(tok, "mask_token_id", None) is not None:
        return "bart-mask"
    return "copy"


def _segments(rng: np.random.Generator, n_items: int, n_segments: int) -> list[int]:
    """Split n_items into n_segments non-empty runs at random cut points."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), size=n_segments - 1, replace=False)) if n_segments > 1 else []
    bounds = [0, *[int(c) for c in cuts], n_items]
    return [bounds[i + 1] - bounds[i] for i in range(n_segments)]


def t5_span_corrupt(chunk: Sequence[int], sentinels: Sequence[int], eos: int, rng: np.random.Generator
                    ) -> tuple[list[int], list[int]]:
    """(input, target) for T5 span corruption: alternating kept/noise runs, noise runs → sentinels."""
    n = len(chunk)
    n_noise = int(min(max(round(n * NOISE_DENSITY), 1), n - 1))
    n_spans = int(max(1, min(round(n_noise / MEAN_SPAN), len(sentinels) - 1, n - n_noise, n_noise)))
    noise_lengths = _segments(rng, n_noise, n_spans)
    keep_lengths = _segments(rng, n - n_noise, n_spans)
    source: list[int] = []
    target: list[int] = []
    pos = 0
    for k in range(n_spans):
        source.extend(chunk[pos : pos + keep_lengths[k]])
        pos += keep_lengths[k]
        source.append(sentinels[k])
        target.append(sentinels[k])
        target.extend(chunk[pos : pos + noise_lengths[k]])
        pos += noise_lengths[k]
    target.append(sentinels[n_spans])
    return [*source, eos], [*target, eos]


def bart_token_mask(chunk: Sequence[int], mask_id: int, bos: int | None, eos: int, rng: np.random.Generator
                    ) -> tuple[list[int], list[int]]:
    """(input, target) for BART token masking: 15 % of tokens → <mask>; the target is the clean chunk."""
    n = len(chunk)
    n_mask = int(min(max(round(n * NOISE_DENSITY), 1), n))
    masked = list(chunk)
    for i in rng.choice(n, size=n_mask, replace=False):
        masked[int(i)] = mask_id
    prefix = [bos] if bos is not None else []
    return [*prefix, *masked, eos], [*prefix, *chunk, eos]


def build_examples(lm: LoadedModel, chunks: list[list[int]], seed: int) -> tuple[list[Seq2SeqExample], str]:
    """The default task's examples, each chunk corrupted with its own RNG (seed, chunk index)."""
    tok = lm.tokenizer
    task = task_for(lm)
    eos = tok.eos_token_id if tok.eos_token_id is not None else lm.model.config.eos_token_id
    examples: list[Seq2SeqExample] = []
    for index, chunk in enumerate(chunks):
        rng = np.random.default_rng([seed, index])
        if task == "t5-span":
            src, tgt = t5_span_corrupt(chunk, _sentinel_ids(tok), eos, rng)
        elif task == "bart-mask":
            src, tgt = bart_token_mask(chunk, tok.mask_token_id, tok.bos_token_id, eos, rng)
        else:
            src, tgt = [*chunk, eos], [*chunk, eos]
        examples.append(Seq2SeqExample(src, tgt))
    return examples, task


def _decoder_start(model: torch.nn.Module) -> int:
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(config, "decoder", None), "decoder_start_token_id", None)
    if start is None:
        start = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    return int(start)


def collate(examples: Sequence[Seq2SeqExample], pad_id: int, decoder_start: int, extra_padding: int = 0
            ) -> dict[str, torch.Tensor]:
    """Right-padded tensors; labels are -100 on the decoder prompt and on padding.

    `extra_padding` adds that many padding positions beyond the longest example, which must
    not change any loss: the test that guards the padding bug uses it.
    """
    in_width = max(len(e.input_ids) for e in examples) + extra_padding
    dec_width = max(len(e.prompt_ids) + len(e.target_ids) for e in examples) + extra_padding
    b = len(examples)
    input_ids = torch.full((b, in_width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, in_width), dtype=torch.long)
    dec_ids = torch.full((b, dec_width), pad_id, dtype=torch.long)
    dec_mask = torch.zeros((b, dec_width), dtype=torch.long)
    labels = torch.full((b, dec_width), -100, dtype=torch.long)
    for row, ex in enumerate(examples):
        input_ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        attention[row, : len(ex.input_ids)] = 1
        full = [*ex.prompt_ids, *ex.target_ids]
        shifted = [decoder_start, *full[:-1]]
        dec_ids[row, : len(shifted)] = torch.tensor(shifted)
        dec_mask[row, : len(shifted)] = 1
        labels[row, len(ex.prompt_ids) : len(full)] = torch.tensor(ex.target_ids)
    return {"input_ids": input_ids, "attention_mask": attention, "decoder_input_ids": dec_ids,
            "decoder_attention_mask": dec_mask, "labels": labels}


@torch.inference_mode()
def seq2seq_nll(model: torch.nn.Module, examples: Sequence[Seq2SeqExample], *, pad_id: int, batch_size: int = 8,
                extra_padding: int = 0, per_example: Blocks | None = None) -> tuple[float, int]:
    """(sum of NLL over target tokens, number of target tokens), teacher-forced.

    With `per_example`, also append each example's (NLL, target tokens) in batch order (the
    bootstrap units of the report's interval).
    """
    start = _decoder_start(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].target_ids))
    total, count = 0.0, 0
    for i in range(0, len(order), batch_size):
        batch = collate([examples[j] for j in order[i : i + batch_size]], pad_id, start, extra_padding)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        per_token: list[torch.Tensor] | None = [] if per_example is not None else None
        total += summed_nll(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), per_token)
        count += int((labels != -100).sum())
        if per_example is not None and per_token is not None:
            rows = per_token[0].view(labels.shape).sum(1).tolist()
            per_example += list(zip(rows, (labels != -100).sum(1).tolist(), strict=True))
    return total, count


def evaluate_seq2seq_ppl(lm: LoadedModel, options: EvalOptions) -> EvalResult:
    """Perplexity over target tokens of the default reconstruction task (lower is better)."""
    if lm.processor is not None:
        raise ConfigError(f"seq2seq-ppl needs a text encoder-decoder; {lm.name} takes audio: use --bench asr")
    tokenizer = require_tokenizer(lm, "seq2seq-ppl")
    context = lm.context_length
    tok_max = getattr(tokenizer, "model_max_length", None)
    limit = context or (tok_max if isinstance(tok_max, int) and tok_max < 100_000 else None)
    if options.seqlen is not None:
        if limit is not None and options.seqlen > limit:
            raise ConfigError(f"--seqlen {options.seqlen} exceeds the model context of {limit} tokens ({lm.name}): "
                              f"pass --seqlen {min(limit, DEFAULT_CAP)} or less")
        seqlen = options.seqlen
    else:
        seqlen = min(limit or DEFAULT_CAP, DEFAULT_CAP)
    chunk_len = seqlen - 2  # room for <s> … </s>
    if chunk_len < 4:
        raise ConfigError(f"--seqlen {seqlen} is too short for seq2seq-ppl: use at least 6")
    corpus = load_wikitext(options.data)
    stream = token_stream(tokenizer, corpus, add_special_tokens=False)
    n_chunks = stream.numel() // chunk_len
    if options.max_tokens is not None:
        n_chunks = min(n_chunks, max(1, options.max_tokens // chunk_len))
    if options.max_examples is not None:
        n_chunks = min(n_chunks, options.max_examples)
    if n_chunks == 0:
        raise DataError(f"{corpus.path} has {stream.numel()} tokens, fewer than one chunk of {chunk_len}")
    chunks = stream[: n_chunks * chunk_len].view(n_chunks, chunk_len).tolist()
    examples, task = build_examples(lm, chunks, options.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else lm.model.config.pad_token_id
    per_example: Blocks = []
    nll, count = seq2seq_nll(lm.model, examples, pad_id=int(pad_id), batch_size=options.batch_size,
                             per_example=per_example)
    descriptions = {
        "t5-span": "T5 span corruption (15 % noise, mean span 3, sentinels); target = sentinels + dropped spans + </s>",
        "bart-mask": "BART token masking (15 % of tokens -> <mask>); target = the clean chunk with <s> … </s>",
        "copy": "identity reconstruction (no pretraining corruption known for this model); target = chunk + </s>",
    }
    return ppl_result(
        lm, "seq2seq-ppl", options, metric="ppl", nll=nll, count=count,
        note=(f"teacher-forced NLL over target tokens only (-100 on padding and prompt); task: {descriptions[task]}; "
              f"{n_chunks} WikiText-2 chunks of {chunk_len} tokens, corruption seeded by (seed, chunk index)"),
        n_examples=n_chunks, seqlen=seqlen, corpus=corpus,
        details={"task": task, "chunk_tokens": chunk_len, "noise_density": NOISE_DENSITY,
                 "mean_span": MEAN_SPAN if task == "t5-span" else None,
                 "input_tokens": sum(len(e.input_ids) for e in examples), "text_sha256": corpus.text_sha256,
                 "interval_data": ratio_interval_data("examples", per_example, "exp")},
    )
