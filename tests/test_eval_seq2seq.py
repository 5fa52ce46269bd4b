"""seq2seq-ppl: only target tokens count, padding cannot move the value, corruption is deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prunelab.evaluation import EvalOptions, evaluate
from prunelab.evaluation.seq2seq_ppl import (
    Seq2SeqExample,
    _decoder_start,
    _sentinel_ids,
    build_examples,
    seq2seq_nll,
    t5_span_corrupt,
    task_for,
)
from prunelab.storage import load

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


@pytest.fixture(scope="module", params=["bart", "t5"])
def s2s(request, tiny_dirs):
    return load(str(tiny_dirs[request.param]))


def _examples(lm, n=5):
    gen = np.random.default_rng(0)
    chunks = [gen.integers(10, 250, size=int(gen.integers(12, 30))).tolist() for _ in range(n)]
    return build_examples(lm, chunks, seed=3)[0]


def test_padding_length_does_not_change_the_value(s2s):
    examples = _examples(s2s)
    pad = s2s.tokenizer.pad_token_id
    base = seq2seq_nll(s2s.model, examples, pad_id=pad, batch_size=1)
    padded = seq2seq_nll(s2s.model, examples, pad_id=pad, batch_size=5, extra_padding=23)
    mixed = seq2seq_nll(s2s.model, examples, pad_id=pad, batch_size=2, extra_padding=7)
    assert base[1] == padded[1] == mixed[1] == sum(len(e.target_ids) for e in examples)
    assert padded[0] == pytest.approx(base[0], rel=1e-5)
    assert mixed[0] == pytest.approx(base[0], rel=1e-5)


def test_only_target_tokens_count_hand_built(s2s):
    """Prompt and padding positions are fed to the decoder but never scored."""
    model = s2s.model
    start = _decoder_start(model)
    ex = Seq2SeqExample(input_ids=[40, 41, 42, 43, 2], target_ids=[50, 51, 52], prompt_ids=[60, 61])
    nll, count = seq2seq_nll(model, [ex], pad_id=s2s.tokenizer.pad_token_id, extra_padding=4)
    assert count == 3
    # By hand: decoder sees [start, 60, 61, 50, 51]; positions 2, 3, 4 predict 50, 51, 52.
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ex.input_ids]),
                       decoder_input_ids=torch.tensor([[start, 60, 61, 50, 51]])).logits[0].float()
    logp = F.log_softmax(logits, -1)
    expected = -(logp[2, 50] + logp[3, 51] + logp[4, 52]).item()
    assert nll == pytest.approx(expected, rel=1e-5)
    # Counting the prompt too would give a different number: the test can tell them apart.
    with_prompt = -(logp[0, 60] + logp[1, 61]).item() + expected
    assert not math.isclose(nll, with_prompt, rel_tol=1e-3)


def test_default_task_uses_pretraining_corruption(s2s):
    task = task_for(s2s)
    assert task == {"bart": "bart-mask", "t5": "t5-span"}[s2s.model.config.model_type]
    options = EvalOptions(max_tokens=3 * 62, seqlen=64)
    a = evaluate(s2s, "seq2seq-ppl", options)
    b = evaluate(s2s, "seq2seq-ppl", EvalOptions(max_tokens=3 * 62, seqlen=64, batch_size=1))
    assert a.status == "ok" and a.details["task"] == task and task in a.details["task"]
    assert a.value == pytest.approx(b.value, rel=1e-5)  # batch composition does not matter
    assert a.n_examples == 3 and a.seqlen == 64
    assert "target tokens only" in a.note
    c = evaluate(s2s, "seq2seq-ppl", EvalOptions(max_tokens=3 * 62, seqlen=64, seed=1))
    assert c.value != a.value  # corruption depends on the seed


def test_t5_span_corruption_reconstructs_the_chunk(tiny_dirs):
    lm = load(str(tiny_dirs["t5"]))
    sentinels = _sentinel_ids(lm.tokenizer)
    assert len(sentinels) == 8
    chunk = list(range(100, 160))
    src, tgt = t5_span_corrupt(chunk, sentinels, 2, np.random.default_rng(0))
    assert src[-1] == 2 and tgt[-1] == 2
    # Put the spans back where their sentinels are: the original chunk comes out.
    spans: dict[int, list[int]] = {}
    current = None
    for t in tgt[:-1]:
        if t in sentinels:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    rebuilt = [tok for t in src[:-1] for tok in (spans[t] if t in sentinels else [t])]
    assert rebuilt == chunk
    noise = sum(len(v) for v in spans.values())
    assert noise == round(0.15 * len(chunk))


def test_seqlen_beyond_context_is_an_error(tiny_dirs):
    from prunelab.errors import ConfigError

    lm = load(str(tiny_dirs["bart"]))
    with pytest.raises(ConfigError, match="exceeds the model context"):
        evaluate(lm, "seq2seq-ppl", EvalOptions(seqlen=1000))
