"""Causal-LM perplexity on WikiText-2, by the protocol the pruning papers use.

Rows joined by "\\n\\n", tokenized once, cut into non-overlapping windows of `seqlen` tokens
(the tail shorter than a window is dropped), NLL of every predicted token (seqlen - 1 per
window) summed and divided by their number. `max_tokens` keeps only the first
floor(max_tokens / seqlen) windows, so a prefix evaluation is a subset of the full one and
numbers for different models on the same tokenizer use identical windows.
"""

from __future__ import annotations

from prunelab.data.wikitext import load_wikitext, token_stream
from prunelab.errors import ConfigError, DataError
from prunelab.evaluation.common import (
    BLOCK_TOKENS,
    Blocks,
    CausalScorer,
    ppl_result,
    ratio_interval_data,
    require_tokenizer,
    resolve_seqlen,
)
from prunelab.evaluation.types import EvalOptions, EvalResult
from prunelab.models.types import LoadedModel

DEFAULT_CAP = 2048
TOKEN_BUDGET = 4096  # tokens per forward batch: several short windows at once, one long one alone


def evaluate_ppl(lm: LoadedModel, options: EvalOptions) -> EvalResult:
    """Token-level WikiText-2 perplexity of a decoder (lower is better)."""
    tokenizer = require_tokenizer(lm, "ppl")
    seqlen = resolve_seqlen(lm, options.seqlen, DEFAULT_CAP)
    corpus = load_wikitext(options.data)
    stream = token_stream(tokenizer, corpus)
    n_windows = stream.numel() // seqlen
    if n_windows == 0:
        raise DataError(f"{corpus.path} has {stream.numel()} tokens, fewer than one window of {seqlen}: lower --seqlen")
    if options.max_tokens is not None:
        if options.max_tokens < seqlen:
            raise ConfigError(f"--max-tokens {options.max_tokens} is less than one window (--seqlen {seqlen})")
        n_windows = min(n_windows, options.max_tokens // seqlen)
    windows = stream[: n_windows * seqlen].view(n_windows, seqlen)
    per_batch = max(1, min(options.batch_size, TOKEN_BUDGET // seqlen))
    scorer = CausalScorer(lm.model)
    nll_sum, count = 0.0, 0
    blocks: Blocks = []
    batches = [windows[start : start + per_batch] for start in range(0, n_windows, per_batch)]
    if lm.offload is not None:  # larger than memory: block-major, every block read once
        from prunelab.evaluation.offload import offloaded_window_nll

        nll_sum, count = offloaded_window_nll(lm, batches, blocks)
    for batch in batches if lm.offload is None else []:
        nll, n = scorer.window_nll(batch, blocks)
        nll_sum += nll
        count += n
    return ppl_result(
        lm, "ppl", options, metric="ppl", nll=nll_sum, count=count,
        note=(f"WikiText-2 raw test rows joined by '\\n\\n', tokenized once; {n_windows} non-overlapping windows "
              f"of {seqlen} tokens; mean NLL over {count} predicted tokens"),
        n_examples=n_windows, seqlen=seqlen, corpus=corpus,
        details={
            "protocol": "wikitext2-raw-joined-nonoverlapping",
            "windows": n_windows,
            "tokens_in_windows": n_windows * seqlen,
            "stream_tokens": int(stream.numel()),
            "max_tokens": options.max_tokens,
            "text_sha256": corpus.text_sha256,
            "sliced_lm_head": bool(scorer.sliced),
            "out_of_core": lm.offload is not None,
            "interval_data": ratio_interval_data(f"{BLOCK_TOKENS}-token blocks of the windows", blocks, "exp"),
        },
    )
