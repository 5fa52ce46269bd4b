"""Give every checkpoint tensor a role — stack, block, module type — without loading weights.

The model is built on the `meta` device from its config (no memory, no weights read), and
`prunelab.models.find_prunable` — the same rule pruning uses — says which modules are
prunable matrices. Checkpoint keys are then matched to the model's parameter names, allowing
for the base-model prefix that differs between a bare checkpoint and a model with a head
(`encoder.layer.0…` saved by `BertModel` vs `bert.encoder.layer.0…` in `BertForMaskedLM`).

With `include_all`, the other floating-point tensors join, typed by what holds them:
`embedding` (token/position/type embeddings), `norm` (LayerNorm/RMSNorm weights), `bias`,
`lm_head`, or `other`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelab.errors import ModelLoadError, first_line
from prunelab.models.types import Family, Stack

#: Display order of module types: attention, cross-attention, MLP, then the --all extras.
MODULE_ORDER = ["q", "k", "v", "qkv", "o", "cross_q", "cross_k", "cross_v", "cross_qkv", "cross_o",
                "gate", "up", "down", "other", "norm", "bias", "embedding", "lm_head"]

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class TensorRole:
    """What a checkpoint tensor is: which block of which stack, which module type."""

    key: str  # name in the checkpoint
    module: str  # module name in the model built from the config ('' if unmatched)
    stack: Stack
    block: int | None  # None outside the numbered transformer blocks
    module_type: str
    prunable: bool

    @property
    def block_key(self) -> str:
        """`encoder.3`, `decoder.0`, or `outside` for embeddings, final norms and heads."""
        return "outside" if self.block is None else f"{self.stack}.{self.block}"


def ordered_types(types: list[str]) -> list[str]:
    """Module types in display order (unknown ones last, alphabetically)."""
    rank = {t: i for i, t in enumerate(MODULE_ORDER)}
    return sorted(types, key=lambda t: (rank.get(t, len(MODULE_ORDER)), t))


def _stack_for(name: str, family: Family) -> Stack:
    if family in ("encoder", "decoder"):
        return family  # type: ignore[return-value]
    for part in name.split("."):
        if part.startswith("encoder") and part != "encoder_attn":
            return "encoder"
        if part.startswith("decoder"):
            return "decoder"
    return "decoder"


def build_meta_model(source: Path, config: Any, family: Family) -> Any:
    """The model's module tree on the meta device: structure only, no weights, no memory."""
    import torch

    from prunelab.models.loader import auto_class_for

    cls = auto_class_for(config, family, source)
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception as exc:
        first = first_line(exc)
        raise ModelLoadError(
            f"cannot build the architecture of {source} from its config.json ({first}): "
            "is it a transformers model?"
        ) from exc


def _kind_of_other(param_name: str, module: Any) -> str:
    from torch import nn

    cls = type(module).__name__
    module_leaf = param_name.rsplit(".", 2)[-2] if param_name.count(".") else ""
    if "Norm" in cls or "norm" in module_leaf.lower():
        return "norm"  # LayerNorm/RMSNorm scale and shift
    if isinstance(module, nn.Embedding) or "Embedding" in cls:
        return "embedding"
    if param_name.endswith(".bias"):
        return "bias"
    if "lm_head" in param_name or "proj_out" in param_name or param_name.startswith("cls.predictions"):
        return "lm_head"
    if "embed" in param_name.lower():
        return "embedding"
    return "other"


def classify_keys(
    keys: list[str], model: Any, family: Family, *, include_all: bool = False
) -> tuple[dict[str, TensorRole], list[str], list[str]]:
    """Roles of the checkpoint `keys` in scope, the keys matching no model parameter, and the
    prunable matrices of the model that no key provides.

    A key is matched as-is, with the model's `base_model_prefix` added, or with it removed.
    Unmatched keys are never analyzed (old checkpoints carry float buffers such as GPT-2's
    `attn.bias` causal mask, which are not weights); both lists go into stats.json.
    """
    from prunelab.models.discovery import find_prunable

    prunable = {m.param_name: m for m in find_prunable(model, family)}
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    prefix = getattr(model, "base_model_prefix", "") or ""
    roles: dict[str, TensorRole] = {}
    unmatched: list[str] = []
    found: set[str] = set()
    for key in keys:
        name = _match(key, params, prefix)
        if name is None:
            unmatched.append(key)
            continue
        pm = prunable.get(name)
        if pm is not None:
            found.add(name)
            roles[key] = TensorRole(key, pm.name, pm.stack, pm.block, pm.module_type, True)
        elif include_all:
            module_name = name.rsplit(".", 1)[0] if "." in name else ""
            module = model.get_submodule(module_name)
            block = _BLOCK.search(name)
            roles[key] = TensorRole(key, module_name, _stack_for(name, family),
                                    int(block.group(1)) if block else None, _kind_of_other(name, module), False)
    missing = [name for name in prunable if name not in found]
    return roles, unmatched, missing


def _match(key: str, params: set[str], prefix: str) -> str | None:
    if key in params:
        return key
    if prefix:
        if f"{prefix}.{key}" in params:
            return f"{prefix}.{key}"
        if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in params:
            return key[len(prefix) + 1 :]
    return None
