"""Pieces every benchmark shares: window lengths, result skeletons, chunked NLL, pooled features.

Everything here runs under `torch.inference_mode()` and avoids materialising full-vocabulary
logits for a whole batch: the LM head is applied to slices of hidden states and the loss is
summed slice by slice, which keeps a 2048-token window of a 49 k-vocab model at a few
hundred MB instead of several GB.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prunelab.data.wikitext import TextCorpus
from prunelab.errors import ConfigError
from prunelab.evaluation.types import EvalOptions, EvalResult
from prunelab.models.types import LoadedModel

_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
BLOCK_TOKENS = 128  # perplexity's resampling unit: consecutive predicted tokens of one window
Blocks = list[tuple[float, int]]  # (summed NLL, scored tokens) per resampling unit


def ratio_interval_data(units: str, blocks: Blocks, transform: str | None) -> dict[str, Any]:
    """What a bootstrap over `units` needs: per-unit numerators and denominators of a ratio statistic.

    The statistic is sum(num) / sum(den) (exp of it for perplexities, `transform="exp"`); the report
    resamples the units to draw its interval. Stored compactly (4 decimals), never used for the value.
    """
    return {"kind": "ratio", "units": units, "transform": transform,
            "num": [round(float(a), 4) for a, _ in blocks], "den": [int(b) for _, b in blocks]}


def binomial_interval_data(labels: Any, preds: Any) -> dict[str, Any]:
    """Accuracy as counts (correct of n): what a Wilson interval needs, plus the per-example hits."""
    hits = (np.asarray(labels) == np.asarray(preds)).astype(int)
    return {"kind": "binomial", "units": "examples", "correct": int(hits.sum()), "n": int(hits.size),
            "hits": "".join(map(str, hits.tolist()))}


def per_token_blocks(losses: torch.Tensor, block: int = BLOCK_TOKENS) -> Blocks:
    """Split each row of per-token NLLs (every position scored) into consecutive blocks of `block` tokens."""
    out: Blocks = []
    for row in losses:
        for start in range(0, row.shape[0], block):
            part = row[start : start + block]
            out.append((float(part.sum()), int(part.numel())))
    return out


def summed_nll(logits: torch.Tensor, targets: torch.Tensor, per_token: list[torch.Tensor] | None = None,
               ignore_index: int = -100) -> float:
    """Summed cross-entropy, bitwise equal to `F.cross_entropy(..., reduction="sum")`.

    cross_entropy is nll_loss(log_softmax) in ATen, so computing log_softmax once also yields the
    per-token NLLs (appended to `per_token`) without changing the sum the metric is built from.
    """
    logp = F.log_softmax(logits, dim=-1)
    if per_token is not None:
        per_token.append(F.nll_loss(logp, targets, ignore_index=ignore_index, reduction="none"))
    return float(F.nll_loss(logp, targets, ignore_index=ignore_index, reduction="sum"))


def resolve_seqlen(lm: LoadedModel, requested: int | None, cap: int, fallback: int = 512) -> int:
    """`requested`, or min(model context, cap); a one-line error when it exceeds the context."""
    context = lm.context_length
    if requested is not None:
        if requested < 2:
            raise ConfigError(f"--seqlen {requested} is too short: use at least 2 tokens")
        if context is not None and requested > context:
            raise ConfigError(
                f"--seqlen {requested} exceeds the model context of {context} tokens ({lm.name}): "
                f"pass --seqlen {min(context, cap)} or less"
            )
        return int(requested)
    return int(min(context if context is not None else fallback, cap))


def new_result(lm: LoadedModel, bench: str, options: EvalOptions, **kwargs: Any) -> EvalResult:
    """An `EvalResult` with the identity fields filled in (timing is added by `evaluate`)."""
    return EvalResult(model=lm.name, family=lm.family, bench=bench, seed=options.seed, **kwargs)


def ppl_result(lm: LoadedModel, bench: str, options: EvalOptions, *, metric: str, nll: float, count: int,
               note: str, n_examples: int, seqlen: int, corpus: TextCorpus, details: dict[str, Any]) -> EvalResult:
    """A perplexity-style result: `metric` = exp(mean NLL over `count` scored tokens), lower is better.

    ppl, pppl and seq2seq-ppl report the same fields (NLL per token, token and example counts,
    the WikiText-2 file and its hash); only what counts as a scored token differs.
    """
    return new_result(
        lm, bench, options,
        metrics={metric: ppl_from_nll(nll, count), "nll_per_token": nll / count},
        primary=metric, higher_is_better=False, note=note,
        n_tokens=count, n_examples=n_examples, seqlen=seqlen,
        data_path=corpus.path, data_sha256=corpus.sha256, details=details,
    )


def require_tokenizer(lm: LoadedModel, bench: str) -> Any:
    if lm.tokenizer is None:
        raise ConfigError(f"{lm.name} has no tokenizer, which '{bench}' needs: add tokenizer files to {lm.source}")
    return lm.tokenizer


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer without its task head (`model.model`, `model.transformer`, `model.bert`…)."""
    return getattr(model, "base_model", model)


def _head_applies_directly(model: torch.nn.Module) -> bool:
    """True when logits are exactly `get_output_embeddings()(last_hidden_state)` for this model."""
    config = model.config
    for attr in _LOGIT_POSTPROCESSING:
        value = getattr(config, attr, None)
        if value not in (None, 0, 0.0, 1, 1.0):
            return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return isinstance(head, torch.nn.Linear) and backbone(model) is not model


class CausalScorer:
    """Sum of next-token NLL over windows of a causal LM, with the LM head applied in slices.

    The slice path is used only if a one-off check on a short prefix shows it reproduces the
    model's own logits; otherwise (soft-capping, logit scaling, exotic heads) the full forward
    is used, which is slower but always right.
    """

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = 1024) -> None:
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.sliced: bool | None = None if _head_applies_directly(model) else False

    def _check_sliced(self, input_ids: torch.Tensor) -> bool:
        probe = input_ids[:1, : min(32, input_ids.shape[1])]
        full = self.model(input_ids=probe).logits.float()
        hidden = backbone(self.model)(input_ids=probe).last_hidden_state
        sliced = self.model.get_output_embeddings()(hidden).float()
        return full.shape == sliced.shape and torch.allclose(full, sliced, rtol=1e-4, atol=1e-4)

    @torch.inference_mode()
    def window_nll(self, input_ids: torch.Tensor, blocks: Blocks | None = None) -> tuple[float, int]:
        """(sum of NLL, number of predicted tokens) over a batch of full windows (no padding).

        With `blocks`, also append (NLL, tokens) per `BLOCK_TOKENS` predicted tokens of each window,
        the units the report's bootstrap interval resamples.
        """
        if self.sliced is None:
            self.sliced = self._check_sliced(input_ids)
        targets = input_ids[:, 1:]
        per_token: list[torch.Tensor] | None = [] if blocks is not None else None
        if not self.sliced:
            logits = self.model(input_ids=input_ids).logits[:, :-1].float()
            total = summed_nll(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), per_token)
        else:
            hidden = backbone(self.model)(input_ids=input_ids).last_hidden_state[:, :-1]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            flat_targets = targets.reshape(-1)
            head = self.model.get_output_embeddings()
            total = 0.0
            for start in range(0, hidden.shape[0], self.chunk_tokens):
                stop = start + self.chunk_tokens
                total += summed_nll(head(hidden[start:stop]).float(), flat_targets[start:stop], per_token)
        if blocks is not None and per_token is not None:
            blocks += per_token_blocks(torch.cat(per_token).view(targets.shape))
        return total, int(targets.numel())


def ppl_from_nll(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count) if count else float("nan")


def length_batches(lengths: Sequence[int], token_budget: int = 8192, max_batch: int = 128) -> Iterator[list[int]]:
    """Index batches sorted by length so padding is small and each batch stays under a token budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch: list[int] = []
    longest = 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if batch and (longest_if_added * (len(batch) + 1) > token_budget or len(batch) >= max_batch):
            yield batch
            batch, longest_if_added = [], lengths[i]
        batch.append(i)
        longest = longest_if_added
    if batch:
        yield batch


def text_max_length(lm: LoadedModel, cap: int = 128) -> int:
    context = lm.context_length
    return int(min(context, cap)) if context else cap


def encode_texts(tokenizer: Any, texts_a: list[str], texts_b: list[str] | None, max_length: int) -> list[list[int]]:
    """Token ids per example (pairs encoded with the tokenizer's own separator, if it has one)."""
    if texts_b is not None and getattr(tokenizer, "sep_token", None) is None:
        texts_a = [f"{a}\n{b}" for a, b in zip(texts_a, texts_b, strict=True)]
        texts_b = None
    enc = tokenizer(texts_a, texts_b, truncation=True, max_length=max_length, return_attention_mask=False)
    return [list(ids) for ids in enc["input_ids"]]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def pad_id_of(tokenizer: Any, model: torch.nn.Module) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@torch.inference_mode()
def pooled_features(lm: LoadedModel, seqs: list[list[int]], pooling: str | None = None) -> np.ndarray:
    """One frozen feature vector per sequence.

    Pooling by family: mean over tokens for encoders, the last non-pad token for decoders
    (the only position that has seen the whole text), the mean encoder output for
    encoder-decoders.
    """
    model = lm.model
    pooling = pooling or {"encoder": "mean", "decoder": "last", "encoder-decoder": "encoder-mean"}[lm.family]
    pad = pad_id_of(lm.tokenizer, model)
    out = np.zeros((len(seqs), 0), dtype=np.float32)
    for batch in length_batches([len(s) for s in seqs]):
        ids, mask = pad_batch([seqs[i] for i in batch], pad)
        if pooling == "encoder-mean":
            hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            feats = mean_pool(hidden, mask)
        else:
            hidden = backbone(model)(input_ids=ids, attention_mask=mask).last_hidden_state
            if pooling == "last":
                last = mask.sum(1) - 1
                feats = hidden[torch.arange(hidden.shape[0]), last]
            else:
                feats = mean_pool(hidden, mask)
        feats = feats.float().numpy()
        if out.shape[1] == 0:
            out = np.zeros((len(seqs), feats.shape[1]), dtype=np.float32)
        out[batch] = feats
    return out
