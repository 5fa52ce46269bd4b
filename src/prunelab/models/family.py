"""Tell encoder, decoder and encoder-decoder models apart from their config alone."""

from __future__ import annotations

from typing import Any

from prunelab.errors import ModelLoadError
from prunelab.models.types import Family

# model_type values whose config does not say is_encoder_decoder but which are encoders.
_ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
    "mpnet", "camembert", "modernbert", "ernie", "nomic_bert", "xlm", "megatron-bert", "esm",
}


def detect_family(config: Any) -> Family:
    """`encoder-decoder` if the config says so; `encoder` for BERT-likes; `decoder` otherwise.

    Decoders are recognised positively (a causal-LM architecture or `is_decoder`) so that a
    config we do not understand is an error rather than a silent guess.
    """
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    model_type = getattr(config, "model_type", "")
    archs = [a for a in (getattr(config, "architectures", None) or [])]
    if model_type in _ENCODER_TYPES or any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs):
        return "encoder"
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "decoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    raise ModelLoadError(
        f"cannot tell the family of model_type '{model_type}': prunelab handles encoder, decoder "
        "and encoder-decoder transformers"
    )
