"""Calibration sources and sampling: formats, determinism, family-specific inputs, clear errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from prunelab.data.calibration import calibration_inputs, calibration_set
from prunelab.data.text import mrpc_sentences, read_hf_dataset, read_text_source
from prunelab.errors import DataError
from prunelab.pruning import PruneConfig
from prunelab.storage import load

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def _cfg(**kw):
    kw.setdefault("method", "wanda")
    kw.setdefault("nsamples", 5)
    kw.setdefault("seqlen", 16)
    return PruneConfig(**kw)


def test_default_is_mrpc_both_columns(data_dir):
    src = mrpc_sentences()
    with open(data_dir / "glue-mrpc" / "train.tsv", encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0][3:] == ["#1 String", "#2 String"] and len(rows) == 3669
    expected = list(dict.fromkeys(s.strip() for r in rows[1:] for s in (r[3], r[4])))
    assert src.texts == expected
    assert src.texts[0].startswith("Amrozi accused his brother")
    assert '"the witness"' in src.texts[0]  # raw quotes survive QUOTE_NONE
    assert src.sha256 == "122becc469405bc16f9defcb8715d2a4b7ce600e9d9381e6dc42bfdd1494c51d"


def test_deterministic_windows_by_seed(tiny_dirs):
    lm = load(str(tiny_dirs["llama"]))
    a = calibration_set(lm, _cfg(seed=0))
    b = calibration_set(lm, _cfg(seed=0))
    c = calibration_set(lm, _cfg(seed=1))
    assert a.info["samples_sha256"] == b.info["samples_sha256"] != c.info["samples_sha256"]
    assert len(a.inputs) == 5 and all(s["input_ids"].shape == (1, 16) for s in a.inputs)
    assert a.info["source"].startswith("glue-mrpc/train.tsv") and a.info["tokens"] == 80
    # every window is a contiguous slice of the tokenized text
    text = "\n".join(mrpc_sentences().texts)
    decoded = lm.tokenizer.decode(a.inputs[0]["input_ids"][0])
    assert decoded in text + "\n"


def test_model_specific_inputs(tiny_dirs):
    bert = load(str(tiny_dirs["bert"]))
    bart = load(str(tiny_dirs["bart"]))
    t5 = load(str(tiny_dirs["t5"]))
    # encoder: wrapped when the tokenizer has CLS/SEP (the byte tokenizer has none: plain windows)
    s = calibration_inputs(bert, _cfg())[0]
    assert set(s) == {"input_ids", "attention_mask"} and s["input_ids"].shape == (1, 16)
    for lm, start in ((bart, bart.config.decoder_start_token_id), (t5, t5.config.decoder_start_token_id)):
        s = calibration_inputs(lm, _cfg())[0]
        assert torch.equal(s["decoder_input_ids"][0, 1:], s["input_ids"][0, :-1])  # shifted target text
        assert int(s["decoder_input_ids"][0, 0]) == start
    # seqlen above the model context is capped, with a note
    cs = calibration_set(bart, _cfg(seqlen=4096, nsamples=1))
    assert cs.inputs[0]["input_ids"].shape[1] == 128 and "exceeds the model context" in cs.warnings[0]


def test_file_formats(tmp_path, tiny_dirs):
    lm = load(str(tiny_dirs["gpt2"]))
    txt = tmp_path / "c.txt"
    txt.write_text(TEXT, encoding="utf-8")
    tsv = tmp_path / "c.tsv"
    tsv.write_text('id\ttext\n1\tHe said "hi" to me.\n2\t' + TEXT + "\n", encoding="utf-8")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": TEXT, "n": i}) for i in range(3)), encoding="utf-8")
    assert read_text_source(str(txt)).kind == "file"
    src = read_text_source(str(tsv), "text")
    assert src.texts[0] == 'He said "hi" to me.'
    assert read_text_source(str(jsonl), "body").texts == [TEXT.strip()] * 3
    for path, col in ((txt, None), (tsv, "text"), (jsonl, "body")):
        cs = calibration_set(lm, _cfg(calib=str(path), calib_column=col))
        assert len(cs.inputs) == 5 and len(cs.info["source_sha256"]) == 64
    with pytest.raises(DataError, match="--calib-column"):
        read_text_source(str(tsv))
    with pytest.raises(DataError, match="no column 'nope'"):
        read_text_source(str(tsv), "nope")
    with pytest.raises(DataError, match="no field 'text'"):
        read_text_source(str(jsonl))


def test_empty_short_missing(tmp_path, tiny_dirs):
    lm = load(str(tiny_dirs["gpt2"]))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")
    with pytest.raises(DataError, match="has no text"):
        calibration_set(lm, _cfg(calib=str(empty)))
    with pytest.raises(DataError, match="only 5 tokens"):
        calibration_set(lm, _cfg(calib=str(short)))
    with pytest.raises(DataError, match="not found"):
        calibration_set(lm, _cfg(calib=str(tmp_path / "missing.txt")))


def test_hf_dataset_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as exc:
        read_hf_dataset("prunelab-test/definitely-not-a-dataset")
    msg = str(exc.value)
    assert "\n" not in msg and "offline" in msg and "--calib" in msg
    # bare names that are not paths are treated as dataset names
    with pytest.raises(DataError, match="Hugging Face dataset"):
        read_text_source("prunelab-test/definitely-not-a-dataset")


def test_calibration_feeds_pruning_report(tiny_dirs, tmp_path):
    from prunelab.pruning import prune

    txt = tmp_path / "c.txt"
    txt.write_text(TEXT, encoding="utf-8")
    lm = load(str(tiny_dirs["t5"]))
    result = prune(lm, _cfg(method="sparsegpt", calib=str(txt), sparsity=0.3))
    info = result.calibration
    assert info["source"] == str(txt) and info["nsamples"] == 5 and info["seqlen"] == 16
    assert info["source_sha256"] and info["samples_sha256"]
