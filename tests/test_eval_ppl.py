"""Causal-LM perplexity against an independent plain loop, on tiny models and on zoo:smollm2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from prunelab.evaluation import EvalOptions, evaluate
from prunelab.evaluation.common import CausalScorer
from prunelab.storage import load

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


def reference_ppl(lm, data_dir: Path, seqlen: int, n_windows: int) -> tuple[float, int]:
    """The protocol written out by hand: rows per the data README, join, tokenize, forward each window."""
    raw = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    ids = lm.tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n_windows):
            window = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            loss = lm.model(input_ids=window, labels=window).loss  # mean over seqlen - 1 predictions
            total += float(loss) * (seqlen - 1)
            count += seqlen - 1
    return math.exp(total / count), count


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ppl_matches_plain_loop_on_tiny_models(tiny_dirs, data_dir, arch):
    lm = load(str(tiny_dirs[arch]))
    result = evaluate(lm, "ppl", EvalOptions(seqlen=64, max_tokens=6 * 64, batch_size=4))
    expected, count = reference_ppl(lm, data_dir, 64, 6)
    assert result.n_tokens == count == 6 * 63
    assert result.value == pytest.approx(expected, rel=1e-3)
    assert result.details["sliced_lm_head"] is True
    assert result.status == "ok" and result.seqlen == 64 and result.n_examples == 6
    assert result.data_sha256 == "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
    assert result.wall_time_s > 0 and result.model == str(tiny_dirs[arch]) and result.family == "decoder"


def test_sliced_head_equals_full_logits(tiny_dirs):
    lm = load(str(tiny_dirs["llama"]))
    ids = torch.randint(0, lm.model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    sliced = CausalScorer(lm.model, chunk_tokens=7)  # slices that straddle window boundaries
    full = CausalScorer(lm.model)
    full.sliced = False
    a, na = sliced.window_nll(ids)
    b, nb = full.window_nll(ids)
    assert na == nb == 3 * 39
    assert a == pytest.approx(b, rel=1e-5)


def test_default_seqlen_prefix_windows_and_batching(tiny_dirs):
    lm = load(str(tiny_dirs["gpt2"]))
    short = evaluate(lm, "ppl", EvalOptions(max_tokens=2 * 128))
    assert short.seqlen == 128  # tiny gpt2 has n_positions 128 < 2048
    assert short.n_examples == 2 and short.n_tokens == 2 * 127
    longer = evaluate(lm, "ppl", EvalOptions(max_tokens=4 * 128 + 50, batch_size=8))
    assert longer.n_examples == 4  # floor(max_tokens / seqlen) whole windows
    one_by_one = evaluate(lm, "ppl", EvalOptions(max_tokens=4 * 128 + 50, batch_size=1))
    assert one_by_one.value == pytest.approx(longer.value, rel=1e-6)
    # The 4-window NLL is the 2-window NLL plus windows 3 and 4: a prefix is a subset of the stream.
    from prunelab.data.wikitext import load_wikitext, token_stream

    stream = token_stream(lm.tokenizer, load_wikitext())
    tail, n = CausalScorer(lm.model).window_nll(stream[256:512].view(2, 128))
    total_short = short.metrics["nll_per_token"] * short.n_tokens
    assert longer.metrics["nll_per_token"] * longer.n_tokens == pytest.approx(total_short + tail, rel=1e-6)


@pytest.mark.slow
def test_ppl_matches_plain_loop_on_smollm2(data_dir):
    lm = load("zoo:smollm2")
    result = evaluate(lm, "ppl", EvalOptions(seqlen=512, max_tokens=8 * 512))
    expected, count = reference_ppl(lm, data_dir, 512, 8)
    assert result.n_tokens == count
    assert result.value == pytest.approx(expected, rel=1e-3)
    assert 5.0 < result.value < 60.0  # a real 135 M model on WikiText-2, far from uniform (49 k)
