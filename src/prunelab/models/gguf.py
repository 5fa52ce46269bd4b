"""Dequantize a GGUF file once into a plain fp32 Hugging Face checkpoint in the cache.

transformers can read GGUF directly, but it dequantizes on every load (15+ s for a 135 M
model) and the result cannot be streamed by `analyze`. Converting once makes later loads
take a fraction of a second and gives every stage a safetensors checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from prunelab.errors import ModelLoadError
from prunelab.io import atomic_dir, file_sha256
from prunelab.paths import cache_dir


def convert_gguf(path: str | Path) -> Path:
    """Return the cached HF directory for `path`, converting it if needed."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (bad magic): pass a .gguf model file")
    key = file_sha256(path)[:16]  # the cache key: a changed file is converted again
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unsupported GGUF content
        raise ModelLoadError(f"cannot dequantize {path.name}: {type(exc).__name__}: {exc}") from exc
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); its tensors are
    # already dequantized fp32, so move them into a plain model built from the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "prunelab_source.json").write_text(
            json.dumps({"converted_from": str(path), "format": "gguf", "sha256_prefix": key}, indent=2)
        )
    return target
