"""Masked-LM pseudo-perplexity (Salazar et al., 2020) for encoders that keep their MLM head.

Each token of a sentence is masked in turn and scored by the model given the rest; the
pseudo-perplexity is exp of the mean of those NLLs. Encoders shipped without an MLM head
(sentence encoders such as all-MiniLM) get a "not applicable" result: a randomly initialised
head would produce a number (~1e5) that means nothing.

Data: non-empty, non-heading WikiText-2 test rows, each truncated to `seqlen` tokens
(default min(context, 128)); by default the first 4096 scored tokens (`--max-tokens`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunelab.data.wikitext import load_wikitext
from prunelab.errors import ConfigError, DataError
from prunelab.evaluation.common import (
    Blocks,
    backbone,
    new_result,
    ppl_result,
    ratio_interval_data,
    require_tokenizer,
    resolve_seqlen,
)
from prunelab.evaluation.types import EvalOptions, EvalResult
from prunelab.models.types import LoadedModel

DEFAULT_CAP = 128
DEFAULT_MAX_TOKENS = 4096
TOKEN_BUDGET = 8192


def has_mlm_head(model: torch.nn.Module) -> bool:
    return type(model).__name__.endswith("ForMaskedLM") and model.get_output_embeddings() is not None


def _mlm_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module mapping last hidden states to vocabulary logits, when it is a separate submodule."""
    for attr in ("cls", "lm_head"):
        head = getattr(model, attr, None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


class MaskedScorer:
    """NLL of masked positions; the head runs on the masked positions only when that is exact."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.head = _mlm_head(model)
        self.checked = self.head is None

    def _logits_at(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
                   ) -> torch.Tensor:
        if not self.checked:
            full = self.model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0].float()
            hidden = backbone(self.model)(input_ids=ids[:1], attention_mask=mask[:1]).last_hidden_state[0]
            if not torch.allclose(full, self.head(hidden).float(), rtol=1e-4, atol=1e-4):
                self.head = None
            self.checked = True
        if self.head is None:
            return self.model(input_ids=ids, attention_mask=mask).logits[rows, cols].float()
        hidden = backbone(self.model)(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.head(hidden[rows, cols]).float()

    @torch.inference_mode()
    def sentence_nll(self, ids: list[int], positions: list[int], mask_id: int) -> float:
        """Sum over `positions` of -log p(ids[p] | ids with p masked)."""
        per_batch = max(1, TOKEN_BUDGET // len(ids))
        base = torch.tensor(ids, dtype=torch.long)
        total = 0.0
        for start in range(0, len(positions), per_batch):
            pos = torch.tensor(positions[start : start + per_batch], dtype=torch.long)
            batch = base.repeat(len(pos), 1)
            rows = torch.arange(len(pos))
            batch[rows, pos] = mask_id
            attn = torch.ones_like(batch)
            logits = self._logits_at(batch, attn, rows, pos)
            total += float(F.cross_entropy(logits, base[pos], reduction="sum"))
        return total


def evaluate_pppl(lm: LoadedModel, options: EvalOptions) -> EvalResult:
    """Pseudo-perplexity of an MLM encoder (lower is better), or a not-applicable result."""
    if not has_mlm_head(lm.model):
        return new_result(
            lm, "pppl", options, metrics={"pppl": None}, primary="pppl", higher_is_better=False,
            status="not_applicable", note="not applicable: no MLM head",
            details={"model_class": type(lm.model).__name__},
        )
    tokenizer = require_tokenizer(lm, "pppl")
    if tokenizer.mask_token_id is None:
        raise ConfigError(f"{lm.name}'s tokenizer has no mask token, which pseudo-perplexity needs")
    seqlen = resolve_seqlen(lm, options.seqlen, DEFAULT_CAP)
    budget = options.max_tokens if options.max_tokens is not None else DEFAULT_MAX_TOKENS
    corpus = load_wikitext(options.data)
    rows = [r.strip() for r in corpus.rows if r.strip() and not r.strip().startswith("=")]
    if not rows:
        raise DataError(f"dataset {corpus.path} has no text rows (only headings or blank lines)")
    special = set(tokenizer.all_special_ids)
    scorer = MaskedScorer(lm.model)
    nll, count, sentences = 0.0, 0, 0
    per_sentence: Blocks = []
    for row in rows:
        if count >= budget or (options.max_examples is not None and sentences >= options.max_examples):
            break
        ids = tokenizer(row, truncation=True, max_length=seqlen)["input_ids"]
        positions = [i for i, t in enumerate(ids) if t not in special][: budget - count]
        if not positions:
            continue
        sentence = scorer.sentence_nll(ids, positions, tokenizer.mask_token_id)
        nll += sentence
        per_sentence.append((sentence, len(positions)))
        count += len(positions)
        sentences += 1
    return ppl_result(
        lm, "pppl", options, metric="pppl", nll=nll, count=count,
        note=(f"pseudo-perplexity: each non-special token masked in turn; {sentences} WikiText-2 test rows "
              f"(headings skipped) truncated to {seqlen} tokens, first {count} scored tokens"),
        n_examples=sentences, seqlen=seqlen, corpus=corpus,
        details={"max_tokens": budget, "sliced_head": scorer.head is not None,
                 "interval_data": ratio_interval_data("sentences", per_sentence, "exp")},
    )
