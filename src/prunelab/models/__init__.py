"""Models: resolve a spec, load it, know its family and its prunable matrices."""

from prunelab.models.discovery import find_prunable, module_type_of
from prunelab.models.family import detect_family
from prunelab.models.loader import load_model, read_config, resolve_source, weight_files, wrap_model
from prunelab.models.spec import parse_spec
from prunelab.models.tiny import TINY_ARCHS, byte_tokenizer, save_tiny, tiny_model
from prunelab.models.types import Family, LoadedModel, ModelSpec, PrunableMatrix
from prunelab.models.zoo import DEFAULT_MODELS, ZOO

__all__ = [
    "DEFAULT_MODELS", "TINY_ARCHS", "ZOO", "Family", "LoadedModel", "ModelSpec", "PrunableMatrix",
    "byte_tokenizer", "detect_family", "find_prunable", "load_model", "module_type_of", "parse_spec",
    "read_config", "resolve_source", "save_tiny", "tiny_model", "weight_files", "wrap_model",
]
