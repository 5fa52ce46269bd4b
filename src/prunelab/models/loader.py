"""Resolve any model spec to a local directory, and the dense `from_pretrained` path.

Every spec is first resolved to a local directory with `config.json` and safetensors
weights (`resolve_source`); a dense checkpoint then loads with the same `from_pretrained`
call for all of them (`load_dense`), and `loaded_model` turns the weights into a
`LoadedModel`. The one loader users call is `prunelab.storage.load`, which also decodes
prunelab's compressed checkpoints: this package knows nothing of those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import ModelLoadError, first_line
from prunelab.models.discovery import find_prunable
from prunelab.models.family import detect_family
from prunelab.models.spec import parse_spec
from prunelab.models.types import Family, LoadedModel, ModelSpec

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "*.tiktoken"]


def _download_from_hub(repo_id: str, *, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:
        reason = first_line(exc)
        raise ModelLoadError(
            f"cannot download '{repo_id}' from the Hugging Face Hub ({reason}); "
            "check the id and your network, or pass a local directory / zoo: alias"
        ) from exc


def resolve_source(spec: str | ModelSpec) -> Path:
    """Local checkpoint directory for a spec (downloading or converting into the cache if needed)."""
    spec = parse_spec(spec)
    if spec.kind == "zoo":
        from prunelab.models.zoo import resolve_zoo

        path = resolve_zoo(spec.target)
    elif spec.kind == "gguf":
        from prunelab.models.gguf import convert_gguf

        path = convert_gguf(spec.target)
    elif spec.kind == "hub":
        path = _download_from_hub(spec.target)
    else:
        path = Path(spec.target)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: pass a Hugging Face model directory")
    return path


def weight_files(source: Path) -> list[Path]:
    """The safetensors files of a checkpoint, or a clear error if it has none."""
    files = sorted(source.glob("*.safetensors"))
    if not files:
        if any(source.glob("*.bin")) or any(source.glob("*.pt")):
            raise ModelLoadError(
                f"{source} holds only pickle weights (.bin/.pt); prunelab reads safetensors for safety: "
                "convert with `model.save_pretrained(dir, safe_serialization=True)`"
            )
        raise ModelLoadError(f"{source} has no *.safetensors weights")
    return files


def read_config(source: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source))
    except (ValueError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise ModelLoadError(f"unreadable config in {source}: {str(exc).splitlines()[0]}") from exc


def _has_mlm_head(source: Path) -> bool:
    from safetensors import safe_open

    for f in weight_files(source):
        with safe_open(str(f), "pt") as fh:
            if any(k.startswith(("cls.predictions", "lm_head")) for k in fh.keys()):
                return True
    return False


def auto_class_for(config: Any, family: Family, source: Path | None = None) -> Any:
    """The transformers Auto class that keeps the checkpoint's language-model head.

    Decoders get their causal-LM head, encoder-decoders their seq2seq (or speech-seq2seq)
    head, encoders their MLM head only when the checkpoint has one (sentence encoders
    such as MiniLM do not, and a randomly initialised head would be worse than none).
    """
    import transformers as tf

    if family == "decoder":
        return tf.AutoModelForCausalLM
    if family == "encoder-decoder":
        if config.model_type in tf.models.auto.modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES:
            return tf.AutoModelForSpeechSeq2Seq
        return tf.AutoModelForSeq2SeqLM
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in archs) or (source is not None and _has_mlm_head(source)):
        return tf.AutoModelForMaskedLM
    return tf.AutoModel


def _load_preprocessors(source: Path, config: Any, family: Family) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    tokenizer = None
    processor = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except Exception:  # a checkpoint without a tokenizer is still analyzable and prunable
        tokenizer = None
    if getattr(config, "model_type", "") == "whisper":
        from transformers import WhisperFeatureExtractor

        try:
            processor = WhisperFeatureExtractor.from_pretrained(str(source))
        except Exception:
            processor = WhisperFeatureExtractor(feature_size=getattr(config, "num_mel_bins", 80))
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer, processor


def load_dense(
    source: Path,
    config: Any,
    *,
    label: str,
    dtype: torch.dtype | None = torch.float32,
    trust_remote_code: bool = False,
    auto_class: Any = None,
) -> torch.nn.Module:
    """The dense `from_pretrained` of a resolved checkpoint directory, in eval mode.

    `trust_remote_code` stays off unless the user asks: a hub checkpoint must not run code.
    `label` names the model in the error message (the user's spec, not the cache path);
    `dtype=None` keeps the stored dtype.
    """
    weight_files(source)
    cls = auto_class or auto_class_for(config, detect_family(config), source)
    try:
        model = cls.from_pretrained(
            str(source), dtype=dtype or "auto", trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except Exception as exc:
        first = first_line(exc)
        raise ModelLoadError(f"cannot load {label} with {cls.__name__}: {first}") from exc
    return model.eval()


def loaded_model(model: torch.nn.Module, spec: ModelSpec, source: Path, config: Any, *,
                 include_embeddings: bool = False) -> LoadedModel:
    """A `LoadedModel` for weights just loaded from `source`: its tokenizer/processor and prunable matrices.

    Whatever decoded the weights (dense `from_pretrained` or a compressed format), this is the
    same last step, so every stage sees the same kind of object.
    """
    family = detect_family(config)
    tokenizer, processor = _load_preprocessors(source, config, family)
    prunable = find_prunable(model, family, include_embeddings=include_embeddings)
    if not prunable:
        raise ModelLoadError(
            f"{spec.raw} has no prunable matrices (no nn.Linear/Conv1D inside numbered transformer "
            "blocks): is it a transformer?"
        )
    return LoadedModel(
        model=model.eval(), family=family, spec=spec, source=source,
        tokenizer=tokenizer, processor=processor, prunable=prunable,
    )


def wrap_model(
    model: torch.nn.Module,
    *,
    tokenizer: Any = None,
    processor: Any = None,
    source: Path | None = None,
    name: str = "in-memory",
    include_embeddings: bool = False,
) -> LoadedModel:
    """A `LoadedModel` around a model already in memory (tests, notebooks)."""
    family = detect_family(model.config)
    return LoadedModel(
        model=model.eval(), family=family, spec=ModelSpec(name, "local", str(source or name)),
        source=Path(source) if source else Path("."), tokenizer=tokenizer, processor=processor,
        prunable=find_prunable(model, family, include_embeddings=include_embeddings),
    )
