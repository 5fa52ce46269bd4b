"""Models: resolve a spec, load dense weights, know a model's family and its prunable matrices.

The loader everything uses is `prunelab.storage.load` (it also decodes sparse checkpoints);
this package provides its dense steps (`resolve_source`, `load_dense`, `loaded_model`).
"""

from prunelab.models.discovery import find_prunable, module_type_of
from prunelab.models.family import detect_family
from prunelab.models.loader import (
    auto_class_for,
    load_dense,
    loaded_model,
    read_config,
    resolve_source,
    weight_files,
    wrap_model,
)
from prunelab.models.spec import parse_spec
from prunelab.models.tiny import TINY_ARCHS, byte_tokenizer, save_tiny, tiny_model
from prunelab.models.types import Family, LoadedModel, ModelSpec, PrunableMatrix
from prunelab.models.zoo import DEFAULT_MODELS, ZOO

__all__ = [
    "DEFAULT_MODELS", "TINY_ARCHS", "ZOO", "Family", "LoadedModel", "ModelSpec", "PrunableMatrix",
    "auto_class_for", "byte_tokenizer", "detect_family", "find_prunable", "load_dense", "loaded_model",
    "module_type_of", "parse_spec", "read_config", "resolve_source", "save_tiny", "tiny_model", "weight_files",
    "wrap_model",
]
