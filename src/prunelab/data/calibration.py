"""Calibration samples: `nsamples` windows of `seqlen` tokens, drawn deterministically from `seed`.

The text source is tokenized once as one stream; window starts are drawn uniformly with a
seeded generator (windows may overlap, as in the Wanda/SparseGPT recipes). Each sample is a
dict of model-ready forward kwargs with batch size 1:

- decoder: `input_ids`, `attention_mask`;
- encoder: the same, wrapped in the tokenizer's [CLS] … [SEP] when it has them;
- encoder-decoder (text): the window feeds the encoder, and the same window shifted right
  (starting with the model's `decoder_start_token_id`) feeds the decoder as `decoder_input_ids`;
- speech models (with a feature extractor): `prunelab.data.speech.speech_calibration_inputs`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from prunelab.data.text import TextSource, read_text_source
from prunelab.errors import DataError

Sample = dict[str, torch.Tensor]


@dataclass
class CalibrationSet:
    """The samples and what the report says about them."""

    inputs: list[Sample]
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


_STREAM_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def _tokenizer_key(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"


def tokenize_stream(tokenizer: Any, source: TextSource) -> torch.Tensor:
    """All of the source's texts as one 1-D token stream (no special tokens; texts end with a newline).

    Cached per (source sha256, tokenizer content) for the life of the process: studies and tests
    prune many models that share a tokenizer and a calibration source.
    """
    key = (f"{source.sha256}:{source.name}", _tokenizer_key(tokenizer))
    cached = _STREAM_CACHE.get(key)
    if cached is not None:
        return cached
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than model_max_length": we window it ourselves
    try:
        rows = tokenizer([t + "\n" for t in source.texts], add_special_tokens=False,
                         return_attention_mask=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(level)
    stream = torch.tensor([i for row in rows for i in row], dtype=torch.long)
    if len(_STREAM_CACHE) > 8:
        _STREAM_CACHE.clear()
    _STREAM_CACHE[key] = stream
    return stream


def _decoder_start(config: Any, tokenizer: Any) -> int:
    for v in (getattr(config, "decoder_start_token_id", None), getattr(config, "bos_token_id", None),
              getattr(config, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None)):
        if isinstance(v, int):
            return v
    raise DataError("the model config has no decoder_start_token_id: cannot build decoder inputs")


def text_calibration(
    lm: Any, source: TextSource, nsamples: int, seqlen: int, seed: int
) -> CalibrationSet:
    """Windows of the tokenized `source` shaped for `lm`'s family (see module docstring).

    `lm` is a `prunelab.models.LoadedModel` (duck-typed: data/ sits below models/): its
    `tokenizer`, `family`, `config` and `context_length`, which clamps `seqlen`.
    """
    tok = lm.tokenizer
    if tok is None:
        raise DataError(f"{lm.name} has no tokenizer: save one next to the weights to calibrate on text")
    notes: list[str] = []
    limit = lm.context_length  # LoadedModel knows its position limit (None: relative positions, no limit)
    if limit is not None and seqlen > limit:
        notes.append(f"calibration seqlen {seqlen} exceeds the model context {limit}: using {limit}")
        seqlen = limit
    cls_id, sep_id = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
    wrap = lm.family == "encoder" and cls_id is not None and sep_id is not None
    body = seqlen - 2 if wrap else seqlen
    if body < 1:
        raise DataError(f"--seqlen {seqlen} is too short for this model: use at least 4")
    stream = tokenize_stream(tok, source)
    if stream.numel() < body:
        raise DataError(
            f"calibration text '{source.name}' has only {stream.numel()} tokens but one window needs {body}: "
            "pass more text with --calib or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, stream.numel() - body + 1, (nsamples,), generator=gen).tolist()
    samples: list[Sample] = []
    digest = hashlib.sha256()
    start_id = _decoder_start(lm.config, tok) if lm.family == "encoder-decoder" else None
    for s in starts:
        ids = stream[s : s + body]
        if wrap:
            ids = torch.cat([torch.tensor([cls_id]), ids, torch.tensor([sep_id])])
        ids = ids.unsqueeze(0)
        digest.update(ids.numpy().tobytes())
        sample: Sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if start_id is not None:
            sample["decoder_input_ids"] = torch.cat([torch.tensor([[start_id]]), ids[:, :-1]], dim=1)
        samples.append(sample)
    info = {
        "source": source.name,
        "kind": source.kind,
        "source_sha256": source.sha256,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "tokens": nsamples * seqlen,
        "stream_tokens": int(stream.numel()),
        "seed": seed,
        "samples_sha256": digest.hexdigest(),
    }
    return CalibrationSet(samples, info, notes)


def calibration_set(lm: Any, config: Any) -> CalibrationSet:
    """Calibration samples for `lm` as asked by a `PruneConfig` (calib, calib_column, nsamples, seqlen, seed)."""
    if getattr(lm, "processor", None) is not None:
        from prunelab.data.speech import speech_calibration_inputs

        inputs = speech_calibration_inputs(lm, config.nsamples, config.seed)
        if not inputs:
            raise DataError("speech calibration produced no samples")
        digest = hashlib.sha256()
        for s in inputs:
            for k in sorted(s):
                digest.update(s[k].detach().cpu().numpy().tobytes())
        info = {"source": "synthesized speech (prunelab.data.speech)", "kind": "speech", "nsamples": len(inputs),
                "seed": config.seed, "samples_sha256": digest.hexdigest()}
        notes = ["--calib is ignored for speech models: calibration uses synthesized speech"] if config.calib else []
        return CalibrationSet(list(inputs), info, notes)
    source = read_text_source(config.calib, config.calib_column)
    return text_calibration(lm, source, config.nsamples, config.seqlen, config.seed)


def calibration_inputs(lm: Any, config: Any) -> list[Sample]:
    """Model-ready forward kwargs (batch 1 each) for calibrating `lm` under `config`."""
    return calibration_set(lm, config).inputs
