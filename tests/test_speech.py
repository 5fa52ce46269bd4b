"""Synthetic speech data: sentence selection, normalisation, resampling, espeak-ng synthesis and cache."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from prunelab.data import speech
from prunelab.errors import DataError

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def test_sentence_sets_fixed_clean_and_disjoint(data_dir):
    ev = speech.eval_sentences()
    assert len(ev) == speech.EVAL_POOL and len(set(ev)) == len(ev)
    assert speech.eval_sentences(5) == ev[:5]
    speech._candidates.cache_clear()
    assert speech.eval_sentences() == ev  # deterministic, not dependent on process state
    cal = speech.calibration_sentences(40, seed=0)
    assert not set(cal) & set(ev)
    assert speech.calibration_sentences(40, seed=0) == cal
    assert speech.calibration_sentences(40, seed=1) != cal
    for s in ev + cal:
        words = re.findall(r"[A-Za-z']+", s)
        assert speech.MIN_WORDS <= len(words) <= speech.MAX_WORDS, s
        assert s.endswith(".") and "@" not in s and not re.search(r"\d", s), s
        assert " ," not in s and " ." not in s, s  # WikiText tokenisation undone
    # Asking for more calibration clips than the pool holds still works (sampling with replacement).
    many = speech.calibration_sentences(500, seed=0)
    assert len(many) == 500 and not set(many) & set(ev)


def test_normalize_transcript():
    got = speech.normalize_transcript("  Hello, World! It's a well-known fact.")
    assert got == "hello world it's a well known fact"
    assert speech.normalize_transcript("A/B   test") == "a b test"


def test_resample_keeps_frequency_and_duration():
    rate_in = 22_050
    t = np.arange(rate_in) / rate_in  # 1 s
    tone = np.sin(2 * np.pi * 440.0 * t).astype(np.float32)
    out = speech.resample(tone, rate_in)
    assert out.dtype == np.float32 and abs(len(out) - speech.SAMPLE_RATE) <= 1
    spectrum = np.abs(np.fft.rfft(out))
    peak_hz = np.argmax(spectrum) * speech.SAMPLE_RATE / len(out)
    assert abs(peak_hz - 440.0) < 2.0
    # A tone above the new Nyquist frequency (8 kHz) is filtered out, not aliased.
    high = np.sin(2 * np.pi * 10_000.0 * t).astype(np.float32)
    assert np.abs(speech.resample(high, rate_in)[200:-200]).max() < 0.05


@needs_espeak
def test_synthesize_caches_audio(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path))
    text = "The battle extended well into the night."
    audio = speech.synthesize(text)
    assert audio.dtype == np.float32 and np.isfinite(audio).all()
    assert 1.0 < len(audio) / speech.SAMPLE_RATE < 6.0
    assert 0.05 < np.abs(audio).max() <= 1.0
    files = list((tmp_path / "speech").glob("*.npz"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("espeak-ng must not run for a cached clip")

    monkeypatch.setattr(subprocess, "run", boom)
    assert np.array_equal(speech.synthesize(text), audio)
    # Another voice or text is another cache entry (and would need espeak again).
    with pytest.raises(AssertionError):
        speech.synthesize(text, voice="en-gb")


def test_missing_espeak_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DataError, match=r"install espeak-ng \(apt-get install espeak-ng\)"):
        speech.synthesize("Nothing here is cached yet.")
    assert not list(tmp_path.glob("speech/*.npz"))


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_DATA", str(tmp_path))
    speech._candidates.cache_clear()
    try:
        with pytest.raises(DataError, match="PRUNELAB_DATA"):
            speech.eval_sentences()
    finally:
        speech._candidates.cache_clear()
