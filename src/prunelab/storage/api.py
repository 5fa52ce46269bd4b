"""The one way to write and read a model: `save`, `load`, `iter_tensors`.

Whatever the format on disk — a Hugging Face safetensors checkpoint or a prunelab sparse
checkpoint — a model is written with `save` and read back with `load` as the same
`LoadedModel`, and its weights are streamed with `iter_tensors`. `prunelab.models` resolves
specs and holds the dense `from_pretrained` path; this layer adds the compressed format on
top, so the models layer never needs to know about it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from prunelab.errors import ConfigError
from prunelab.io import atomic_dir
from prunelab.models import (
    detect_family,
    load_dense,
    loaded_model,
    parse_spec,
    read_config,
    resolve_source,
    weight_files,
)
from prunelab.models.offload import fp32_bytes, load_offloaded, resolve_device, should_offload
from prunelab.models.types import LoadedModel, ModelSpec
from prunelab.quant import QuantInfo
from prunelab.storage.checkpoint import (
    DEFAULT_SHARD_BYTES,
    copy_extra,
    is_sparse_checkpoint,
    iter_decoded,
    model_parts,
    sparse_model_quant,
    write_preprocessors,
    write_sparse,
)

Format = Literal["hf", "sparse"]
FORMATS: tuple[str, ...] = ("hf", "sparse")
HF_DEQUANTIZED_NOTE = ("--format hf stores the quantized weights dequantized, as float32 (no integers or scales: "
                       "full size); use --format sparse to store them as integers + scales")


class QuantizedAsFloatWarning(UserWarning):
    """`save(format="hf")` of a quantized model: written as the dequantized float32 weights."""


def save(
    lm_or_model: Any,
    directory: str | os.PathLike[str],
    *,
    format: Format = "hf",
    tokenizer: Any = None,
    extra_files: Iterable[str | os.PathLike[str]] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a model (HF model or LoadedModel) with its tokenizer/processor atomically to `directory`.

    `format="hf"`: `save_pretrained` with safetensors (loads with `AutoModel*.from_pretrained`);
    `format="sparse"`: every tensor in its smallest lossless encoding (see
    `prunelab.storage.checkpoint`; `max_shard_bytes` splits its weights files). `tokenizer`
    overrides the LoadedModel's; `extra_files` (files or folders) are copied in. The
    directory *replaces* `directory` as a whole. Returns `directory`. `load` reads both.

    A quantized LoadedModel (`lm.quant`) is stored as integers + scales by `sparse`; `hf` writes
    its dequantized float32 weights — what every HF tool can load, the same numbers, but full size
    and without the scales — and says so once (`QuantizedAsFloatWarning`).
    """
    if format == "sparse":
        return write_sparse(lm_or_model, directory, tokenizer=tokenizer, extra_files=extra_files,
                           max_shard_bytes=max_shard_bytes)
    if format != "hf":
        raise ConfigError(f"unknown --format '{format}': use {' or '.join(FORMATS)}")
    model, lm_tokenizer, processor = model_parts(lm_or_model)
    if getattr(lm_or_model, "quant", None):
        warnings.warn(HF_DEQUANTIZED_NOTE, QuantizedAsFloatWarning, stacklevel=2)
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_preprocessors(tmp, tokenizer if tokenizer is not None else lm_tokenizer, processor)
        reserved = {p.name for p in tmp.iterdir()}
        for extra in extra_files or ():
            copy_extra(Path(extra), tmp, reserved)
    return Path(directory)


def load(
    spec: str | os.PathLike[str] | ModelSpec,
    *,
    include_embeddings: bool = False,
    dtype: torch.dtype | None = torch.float32,
    trust_remote_code: bool = False,
    auto_class: Any = None,
    offload: bool | str = False,
    device: str = "cpu",
    max_memory: int | None = None,
) -> LoadedModel:
    """Load any model spec (zoo alias, local directory, .gguf, hub id), in eval mode, as a `LoadedModel`.

    A prunelab sparse checkpoint is decoded exactly into the normal HF model, so every later
    stage treats it like any other checkpoint; anything else goes through the dense
    `from_pretrained`. `trust_remote_code` stays off unless the user asks: a hub checkpoint
    must not run code. `include_embeddings` also lists embeddings as prunable. `dtype=None`
    keeps the dtype the weights are stored in. A quantized sparse checkpoint loads dequantized
    (float32 `q * s`, so every evaluation runs on what was stored) with `lm.quant` restored: its
    integers and scales come back bit for bit.

    `offload=True` (or "disk") leaves the weights on disk: the model is built on the meta device
    and each block is read when used (`prunelab.models.offload`), on `device`, within `max_memory`
    bytes; "auto" does so only when the float32 weights exceed `max_memory` (default: 80 % of the
    memory available now). In memory, `device` is where the model is moved after loading.
    """
    spec = parse_spec(spec if isinstance(spec, ModelSpec) else str(spec))
    if offload_mode(spec, offload, max_memory) == "disk":
        return load_offloaded(spec, device=device, max_memory=max_memory, dtype=dtype)
    target = resolve_device(device)
    source = resolve_source(spec)
    config = read_config(source)
    detect_family(config)  # an unsupported architecture fails here, before any weights are read
    quant: dict[str, QuantInfo] = {}
    if is_sparse_checkpoint(source):
        model, quant = sparse_model_quant(source, config, dtype=dtype, auto_class=auto_class)
    else:
        model = load_dense(source, config, label=spec.raw, dtype=dtype, trust_remote_code=trust_remote_code,
                           auto_class=auto_class)
    lm = loaded_model(model, spec, source, config, include_embeddings=include_embeddings)
    lm.quant = quant
    if target.type != "cpu":
        lm.model.to(target)
    return lm


def offload_mode(spec: ModelSpec, offload: bool | str, max_memory: int | None) -> str:
    """"disk" or "none" for `load(offload=...)`: True/"disk", False/"none", or "auto" by size."""
    mode = {True: "disk", False: "none"}.get(offload, offload)  # type: ignore[call-overload]
    if mode not in ("none", "disk", "auto"):
        raise ConfigError(f"unknown --offload {offload!r}: use none, disk or auto")
    if mode == "none":
        return mode
    source = resolve_source(spec)
    if is_sparse_checkpoint(source):
        if mode == "disk":
            raise ConfigError(f"{spec.raw} is a prunelab sparse checkpoint: it loads in memory only (--offload none)")
        return "none"
    if mode == "auto":
        return "disk" if should_offload(fp32_bytes(source), max_memory) else "none"
    return mode


def iter_tensors(directory: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, dense tensor) for every tensor stored in a checkpoint directory, one at a time.

    The same for every format: a sparse checkpoint's tensors are checksummed and decoded exactly
    (tied weights, stored once, come once; quantized ones dequantized to float32), an HF checkpoint's
    are read from its safetensors
    files. Only the current tensor is held, so a model larger than memory can be streamed.
    """
    directory = Path(directory)
    if is_sparse_checkpoint(directory):
        yield from iter_decoded(directory)
        return
    from safetensors import safe_open

    for f in weight_files(directory):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)
