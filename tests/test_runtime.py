"""Sparse CPU runtime: SELL format round trip, kernel equality with dense, module swap and undo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from prunelab.models import tiny_model, wrap_model
from prunelab.runtime import (
    BACKENDS,
    SellMatrix,
    SparseLinear,
    clear_decisions,
    restore_dense,
    sparse_modules,
    sparsify_for_inference,
)
from prunelab.storage import load


def _sparse_weight(out_f: int, in_f: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[torch.rand(out_f, in_f, generator=g) < sparsity] = 0.0
    return w


@pytest.mark.parametrize("shape, sparsity", [((37, 70), 0.9), ((64, 64), 0.0), ((33, 17), 1.0), ((128, 96), 0.5)])
def test_sell_round_trip_is_exact(shape, sparsity):
    w = _sparse_weight(*shape, sparsity)
    w[3] = 0.0  # an empty row
    m = SellMatrix.from_dense(w)
    assert m.nnz == int((w != 0).sum())
    assert m.indices.dtype == np.uint16
    assert torch.equal(m.to_dense(), w)
    assert m.padding < 1.0 or m.nnz == 0


def test_wide_matrix_uses_int32_indices():
    w = torch.zeros(3, 70_000)
    w[0, 69_999] = 1.5
    w[2, 5] = -2.0
    m = SellMatrix.from_dense(w)
    assert m.indices.dtype == np.int32
    x = np.arange(70_000, dtype=np.float32)
    np.testing.assert_array_equal(m.gemv(x), np.array([1.5 * 69_999, 0.0, -10.0], dtype=np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_dense_masked_matmul(backend, bias):
    torch.manual_seed(1)
    w = _sparse_weight(45, 70, 0.8, seed=2)
    lin = nn.Linear(70, 45, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
    sl = SparseLinear.from_module(lin, backends=(backend,), use_disk_cache=False)
    for shape in [(70,), (1, 70), (1, 1, 70), (7, 70), (2, 5, 70), (3, 1, 70)]:
        x = torch.randn(*shape)
        ref = (x.double() @ w.double().t() + (lin.bias.double() if bias else 0.0)).float()  # independent fp64 reference
        y = sl(x)
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sell", "sell_par", "dense"])
def test_conv1d_transposition(backend):
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 32)  # nf=out 48, nx=in 32, weight (32, 48)
    with torch.no_grad():
        conv.weight.copy_(_sparse_weight(48, 32, 0.7, seed=3).t())
        conv.bias.normal_()
    sl = SparseLinear.from_module(conv, backends=(backend,), use_disk_cache=False)
    assert (sl.out_features, sl.in_features) == (48, 32) and sl.transposed
    for shape in [(32,), (1, 1, 32), (4, 6, 32)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(sl(x), conv(x), rtol=1e-5, atol=1e-5)
    back = sl.restore()
    assert isinstance(back, Conv1D)
    assert torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)


def test_measured_decision_is_cached_in_memory_and_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path))
    clear_decisions()
    lin = nn.Linear(64, 96)
    with torch.no_grad():
        lin.weight.copy_(_sparse_weight(96, 64, 0.95, seed=4))
    sl = SparseLinear.from_module(lin, backends=("sell", "dense"), decision_repeats=3)
    choice = sl.decide(1)
    assert choice in ("sell", "dense")
    assert set(sl.timings[1]) == {"sell", "dense"} and all(t > 0 for t in sl.timings[1].values())
    files = list((tmp_path / "runtime").glob("decisions-*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved[sl.decision_key(1)]["backend"] == choice
    # A second module of the same shape and sparsity bucket reuses the decision without timing.
    clear_decisions()  # forget memory; the disk file must answer
    sl2 = SparseLinear.from_module(lin, backends=("sell", "dense"), decision_repeats=3)
    sl2._run = None  # type: ignore[assignment]  # any measurement would now fail
    assert sl2.decide(1) == choice
    clear_decisions()


def _prune_per_matrix(lm, sparsity: float) -> None:
    """Own per-matrix magnitude masks (independent of prunelab.pruning)."""
    with torch.no_grad():
        for m in lm.prunable:
            w = m.weight(lm.model)
            k = int(sparsity * w.numel())
            thr = w.abs().flatten().kthvalue(k).values
            w.masked_fill_(w.abs() <= thr, 0.0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "t5"])
def test_sparsify_model_logits_and_undo(tiny_dirs, arch):
    lm = load(str(tiny_dirs[arch]))
    _prune_per_matrix(lm, 0.8)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ids = torch.randint(5, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids}
    if lm.family == "encoder-decoder":
        kwargs["decoder_input_ids"] = ids[:, :5]
    with torch.no_grad():
        ref = lm.model(**kwargs).logits
    summary = sparsify_for_inference(lm, force="sell", use_disk_cache=False)
    assert summary.swapped == len(lm.prunable)
    assert len(sparse_modules(lm.model)) == len(lm.prunable)
    assert summary.read_bytes_decode < summary.dense_bytes
    json.dumps(summary.to_dict())
    with torch.no_grad():
        got = lm.model(**kwargs).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert restore_dense(lm) == len(lm.prunable)
    after = lm.model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_min_sparsity_leaves_dense_matrices_alone():
    model = tiny_model("llama")
    lm = wrap_model(model)
    summary = sparsify_for_inference(lm, min_sparsity=0.3, use_disk_cache=False)
    assert summary.swapped == 0
    assert all("min_sparsity" in m.reason for m in summary.modules)


def test_greedy_decode_with_kv_cache_matches_dense():
    model = tiny_model("llama", seed=3)
    lm = wrap_model(model)
    _prune_per_matrix(lm, 0.9)
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        sparsify_for_inference(lm, force="sell_par", use_disk_cache=False)
        got = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(got, ref)
