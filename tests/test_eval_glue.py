"""GLUE readers, the probe, and mask-preserving fine-tuning (tiny models; zoo:minilm marked slow)."""

from __future__ import annotations

import pytest
import torch

from prunelab.data.glue import read_glue
from prunelab.errors import DataError
from prunelab.evaluation import EvalOptions, evaluate
from prunelab.evaluation import finetune as ft
from prunelab.storage import load

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


def zero_half(lm) -> str:
    """50 % magnitude pruning: the library's `prune` when present, else smallest half of each matrix."""
    try:
        from prunelab.pruning import PruneConfig, prune

        prune(lm, PruneConfig(method="magnitude", sparsity=0.5))
        return "prunelab.pruning.prune"
    except ImportError:
        with torch.no_grad():
            for m in lm.prunable:
                w = m.module(lm.model).weight
                idx = w.abs().flatten().argsort()[: w.numel() // 2]
                w.view(-1)[idx] = 0.0
        return "local"


def prunable_zeros(lm) -> int:
    return sum(int((m.weight(lm.model) == 0).sum()) for m in lm.prunable)


def test_readers_handle_bom_and_quotes(data_dir):
    mrpc = read_glue("mrpc", "dev")
    assert len(mrpc) == 408 and int(mrpc.labels.sum()) == 279
    assert mrpc.texts_a[0].startswith("He said the foodservice pie business")
    assert mrpc.texts_b[0].startswith('"The foodservice pie business')  # the quote survives QUOTE_NONE
    assert len(read_glue("mrpc", "train")) == 3668
    sst = read_glue("sst2", "dev")
    assert len(sst) == 872 and int(sst.labels.sum()) == 444 and sst.texts_b is None
    assert sst.sha256 == "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"


def test_reader_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_glue("sst2", "dev", str(tmp_path))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="empty") as info:
        read_glue("sst2", "dev", str(tmp_path))
    assert "\n" not in str(info.value)
    (tmp_path / "dev.tsv").write_text("text\tgold\nfine .\t1\n")
    with pytest.raises(DataError, match="lacks column"):
        read_glue("sst2", "dev", str(tmp_path))


@pytest.mark.parametrize("arch, task", [("bert", "sst2"), ("gpt2", "mrpc"), ("t5", "sst2")])
def test_probe_runs_for_every_family(tiny_dirs, arch, task):
    lm = load(str(tiny_dirs[arch]))
    result = evaluate(lm, task, EvalOptions(train_limit=120, max_examples=60))
    assert result.status == "ok" and result.n_examples == 60 and result.details["train_examples"] == 120
    assert 0.0 <= result.value <= 1.0
    assert ("f1" in result.metrics) == (task == "mrpc")
    assert result.data_sha256 and result.seed == 0 and result.wall_time_s > 0
    again = evaluate(lm, task, EvalOptions(train_limit=120, max_examples=60))
    assert again.metrics == result.metrics  # seeded subsample, deterministic probe


@pytest.mark.parametrize("arch", ["bert", "llama", "bart"])
def test_finetune_keeps_masks_exactly(tiny_dirs, arch):
    lm = load(str(tiny_dirs[arch]))
    zero_half(lm)
    zeros = prunable_zeros(lm)
    before = {m.name: m.weight(lm.model).clone() for m in lm.prunable}
    result = evaluate(lm, "sst2", EvalOptions(mode="finetune", train_limit=64, max_examples=32, batch_size=8,
                                              finetune_lr=1e-3))
    d = result.details
    assert d["steps"] == 8 and d["masked_matrices"] == len(lm.prunable)
    assert d["sparsity_before"] == d["sparsity_after"] >= 0.5
    assert d["zeros_before"] == d["zeros_after"] == zeros
    assert d["train_loss_first"] is not None
    # The evaluated model itself is untouched: fine-tuning happened on a copy.
    assert all(torch.equal(before[m.name], m.weight(lm.model)) for m in lm.prunable)


def test_finetune_without_mask_reapplication_is_caught(tiny_dirs, monkeypatch):
    """The guard can fail: disable the mask hooks and the zeros refill, which must raise."""
    lm = load(str(tiny_dirs["bert"]))
    zero_half(lm)
    monkeypatch.setattr(ft, "mask_grads", lambda masks: None)
    monkeypatch.setattr(ft, "apply_masks", lambda masks: None)
    with pytest.raises(ft.MaskViolationError, match="became non-zero"):
        evaluate(lm, "sst2", EvalOptions(mode="finetune", train_limit=32, max_examples=16, finetune_lr=1e-3))


@pytest.mark.slow
def test_minilm_pruned_finetune_keeps_sparsity_exactly():
    lm = load("zoo:minilm")
    how = zero_half(lm)
    zeros = prunable_zeros(lm)
    total = sum(m.numel for m in lm.prunable)
    assert zeros / total >= 0.5
    result = evaluate(lm, "sst2", EvalOptions(mode="finetune", train_limit=512, max_examples=200, batch_size=8,
                                              finetune_max_steps=64, finetune_lr=5e-5))
    d = result.details
    assert d["steps"] == 64, how
    assert d["zeros_before"] == d["zeros_after"] == zeros
    assert d["sparsity_after"] == d["sparsity_before"] == pytest.approx(zeros / total)
    assert result.value > 0.5  # learned something in 64 steps


@pytest.mark.slow
def test_minilm_sst2_probe_is_a_real_baseline():
    result = evaluate(load("zoo:minilm"), "sst2", EvalOptions())
    assert result.value >= 0.75
