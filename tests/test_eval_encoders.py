"""Encoder benchmarks: pseudo-perplexity (and its not-applicable case) and embedding fidelity."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from prunelab.errors import ConfigError
from prunelab.evaluation import EvalOptions, evaluate
from prunelab.evaluation.embed import fidelity
from prunelab.storage import load

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


def test_pppl_matches_one_mask_at_a_time_loop(tiny_dirs):
    lm = load(str(tiny_dirs["bert"]))
    result = evaluate(lm, "pppl", EvalOptions(max_tokens=150, seqlen=48))
    assert result.status == "ok" and result.n_tokens == 150
    assert result.details["sliced_head"] is True
    # Independent: same rows, one masked copy per forward, full logits.
    from prunelab.data.wikitext import load_wikitext

    tok = lm.tokenizer
    rows = [r.strip() for r in load_wikitext().rows if r.strip() and not r.strip().startswith("=")]
    special = set(tok.all_special_ids)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = tok(row, truncation=True, max_length=48)["input_ids"]
            for i, t in enumerate(ids):
                if t in special or count >= 150:
                    continue
                masked = list(ids)
                masked[i] = tok.mask_token_id
                logits = lm.model(input_ids=torch.tensor([masked])).logits[0, i]
                total -= float(torch.log_softmax(logits, -1)[t])
                count += 1
            if count >= 150:
                break
    assert result.value == pytest.approx(math.exp(total / count), rel=1e-4)


def test_pppl_not_applicable_without_mlm_head():
    result = evaluate(load("zoo:minilm"), "pppl")
    assert result.status == "not_applicable" and result.value is None
    assert result.note == "not applicable: no MLM head"
    assert result.to_dict()["metrics"] == {"pppl": None}


def test_embed_fidelity_metrics():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 16, generator=gen).numpy()
    assert fidelity(a, a)["mean_cosine"] == pytest.approx(1.0)
    assert fidelity(a, 3 * a)["spearman_pairwise"] == pytest.approx(1.0)
    noisy = fidelity(a, a + 0.8 * torch.randn(30, 16, generator=gen).numpy())
    assert 0.0 < noisy["mean_cosine"] < 0.95 and 0.0 < noisy["spearman_pairwise"] < 0.95


def test_embed_reference_from_prune_report(tiny_dirs, tmp_path):
    pruned_dir = tmp_path / "pruned"
    shutil.copytree(tiny_dirs["bert"], pruned_dir)
    lm = load(str(pruned_dir))
    with torch.no_grad():
        for m in lm.prunable:
            w = m.weight(lm.model)
            w[w.abs() < w.abs().median()] = 0.0
    lm.model.save_pretrained(pruned_dir, safe_serialization=True)
    (pruned_dir / "prune_report.json").write_text(json.dumps({"model": str(tiny_dirs["bert"])}))
    result = evaluate(load(str(pruned_dir)), "embed", EvalOptions(max_examples=40))
    assert result.details["reference_from"] == "prune_report.json"
    assert result.details["reference"] == str(tiny_dirs["bert"])
    assert result.details["model_zero_fraction"] >= 0.49
    # A random tiny BERT is dominated by its (unpruned) embeddings + residuals, so the drop is small but real.
    assert result.value < 1 - 1e-5 and result.metrics["spearman_pairwise"] < 1 - 1e-5
    dense = evaluate(load(str(tiny_dirs["bert"])), "embed", EvalOptions(max_examples=40))
    assert dense.value == pytest.approx(1.0) and dense.details["reference_from"] == "source checkpoint"


def test_embed_rejects_non_encoder_reference(tiny_dirs):
    lm = load(str(tiny_dirs["bert"]))
    with pytest.raises(ConfigError, match="pass an encoder"):
        evaluate(lm, "embed", EvalOptions(max_examples=8, reference=str(tiny_dirs["gpt2"])))
