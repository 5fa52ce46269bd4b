"""`asr`: transcription quality of a speech encoder-decoder (Whisper) on synthesised English clips.

Two numbers, because they fail differently under pruning:

* **WER** (primary, lower is better) of greedy transcription, corpus-level with jiwer over
  all clips. Reference and hypothesis are normalised the same way before scoring
  (`prunelab.data.speech.normalize_transcript`): lower-case, hyphens/slashes → spaces, every
  character other than a-z, 0-9, apostrophe and space removed, whitespace collapsed. So
  casing and punctuation never count as errors; words do. Decoding stops at `<|endoftext|>`
  or after `MAX_NEW_TOKENS`; a pruned decoder that loops produces insertions, so WER can
  exceed 1 (`details["word_errors"]` splits it into substitutions/deletions/insertions).
* **Transcript perplexity**: teacher-forced, exp(mean NLL) over the transcript tokens only.
  The decoder reads `<|startoftranscript|><|notimestamps|> t1 … tn`; the prefix is masked
  (-100) so only t1 … tn are scored (end-of-text is not scored). Token-weighted over clips.
  It moves smoothly where WER jumps, and it tells a model that still hears the audio
  (low) from one that only models English (high; compare with mismatched transcripts).

Clips are espeak-ng speech of fixed WikiText-2 sentences (see `prunelab.data.speech`);
`data_sha256` is the checksum of that sentence source file.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

import torch

from prunelab.data import speech
from prunelab.evaluation.common import ratio_interval_data
from prunelab.evaluation.types import EvalOptions, EvalResult, file_sha256

DEFAULT_CLIPS = 16
MAX_NEW_TOKENS = 96


def _not_applicable(lm: Any, note: str, options: EvalOptions) -> EvalResult:
    return EvalResult(
        model=lm.name, family=lm.family, bench="asr", metrics={"wer": None, "transcript_ppl": None},
        primary="wer", higher_is_better=False, status="not_applicable", note=note, seed=options.seed,
    )


@torch.no_grad()
def encode(lm: Any, features: torch.Tensor) -> torch.Tensor:
    """Encoder hidden states for a batch of log-mel features."""
    return lm.model.model.encoder(features.to(lm.model.dtype)).last_hidden_state


@torch.no_grad()
def greedy_decode(lm: Any, encoder_states: torch.Tensor, *, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy English transcription without timestamps from encoder states, one string per row.

    Decoding is written out (prefix, argmax with Whisper's suppressed tokens, stop at
    `<|endoftext|>`) instead of calling `generate`, so the metric does not depend on the
    generation defaults of a transformers version; a test checks it against `generate`.
    """
    model, tok = lm.model, lm.tokenizer
    prefix = speech.prefix_ids(tok)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    no_timestamps = tok.convert_tokens_to_ids("<|notimestamps|>")
    gen = model.generation_config
    suppress = torch.tensor(sorted(set(getattr(gen, "suppress_tokens", None) or [])), dtype=torch.long)
    begin_suppress = torch.tensor(sorted(set(getattr(gen, "begin_suppress_tokens", None) or [])), dtype=torch.long)
    batch = encoder_states.shape[0]
    ids = torch.tensor([prefix] * batch, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    decoder = model.model.decoder
    # transformers ≥ 5.2x calls the KV cache `cache`; older versions `past_key_values`.
    cache_kw = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    cache = None
    step_input = ids
    for step in range(max_new_tokens):
        out = decoder(input_ids=step_input, encoder_hidden_states=encoder_states, use_cache=True, **{cache_kw: cache})
        cache = out[cache_kw] if cache_kw in out else out[1]
        logits = model.proj_out(out.last_hidden_state[:, -1]).float()
        if suppress.numel():
            logits[:, suppress] = -math.inf
        if step == 0 and begin_suppress.numel():
            logits[:, begin_suppress] = -math.inf
        logits[:, no_timestamps + 1 :] = -math.inf  # timestamp tokens follow <|notimestamps|>
        nxt = torch.where(done, torch.full((batch,), eot, dtype=torch.long), logits.argmax(-1))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == eot
        if bool(done.all()):
            break
        step_input = nxt[:, None]
    texts = []
    for row in ids[:, len(prefix) :].tolist():
        if eot in row:
            row = row[: row.index(eot)]
        texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts


@torch.no_grad()
def teacher_forced_nll(lm: Any, encoder_states: torch.Tensor, texts: list[str]) -> tuple[float, int]:
    """Summed NLL (nats) and token count of `texts` given encoder states, transcript tokens only."""
    from transformers.modeling_outputs import BaseModelOutput

    model, tok = lm.model, lm.tokenizer
    prefix = speech.prefix_ids(tok)
    seqs = [prefix + speech.transcript_ids(tok, t) for t in texts]
    width = max(len(s) for s in seqs) - 1
    inp = torch.full((len(seqs), width), tok.pad_token_id or 0, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        inp[i, : len(s) - 1] = torch.tensor(s[:-1])
        tgt = torch.tensor(s[1:])
        tgt[: len(prefix) - 1] = -100  # the prefix is given, not predicted
        labels[i, : len(s) - 1] = tgt
    # The decoder is causal, so right padding never affects the scored positions.
    logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states), decoder_input_ids=inp).logits
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(nll), int((labels != -100).sum())


def transcribe(lm: Any, features: torch.Tensor, *, batch_size: int = 8) -> list[str]:
    """Greedy transcripts for a batch of log-mel features."""
    out: list[str] = []
    for start in range(0, features.shape[0], batch_size):
        out += greedy_decode(lm, encode(lm, features[start : start + batch_size]))
    return out


def transcript_perplexity(lm: Any, features: torch.Tensor, texts: list[str], *, batch_size: int = 8) -> float:
    """Teacher-forced perplexity of `texts` (row i scored against audio row i), transcript tokens only."""
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        states = encode(lm, features[start : start + batch_size])
        nll, n = teacher_forced_nll(lm, states, texts[start : start + batch_size])
        total, count = total + nll, count + n
    return math.exp(total / max(1, count))


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER with jiwer after `normalize_transcript` on both sides."""
    return float(word_errors(references, hypotheses)["wer"])


def word_errors(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus WER and its parts (substitutions, deletions, insertions, hits) after normalisation.

    Insertions show runaway decoding (a pruned decoder repeating itself until the token cap),
    which can push WER above 1 while teacher-forced perplexity stays low.
    """
    import jiwer

    refs = [speech.normalize_transcript(r) for r in references]
    hyps = [speech.normalize_transcript(h) for h in hypotheses]
    out = jiwer.process_words(refs, hyps)
    return {"wer": float(out.wer), "substitutions": out.substitutions, "deletions": out.deletions,
            "insertions": out.insertions, "hits": out.hits, "reference_words": sum(len(r.split()) for r in refs)}


def per_clip_errors(references: list[str], hypotheses: list[str]) -> list[tuple[float, int]]:
    """(word errors, reference words) per clip: corpus WER is their ratio of sums, the bootstrap's unit."""
    out = []
    for ref, hyp in zip(references, hypotheses, strict=True):
        e = word_errors([ref], [hyp])
        out.append((float(e["substitutions"] + e["deletions"] + e["insertions"]),
                    int(e["hits"] + e["substitutions"] + e["deletions"])))
    return out


def evaluate_asr(lm: Any, options: EvalOptions | None = None) -> EvalResult:
    """Greedy-transcription WER and teacher-forced transcript perplexity on synthesised speech clips."""
    options = options or EvalOptions()
    if lm.family != "encoder-decoder" or lm.processor is None or getattr(lm.config, "model_type", "") != "whisper":
        return _not_applicable(lm, "not applicable: asr needs a Whisper-like speech encoder-decoder", options)
    t0 = time.perf_counter()
    n = options.max_examples or DEFAULT_CLIPS
    clips = speech.eval_clips(n)
    texts = [c.text for c in clips]
    features = speech.input_features(lm.processor, clips)
    bs = max(1, options.batch_size)
    hyps: list[str] = []
    nll, n_tokens = 0.0, 0
    for start in range(0, len(clips), bs):  # one encoder pass serves both metrics
        states = encode(lm, features[start : start + bs])
        hyps += greedy_decode(lm, states)
        b_nll, b_n = teacher_forced_nll(lm, states, texts[start : start + bs])
        nll, n_tokens = nll + b_nll, n_tokens + b_n
    errors = word_errors(texts, hyps)
    wer = errors["wer"]
    ppl = math.exp(nll / max(1, n_tokens))
    src = speech.sentence_source_path()
    return EvalResult(
        model=lm.name,
        family=lm.family,
        bench="asr",
        metrics={"wer": wer, "transcript_ppl": ppl},
        primary="wer",
        higher_is_better=False,
        note=(
            f"{len(clips)} espeak-ng clips ({speech.VOICE}, {speech.RATE_WPM} wpm, 16 kHz) of WikiText-2 test "
            "sentences; WER: greedy, corpus-level, lower-cased, punctuation removed; transcript_ppl: "
            "teacher-forced over transcript tokens (prefix masked)"
        ),
        n_tokens=n_tokens,
        n_examples=len(clips),
        seed=options.seed,
        wall_time_s=time.perf_counter() - t0,
        data_path=str(src),
        data_sha256=file_sha256(src),
        details={
            "audio_seconds": round(sum(c.seconds for c in clips), 2),
            "word_errors": errors,
            "interval_data": ratio_interval_data("clips", per_clip_errors(texts, hyps), None),
            "max_new_tokens": MAX_NEW_TOKENS,
            "examples": [{"reference": r, "hypothesis": h} for r, h in list(zip(texts, hyps, strict=True))[:4]],
            "speech_version": speech.SPEECH_VERSION,
            # The sentence filter also reads these files (which words count as common English).
            "lexicon_sha256": {f"{p.parent.name}/{p.name}": file_sha256(p) for p in speech.lexicon_paths()},
        },
    )
