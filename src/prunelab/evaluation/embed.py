"""Embedding fidelity of an encoder against its dense reference, on SST-2 dev sentences.

Two views of "does the pruned model still embed like the dense one": the mean cosine between
each sentence's pruned and dense mean-pooled embeddings (pointwise agreement), and the
Spearman correlation between the two models' pairwise cosine-similarity matrices (does it
still rank sentence pairs the same way — what retrieval and clustering use).

The reference is `options.reference` (a LoadedModel or a spec), else the `model` recorded in
the checkpoint's prune_report.json, else the checkpoint the model was loaded from (for a
model pruned in memory, that is the dense original on disk).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from prunelab.data.glue import read_glue
from prunelab.errors import ConfigError
from prunelab.evaluation.common import encode_texts, new_result, pooled_features, require_tokenizer, text_max_length
from prunelab.evaluation.types import EvalOptions, EvalResult
from prunelab.models.types import LoadedModel


def _prune_report_model(source: Path) -> str | None:
    report = Path(source) / "prune_report.json"
    if not report.is_file():
        return None
    try:
        value = json.loads(report.read_text()).get("model")
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(value, dict):  # tolerate {"model": {"spec": ...}}
        value = value.get("spec") or value.get("raw")
    return value if isinstance(value, str) else None


def resolve_reference(lm: LoadedModel, reference: Any) -> tuple[LoadedModel, str]:
    """(dense reference model, how it was chosen)."""
    from prunelab.storage import load

    if isinstance(reference, LoadedModel):
        return reference, "given"
    if isinstance(reference, str):
        return load(reference), "given"
    recorded = _prune_report_model(lm.source)
    if recorded:
        return load(recorded), "prune_report.json"
    if (Path(lm.source) / "config.json").is_file():
        return load(str(lm.source)), "source checkpoint"
    raise ConfigError(f"embed needs the dense model to compare {lm.name} with: pass --reference MODEL")


def _zero_fraction(lm: LoadedModel) -> float:
    zeros = total = 0
    for m in lm.prunable:
        w = m.weight(lm.model)
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(1, total)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of `a` with the same row of `b` (float64)."""
    return (_normalize(a.astype(np.float64)) * _normalize(b.astype(np.float64))).sum(1)


def fidelity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean cosine of matching rows, and Spearman of the two pairwise-cosine upper triangles."""
    from scipy.stats import spearmanr

    na, nb = _normalize(a.astype(np.float64)), _normalize(b.astype(np.float64))
    cosine = row_cosines(a, b)
    iu = np.triu_indices(len(a), k=1)
    sims_a, sims_b = (na @ na.T)[iu], (nb @ nb.T)[iu]
    rho = float(spearmanr(sims_a, sims_b).statistic) if len(sims_a) > 1 else float("nan")
    return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()), "spearman_pairwise": rho}


def evaluate_embed(lm: LoadedModel, options: EvalOptions) -> EvalResult:
    """Fidelity of mean-pooled embeddings vs the dense reference (higher is better, 1 = identical)."""
    tokenizer = require_tokenizer(lm, "embed")
    dev = read_glue("sst2", "dev", options.data)
    if options.max_examples is not None:
        dev = dev.subset(range(min(len(dev), options.max_examples)))
    reference, how = resolve_reference(lm, options.reference)
    if reference.family != "encoder":
        raise ConfigError(f"embed reference {reference.name} is a {reference.family}: pass an encoder with --reference")
    max_length = text_max_length(lm)
    ours = pooled_features(lm, encode_texts(tokenizer, dev.texts_a, None, max_length), pooling="mean")
    if reference is lm:
        theirs = ours
    else:
        ref_tok = require_tokenizer(reference, "embed")
        theirs = pooled_features(reference, encode_texts(ref_tok, dev.texts_a, None, max_length), pooling="mean")
    if ours.shape[1] != theirs.shape[1]:
        raise ConfigError(f"embed: {lm.name} and reference {reference.name} have different widths "
                          f"({ours.shape[1]} vs {theirs.shape[1]}): pass the dense version with --reference")
    metrics = fidelity(ours, theirs)
    per_sentence = row_cosines(ours, theirs)  # the bootstrap's units for the report's interval
    ref_sparsity = _zero_fraction(reference)
    note = (f"mean-pooled embeddings of {len(dev)} SST-2 dev sentences vs reference {reference.name} ({how}); "
            "mean cosine per sentence and Spearman of pairwise cosine similarities")
    if ref_sparsity > 0.05:
        note += f"; WARNING: the reference is {ref_sparsity:.0%} zeros, it may not be dense"
    return new_result(
        lm, "embed", options, metrics=metrics, primary="mean_cosine", higher_is_better=True,
        note=note, n_examples=len(dev), seqlen=max_length, data_path=dev.path, data_sha256=dev.sha256,
        details={"reference": reference.name, "reference_from": how, "reference_zero_fraction": ref_sparsity,
                 "model_zero_fraction": _zero_fraction(lm),
                 "interval_data": {"kind": "mean", "units": "sentences",
                                   "values": [round(float(c), 6) for c in per_sentence]}},
    )
