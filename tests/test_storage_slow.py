"""Sparse checkpoint of a real model (zoo:smollm2, tied embeddings, fp32): exact round trip and size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunelab.storage import is_sparse_checkpoint, load, save, size_report

pytestmark = pytest.mark.slow


def test_smollm2_round_trip_and_size(tmp_path: Path) -> None:
    lm = load("zoo:smollm2")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, m in enumerate(lm.prunable):
            w = m.weight(lm.model)
            if i % 2:  # half the matrices 2:4 (2 of every 4 inputs kept), half 95 % unstructured
                scores = torch.rand(w.shape[0], w.shape[1] // 4, 4, generator=gen)
                keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.argsort(-1)[..., :2], True)
                w.masked_fill_(~keep.reshape(w.shape), 0.0)
            else:
                w.masked_fill_(torch.rand(w.shape, generator=gen) < 0.95, 0.0)
    out = save(lm, tmp_path / "ck", format="sparse")
    assert is_sparse_checkpoint(out)
    rep = size_report(out)
    pruned = rep["totals"]["pruned"]
    assert pruned["count"] == len(lm.prunable)
    assert pruned["encodings"].get("nm(2:4)") == len(lm.prunable) // 2
    assert pruned["stored_vs_bitmask_bound"] <= 1.02
    loaded = load(out).model
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    before, after = lm.model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    ids = lm.tokenizer("Sparse checkpoints should be small and exact.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, loaded(input_ids=ids).logits)
