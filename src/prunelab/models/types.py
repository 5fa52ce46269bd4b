"""The few types every stage speaks: a parsed model spec, a loaded model, a prunable matrix."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from prunelab.quant import QuantInfo

Family = Literal["encoder", "decoder", "encoder-decoder"]
Stack = Literal["encoder", "decoder"]
SpecKind = Literal["zoo", "local", "gguf", "hub"]

CONTEXT_ATTRS = (
    "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length", "max_target_positions",
)
SPEECH_MODEL_TYPES = frozenset({"whisper", "speech_to_text", "speecht5"})


def context_length(config: Any) -> int | None:
    """The longest sequence a model's position embeddings allow; None for relative positions (T5).

    The one place that knows which config attribute holds it: families spell it differently.
    """
    if getattr(config, "model_type", "") == "t5" or getattr(config, "relative_attention_num_buckets", None):
        return None
    for attr in CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_speech_config(config: Any) -> bool:
    """A speech model (audio in, text out), which needs a feature extractor rather than text input."""
    return getattr(config, "model_type", "") in SPEECH_MODEL_TYPES or hasattr(config, "num_mel_bins")


@dataclass(frozen=True)
class ModelSpec:
    """A user's model string, parsed: `zoo:<alias>`, a local directory, a `.gguf` file or a hub id."""

    raw: str
    kind: SpecKind
    target: str  # zoo alias, absolute path, or hub repo id

    def __str__(self) -> str:
        return self.raw


@dataclass(frozen=True)
class PrunableMatrix:
    """One weight matrix inside a transformer block that a pruning method may sparsify.

    `name` is the qualified module name (`model.layers.0.self_attn.q_proj`); the weight is
    `name + ".weight"`. GPT-2 style `Conv1D` stores its weight as (in, out): `transposed`
    says so, and `in_features`/`out_features` are always the logical ones.
    """

    name: str
    block: int
    stack: Stack
    module_type: str
    in_features: int
    out_features: int
    transposed: bool = False

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    def module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.name)

    def weight(self, model: nn.Module) -> torch.Tensor:
        """The weight in (out, in) orientation; a view, so writes reach the model."""
        w = self.module(model).weight
        return w.t() if self.transposed else w

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "block": self.block,
            "stack": self.stack,
            "module_type": self.module_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "transposed": self.transposed,
        }


@dataclass
class LoadedModel:
    """A model ready to prune or evaluate, with everything needed to feed it.

    `source` is a local directory holding `config.json` and safetensors weights (GGUF and
    CTranslate2 models are converted into the cache first), so every later stage can read
    the weights again without the original format.
    """

    model: nn.Module
    family: Family
    spec: ModelSpec
    source: Path
    tokenizer: Any = None
    processor: Any = None  # feature extractor for speech models
    prunable: list[PrunableMatrix] = field(default_factory=list)
    # Quantized matrices (module name of the Linear -> scheme and scales); the model's weights
    # then hold the dequantized values. Empty for a float model.
    quant: dict[str, QuantInfo] = field(default_factory=dict)
    # Out of core: the model lives on the meta device and `offload` reads each block's weights when
    # it is used (`prunelab.models.offload`); None for a model held in memory.
    offload: Any = None

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def name(self) -> str:
        return self.spec.raw

    @property
    def context_length(self) -> int | None:
        """Longest input sequence (None: relative positions, no fixed limit)."""
        return context_length(self.model.config)

    @property
    def is_speech(self) -> bool:
        return self.processor is not None or is_speech_config(self.model.config)

    def blocks(self, stack: Stack | None = None) -> list[tuple[Stack, int]]:
        """(stack, block) pairs in execution order: encoder blocks first, then decoder blocks."""
        seen: dict[tuple[Stack, int], None] = {}
        for m in self.prunable:
            if stack is None or m.stack == stack:
                seen[(m.stack, m.block)] = None
        order = {"encoder": 0, "decoder": 1}
        return sorted(seen, key=lambda sb: (order[sb[0]], sb[1]))
