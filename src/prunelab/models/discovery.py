"""Find the matrices a pruning method may touch: the linears inside transformer blocks.

The rule is structural, not a per-architecture table: a module is prunable when it is an
`nn.Linear` or GPT-2 `Conv1D` whose qualified name contains a block index
(`layers.3.`, `layer.3.`, `h.3.`, `block.3.`). Its role (q, k, v, o, up, gate, down, cross_*)
comes from the leaf names that Hugging Face models use; a linear with an unknown name is
still prunable, typed `other`.
"""

from __future__ import annotations

import re

from torch import nn

from prunelab.models.types import Family, PrunableMatrix, Stack

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")

# Leaf (or last-two-component) names → module type.
_ATTN = {
    "q_proj": "q", "query": "q", "q": "q", "wq": "q",
    "k_proj": "k", "key": "k", "k": "k", "wk": "k",
    "v_proj": "v", "value": "v", "v": "v", "wv": "v",
    "o_proj": "o", "out_proj": "o", "o": "o", "wo_attn": "o", "dense_attn": "o",
    "c_attn": "qkv", "qkv_proj": "qkv", "Wqkv": "qkv", "query_key_value": "qkv",
}
_MLP = {
    "gate_proj": "gate", "w1": "gate", "wi_0": "gate",
    "up_proj": "up", "fc1": "up", "c_fc": "up", "wi": "up", "wi_1": "up", "w3": "up",
    "dense_h_to_4h": "up", "fc_in": "up",
    "down_proj": "down", "fc2": "down", "wo": "down", "w2": "down", "dense_4h_to_h": "down", "fc_out": "down",
}
_CROSS_MARKERS = ("encoder_attn", "EncDecAttention", "crossattention", "cross_attn")


def _is_linear(module: nn.Module) -> tuple[bool, bool]:
    """(is prunable linear, is Conv1D-transposed)."""
    if isinstance(module, nn.Linear):
        return True, False
    from transformers.pytorch_utils import Conv1D  # a dependency, imported lazily: importing it is slow

    if isinstance(module, Conv1D):
        return True, True
    return False, False


def module_type_of(name: str) -> str:
    """The role of a linear from its qualified name (`...attention.self.query` → `q`)."""
    parts = name.split(".")
    leaf = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    grand = parts[-3] if len(parts) > 2 else ""
    cross = any(marker in name for marker in _CROSS_MARKERS)
    kind: str | None = None
    # BERT: attention.output.dense → o, intermediate.dense → up, output.dense → down.
    if leaf == "dense":
        if parent == "output" and grand == "attention":
            kind = "o"
        elif parent == "intermediate":
            kind = "up"
        elif parent == "output":
            kind = "down"
        elif parent in ("attention", "self_attention", "attn"):
            kind = "o"
    # GPT-2: attn.c_proj → o, mlp.c_proj → down.
    elif leaf == "c_proj":
        kind = "o" if parent in ("attn", "attention", "crossattention") else "down"
    elif leaf == "wo" and parent in ("attn", "attention", "SelfAttention", "EncDecAttention"):
        kind = "o"
    elif leaf in _ATTN and (leaf not in ("q", "k", "v", "o") or "Attention" in parent or "attn" in parent):
        kind = _ATTN[leaf]
    elif leaf in _MLP:
        kind = _MLP[leaf]
    elif leaf in ("q", "k", "v", "o"):
        kind = leaf
    if kind is None:
        return "other"
    if cross and kind in ("q", "k", "v", "o", "qkv"):
        return f"cross_{kind}"
    return kind


def _stack_of(name: str, family: Family) -> Stack:
    if family == "encoder":
        return "encoder"
    if family == "decoder":
        return "decoder"
    # encoder-decoder: the first of "encoder"/"decoder" in the path decides.
    for part in name.split("."):
        if part.startswith("encoder") and part not in ("encoder_attn",):
            return "encoder"
        if part.startswith("decoder"):
            return "decoder"
    return "decoder"


def find_prunable(
    model: nn.Module, family: Family, *, include_embeddings: bool = False
) -> list[PrunableMatrix]:
    """Every prunable matrix of `model`, in module order.

    With `include_embeddings`, token embeddings and the LM head join the list (block -1),
    for users who want to study them; pruning them is rarely wise (tied weights, rare tokens).
    """
    found: list[PrunableMatrix] = []
    seen_weights: set[int] = set()
    for name, module in model.named_modules():
        is_lin, transposed = _is_linear(module)
        match = _BLOCK.search(name)
        if is_lin and match:
            w = module.weight
            if id(w) in seen_weights:
                continue
            seen_weights.add(id(w))
            out_f, in_f = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
            found.append(
                PrunableMatrix(
                    name=name,
                    block=int(match.group(1)),
                    stack=_stack_of(name, family),
                    module_type=module_type_of(name),
                    in_features=int(in_f),
                    out_features=int(out_f),
                    transposed=transposed,
                )
            )
    if include_embeddings:
        extra: list[PrunableMatrix] = []
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if w is None or id(w) in seen_weights or w.dim() != 2:
                continue
            if isinstance(module, nn.Embedding) and not ("position" in name or name.endswith("wpe")):
                kind = "embedding"
            elif _is_linear(module)[0] and not _BLOCK.search(name):
                kind = "lm_head" if ("lm_head" in name or "proj_out" in name or name.endswith("decoder")) else "other"
            else:
                continue
            seen_weights.add(id(w))
            extra.append(
                PrunableMatrix(
                    name=name, block=-1, stack=_stack_of(name, family), module_type=kind,
                    in_features=int(w.shape[1]), out_features=int(w.shape[0]), transposed=False,
                )
            )
        found = extra + found
    return found
