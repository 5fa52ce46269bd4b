"""Synthetic English speech for encoder-decoder speech models (Whisper): clips, transcripts, calibration.

There is no offline speech corpus, so clips are synthesised with espeak-ng from sentences of
the WikiText-2 test file in the shared data folder. The sentences are chosen to be speakable
and transcribable, so that WER measures the model and not the text:

* WikiText's tokenisation is undone (" , " → ", ", " 's" → "'s"); sentences with digits,
  brackets, quotes, "@" markup or other symbols are dropped;
* 6 to 20 words, a single final period, no one-letter words except "a" and "I";
* every word (case-insensitive) occurs at least `MIN_WORD_COUNT` times in a general-English
  lexicon built from other shared files (SST-2 train and MRPC train), which keeps common
  words and common names ("London") and drops rare ones ("temnospondyls", "Boulter") that
  neither espeak nor Whisper spell reliably; the lexicon never uses the model.

The candidates are shuffled with a fixed seed and split once: the first `EVAL_POOL` are the
evaluation sentences, the rest the calibration pool, so calibration never sees an evaluation
sentence. Audio is synthesised at 22.05 kHz, resampled to 16 kHz (polyphase filter) and cached
as .npz under `$PRUNELAB_CACHE/speech`, keyed by text + voice + rate + `SPEECH_VERSION`.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import shutil
import subprocess
import tempfile
import wave
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from prunelab.errors import DataError
from prunelab.io import atomic_file
from prunelab.paths import cache_dir, shared_data_dir

SPEECH_VERSION = 1
SAMPLE_RATE = 16_000
VOICE = "en-us"
RATE_WPM = 150
SELECTION_SEED = 1234  # fixed: the sentence sets must not change between runs
EVAL_POOL = 48
MIN_WORDS, MAX_WORDS = 6, 20
MIN_WORD_COUNT = 3
CALIB_DECODER_TOKENS = 12  # transcript tokens per calibration sample (91 of 157 pool sentences have ≥ 12)
TRANSCRIPT_PREFIX = ("<|startoftranscript|>", "<|notimestamps|>")

_ALLOWED = re.compile(r"^[A-Za-z ,.']+$")


@dataclass(frozen=True)
class SpeechClip:
    """One synthesised utterance: its text (the reference transcript) and 16 kHz mono audio."""

    text: str
    audio: np.ndarray  # float32, [-1, 1], SAMPLE_RATE Hz

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def sentence_source_path() -> Path:
    """The file the sentences come from (its sha256 is the benchmark's data checksum)."""
    return shared_data_dir() / "wikitext-2-raw" / "wiki.test.raw"


def _detokenize(s: str) -> str:
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = re.sub(r" ([,.;:!?])", r"\1", s)
    s = re.sub(r" ('s|'re|'ve|'d|'ll|n't|')\b", r"\1", s)
    return re.sub(r"\s+", " ", s).strip()


def lexicon_paths() -> list[Path]:
    """General-English text used only to decide which words are common (see the module docstring)."""
    d = shared_data_dir()
    return [d / "glue-sst2" / "train.tsv", d / "glue-mrpc" / "train.tsv"]


@lru_cache(maxsize=4)
def _candidates(path_str: str) -> tuple[str, ...]:
    path = Path(path_str)
    for p in [path, *lexicon_paths()]:
        if not p.is_file():
            raise DataError(f"speech data not found: {p}; put ../shared/data beside the repo or set $PRUNELAB_DATA")
    text = path.read_text(encoding="utf-8")
    lexicon = "\n".join(p.read_text(encoding="utf-8-sig") for p in lexicon_paths()).lower()
    counts = Counter(re.findall(r"[a-z']+", lexicon))
    seen: set[str] = set()
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for raw in re.split(r"(?<= \.) ", line):  # WikiText sentences end with " ."
            sent = _detokenize(raw)
            if not sent.endswith(".") or "." in sent[:-1] or not _ALLOWED.match(sent) or "'" in sent.replace("'s", ""):
                continue
            words = re.findall(r"[A-Za-z']+", sent)
            if not MIN_WORDS <= len(words) <= MAX_WORDS or any(len(w) == 1 and w not in "aAI" for w in words):
                continue
            if any(counts[w.lower()] < MIN_WORD_COUNT for w in words):
                continue
            if sent.lower() in seen:
                continue
            seen.add(sent.lower())
            out.append(sent)
    if len(out) < EVAL_POOL + 16:
        raise DataError(f"only {len(out)} usable sentences in {path}: is it the WikiText-2 test file?")
    random.Random(SELECTION_SEED).shuffle(out)
    return tuple(out)


def eval_sentences(n: int | None = None) -> list[str]:
    """The fixed evaluation sentences (the first `n` of `EVAL_POOL`)."""
    pool = list(_candidates(str(sentence_source_path()))[:EVAL_POOL])
    return pool if n is None else pool[: max(0, min(n, len(pool)))]


def _calibration_pool() -> list[str]:
    return list(_candidates(str(sentence_source_path()))[EVAL_POOL:])


def calibration_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` calibration sentences drawn with `seed` from the pool disjoint from the evaluation set."""
    pool = _calibration_pool()
    rng = random.Random(seed)
    if n <= len(pool):
        return rng.sample(pool, n)
    return [rng.choice(pool) for _ in range(n)]


def normalize_transcript(text: str) -> str:
    """Text normalisation for WER: lower-case, hyphens and slashes become spaces, every character
    other than a-z, 0-9, apostrophe and space is removed, whitespace collapsed."""
    text = text.lower().replace("-", " ").replace("/", " ")
    text = re.sub(r"[^a-z0-9' ]+", "", text)
    return re.sub(r"\s+", " ", text).strip()


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError("speech synthesis needs espeak-ng: install espeak-ng (apt-get install espeak-ng)")
    return exe


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        if w.getsampwidth() != 2:
            raise DataError(f"espeak-ng wrote {8 * w.getsampwidth()}-bit audio; expected 16-bit PCM")
        rate, channels = w.getframerate(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1)
    return pcm, rate


def resample(audio: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling with an anti-aliasing filter (scipy), as float32."""
    if rate_in == rate_out:
        return audio.astype(np.float32)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate_in, rate_out)
    return resample_poly(audio, rate_out // g, rate_in // g).astype(np.float32)


def synthesize(text: str, *, voice: str = VOICE, rate_wpm: int = RATE_WPM, cache: bool = True) -> np.ndarray:
    """16 kHz float32 audio of `text` spoken by espeak-ng, cached under `$PRUNELAB_CACHE/speech`."""
    key = hashlib.sha256(f"v{SPEECH_VERSION}|{voice}|{rate_wpm}|{text}".encode()).hexdigest()[:24]
    path = cache_dir() / "speech" / f"{key}.npz"
    if cache and path.is_file():
        try:
            with np.load(path) as npz:
                if str(npz["text"]) == text:
                    return npz["audio"].astype(np.float32)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is synthesised again
    exe = _espeak()
    with tempfile.TemporaryDirectory(prefix="prunelab-tts-") as tmp:
        wav = Path(tmp) / "clip.wav"
        proc = subprocess.run(
            [exe, "-v", voice, "-s", str(rate_wpm), "-w", str(wav), "--", text],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if proc.returncode != 0 or not wav.is_file():
            raise DataError(f"espeak-ng failed (exit {proc.returncode}): {proc.stderr.strip()[:200]}")
        pcm, rate = _read_wav(wav.read_bytes())
    audio = resample(pcm, rate)
    if audio.size == 0 or not np.isfinite(audio).all():
        raise DataError(f"espeak-ng produced no usable audio for {text[:40]!r}")
    if cache:
        with atomic_file(path, "wb") as fh:
            np.savez(fh, audio=audio, text=np.array(text), rate=np.array(SAMPLE_RATE))
    return audio


def synthesize_clips(texts: list[str]) -> list[SpeechClip]:
    return [SpeechClip(t, synthesize(t)) for t in texts]


def eval_clips(n: int | None = None) -> list[SpeechClip]:
    """The benchmark clips: the first `n` evaluation sentences, spoken."""
    return synthesize_clips(eval_sentences(n))


def input_features(processor: Any, clips: list[SpeechClip]) -> Any:
    """Log-mel features (batch, n_mels, 3000) for clips, padded to Whisper's 30 s window."""
    feats = processor([c.audio for c in clips], sampling_rate=SAMPLE_RATE, return_tensors="pt")
    return feats.input_features


def prefix_ids(tokenizer: Any) -> list[int]:
    """`<|startoftranscript|><|notimestamps|>`: the decoder prompt for English transcription."""
    ids = tokenizer.convert_tokens_to_ids(list(TRANSCRIPT_PREFIX))
    unk = getattr(tokenizer, "unk_token_id", None)
    if any(i is None or (unk is not None and i == unk) for i in ids):
        raise DataError("the tokenizer lacks Whisper's <|startoftranscript|>/<|notimestamps|> tokens")
    return list(ids)


def transcript_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a transcript as Whisper writes it (leading space, no special tokens)."""
    return list(tokenizer(" " + text.strip(), add_special_tokens=False).input_ids)


def speech_calibration_inputs(
    lm: Any, nsamples: int, seed: int, *, decoder_tokens: int = CALIB_DECODER_TOKENS
) -> list[dict[str, Any]]:
    """Calibration batches for a speech encoder-decoder: audio to the encoder, its transcript to the decoder.

    Each item is model-ready forward kwargs with batch 1: `input_features` (1, n_mels, 3000)
    and `decoder_input_ids` = `<|startoftranscript|><|notimestamps|>` + the first
    `decoder_tokens` transcript tokens. Every item has the same decoder length, so the
    sequential pruning runner can stack them into one batch without padding (padding tokens
    would enter the Wanda/SparseGPT statistics); the decoder is causal, so a transcript prefix
    is exactly what it sees mid-transcription. Only sentences with at least `decoder_tokens`
    tokens are drawn, from the calibration pool, disjoint from the `asr` evaluation sentences.
    """
    import torch

    if lm.processor is None or lm.tokenizer is None:
        raise DataError(f"{lm.name} has no feature extractor/tokenizer: speech calibration needs both")
    if nsamples < 1 or decoder_tokens < 1:
        raise DataError("speech calibration needs nsamples ≥ 1 and decoder_tokens ≥ 1")
    pool = [t for t in _calibration_pool() if len(transcript_ids(lm.tokenizer, t)) >= decoder_tokens]
    if not pool:
        raise DataError(f"no calibration sentence has {decoder_tokens} tokens: lower decoder_tokens")
    rng = random.Random(seed)
    texts = rng.sample(pool, nsamples) if nsamples <= len(pool) else [rng.choice(pool) for _ in range(nsamples)]
    prefix = prefix_ids(lm.tokenizer)
    out: list[dict[str, Any]] = []
    for clip in synthesize_clips(texts):
        feats = input_features(lm.processor, [clip])
        ids = prefix + transcript_ids(lm.tokenizer, clip.text)[:decoder_tokens]
        out.append({"input_features": feats, "decoder_input_ids": torch.tensor([ids], dtype=torch.long)})
    return out
