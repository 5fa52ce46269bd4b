"""Parse a model string into a `ModelSpec` without touching the network."""

from __future__ import annotations

import re
from pathlib import Path

from prunelab.errors import ModelLoadError
from prunelab.models.types import ModelSpec

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def parse_spec(raw: str | ModelSpec) -> ModelSpec:
    """Decide what kind of model a string names.

    Local paths win over hub ids so that `./gpt2` is never downloaded by accident.
    """
    if isinstance(raw, ModelSpec):
        return raw
    text = str(raw).strip()
    if not text:
        raise ModelLoadError("empty model spec: pass zoo:<alias>, a local directory, a .gguf file or a hub id")
    if text.startswith("zoo:"):
        from prunelab.models.zoo import ZOO

        alias = text[4:]
        if alias not in ZOO:
            known = ", ".join(f"zoo:{a}" for a in ZOO)
            raise ModelLoadError(f"unknown zoo model '{text}': choose one of {known}")
        return ModelSpec(text, "zoo", alias)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return ModelSpec(text, "gguf", str(path.resolve()))
    if path.exists():
        if path.is_file():
            raise ModelLoadError(
                f"'{text}' is a file, not a model: pass the directory that holds config.json, or a .gguf file"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"'{text}' has no config.json: pass a Hugging Face model directory")
        return ModelSpec(text, "local", str(path.resolve()))
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_like_path or not _HUB_ID.match(text):
        raise ModelLoadError(f"model path not found: {text}")
    return ModelSpec(text, "hub", text)
