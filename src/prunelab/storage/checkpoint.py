"""The sparse checkpoint directory: write it atomically, read it back strictly.

Layout of a sparse checkpoint directory::

    sparse_index.json               format name + version, and per tensor: encoding, shape,
                                    dtype, nnz, dense/stored bytes, its component tensors
                                    (name, dtype, shape, crc32) and the shard file holding them
    model.sparse.safetensors        the component tensors (`<tensor>::<component>`), or
    model.sparse-00001-of-0000N.safetensors  when sharded
    config.json, generation_config.json, tokenizer files, anything passed as extra_files

The weights file is plain safetensors (no pickle) but deliberately *not* named
`model.safetensors`: `from_pretrained` must not mistake the encoded components for weights.
Tied weights (e.g. `lm_head.weight` sharing `embed_tokens.weight`) are stored once; the index
records the alias and loading re-ties them.
The matrices of a quantized model (`LoadedModel.quant`) are stored as integers + a `scales`
component (`encodings.encode_quantized`, params `quant`/`bits`/`group_size`/`transposed`);
loading gives the dequantized float32 weights and the `QuantInfo` of every owner module back.

Reading streams tensor by tensor (`iter_encoded`): the index is schema-checked, every shard
header is parsed by the one safetensors parser (`models.header`) and checked against the index
(so a truncated file names the tensor whose bytes are missing), every component is checksummed
and every tensor structurally validated. Loading a model (`sparse_model`, the sparse step of
`prunelab.storage.load`) is all-or-nothing: everything is decoded and checked *before* the model
is built. Any problem is a `CheckpointError` naming the tensor.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import CheckpointError, ConfigError, first_line
from prunelab.io import atomic_dir, write_json
from prunelab.models import auto_class_for, detect_family, find_prunable
from prunelab.models.header import TORCH_DTYPES, TensorInfo, read_header
from prunelab.quant import QuantInfo
from prunelab.storage.encodings import (
    ENCODINGS,
    EncodedTensor,
    dtype_from_name,
    dtype_name,
    encode_quantized,
    encode_tensor,
)

FORMAT_NAME = "prunelab-sparse"
FORMAT_VERSION = 1
INDEX_NAME = "sparse_index.json"
WEIGHTS_STEM = "model.sparse"
DEFAULT_SHARD_BYTES = 4 << 30
_SEP = "::"
_RESERVED = {INDEX_NAME, "config.json"}


def is_sparse_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """True if `directory` holds a prunelab sparse checkpoint (its index file or its weights files).

    Existence is enough on purpose: a directory with a damaged or missing index should go to the
    sparse reader, which says what is wrong, rather than to the dense loader.
    """
    directory = Path(directory)
    return (directory / INDEX_NAME).is_file() or any(directory.glob(f"{WEIGHTS_STEM}*.safetensors"))


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(-1).view(torch.uint8).numpy()) if t.numel() else 0


# -- writing -------------------------------------------------------------------------------------


def model_parts(model_or_lm: Any) -> tuple[torch.nn.Module, Any, Any]:
    """(HF model, tokenizer, processor) of a Hugging Face model or a LoadedModel."""
    if hasattr(model_or_lm, "model") and hasattr(model_or_lm, "prunable"):
        return model_or_lm.model, model_or_lm.tokenizer, model_or_lm.processor
    if not isinstance(model_or_lm, torch.nn.Module) or getattr(model_or_lm, "config", None) is None:
        raise ConfigError("saving needs a Hugging Face model (with .config) or a LoadedModel")
    return model_or_lm, None, None


def _prunable_types(model_or_lm: Any, model: torch.nn.Module) -> tuple[set[str], dict[str, str]]:
    """Names of the prunable weights, and their module types when a LoadedModel says so."""
    if hasattr(model_or_lm, "prunable"):
        return {m.param_name for m in model_or_lm.prunable}, {m.param_name: m.module_type for m in model_or_lm.prunable}
    try:
        prunable = {m.param_name for m in find_prunable(model, detect_family(model.config))}
    except Exception:  # not a transformer prunelab understands: still storable, just unlabelled
        prunable = set()
    return prunable, {}


def _unique_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without tied duplicates, plus {alias name: stored name}."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        if t.device.type == "meta":
            raise ConfigError(f"tensor {name} is on the meta device: load the model's weights before saving")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu")
    return tensors, aliases


def encode_state(tensors: dict[str, torch.Tensor], *, progress: Any = None,
                 quant: dict[str, tuple[QuantInfo, bool]] | None = None) -> dict[str, EncodedTensor]:
    """Encode every tensor in its smallest lossless form (in memory; nothing is written).

    `quant` (tensor name → (QuantInfo, transposed)) marks the tensors stored as integers + scales.
    """
    out = {}
    quant = quant or {}
    for name, t in tensors.items():
        if name in quant:
            info, transposed = quant[name]
            out[name] = encode_quantized(t, name, info, transposed=transposed)
        else:
            out[name] = encode_tensor(t, name)
        if progress is not None:
            progress(name)
    return out


def quantized_tensors(model_or_lm: Any, model: torch.nn.Module,
                      aliases: dict[str, str]) -> dict[str, tuple[QuantInfo, bool]]:
    """{stored tensor name: (QuantInfo, transposed)} from a LoadedModel's `quant` (module names).

    A tied tensor is stored once under one name; its quantization may be recorded under any owner.
    `transposed`: the module is a GPT-2 `Conv1D`, whose weight is stored `(in, out)`.
    """
    out: dict[str, tuple[QuantInfo, bool]] = {}
    for module_name, info in (getattr(model_or_lm, "quant", None) or {}).items():
        param = f"{module_name}.weight"
        transposed = type(model.get_submodule(module_name)).__name__ == "Conv1D"
        out[aliases.get(param, param)] = (info, transposed)
    return out


def copy_extra(src: Path, tmp: Path, reserved: set[str]) -> None:
    """Copy a user's extra file or folder into the checkpoint, refusing to overwrite its own files."""
    if src.name in reserved or src.name.startswith(WEIGHTS_STEM):
        raise ConfigError(f"extra file {src} would overwrite the checkpoint's own {src.name}: rename it")
    if src.is_dir():
        shutil.copytree(src, tmp / src.name, dirs_exist_ok=True)
    elif src.is_file():
        shutil.copy2(src, tmp / src.name)
    else:
        raise ConfigError(f"extra file {src} does not exist")


def _index_entry(enc: EncodedTensor, comps: dict[str, Any], prunable: bool, module_type: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "encoding": enc.encoding,
        "shape": list(enc.shape),
        "dtype": dtype_name(enc.dtype),
        "nnz": enc.nnz,
        "dense_bytes": enc.dense_bytes,
        "stored_bytes": enc.stored_bytes,
        "params": enc.params,
        "components": comps,
        "prunable": prunable,
    }
    if module_type is not None:
        entry["module_type"] = module_type
    return entry


def _pack_shards(encoded: dict[str, EncodedTensor], prunable: set[str], module_types: dict[str, str],
                 max_shard_bytes: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """Components packed into shards in state-dict order, and each tensor's index entry (with its shard number)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    entries: dict[str, dict[str, Any]] = {}
    for name, enc in encoded.items():
        if shards[-1] and shard_bytes + enc.stored_bytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        comps = {}
        for cname, ct in enc.components.items():
            key = f"{name}{_SEP}{cname}"
            ct = ct.contiguous()
            shards[-1][key] = ct
            comps[cname] = {"key": key, "dtype": dtype_name(ct.dtype), "shape": list(ct.shape), "crc32": _crc(ct)}
        shard_bytes += enc.stored_bytes
        entries[name] = _index_entry(enc, comps, name in prunable, module_types.get(name))
        entries[name]["file"] = len(shards) - 1  # replaced by the file name once the shard count is known
    return shards, entries


def _shard_names(n_shards: int) -> list[str]:
    if n_shards == 1:
        return [f"{WEIGHTS_STEM}.safetensors"]
    return [f"{WEIGHTS_STEM}-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]


def _build_index(model: torch.nn.Module, tensors: dict[str, torch.Tensor], entries: dict[str, dict[str, Any]],
                 names: list[str], aliases: dict[str, str], prunable: set[str]) -> dict[str, Any]:
    for entry in entries.values():
        entry["file"] = names[entry["file"]]
    for alias, target in aliases.items():
        entries[alias] = {"alias_of": target, "prunable": alias in prunable}
    float_dtypes = [t.dtype for t in tensors.values() if t.is_floating_point()]
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "dtype": dtype_name(float_dtypes[0]) if float_dtypes else None,
        "files": names,
        "tensors": entries,
    }


def write_sparse(
    model_or_loaded: Any,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    extra_files: Iterable[str | os.PathLike[str]] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write `model_or_loaded` (HF model or LoadedModel) as a sparse checkpoint at `out_dir`.

    Every tensor of the state dict gets its smallest lossless encoding; config.json,
    generation_config.json (generative models) and the tokenizer / processor (from the
    LoadedModel, or `tokenizer=`) are written beside it, then `extra_files` (files or
    folders) are copied in. The directory is written atomically and *replaces* `out_dir` as a
    whole: write other files into it afterwards, or pass them as `extra_files`.
    Returns `out_dir`. (Public entry point: `prunelab.storage.save(..., format="sparse")`.)
    """
    from safetensors.torch import save_file

    model, lm_tok, processor = model_parts(model_or_loaded)
    prunable, module_types = _prunable_types(model_or_loaded, model)
    tensors, aliases = _unique_state(model)
    quant = quantized_tensors(model_or_loaded, model, aliases)
    shards, entries = _pack_shards(encode_state(tensors, quant=quant), prunable, module_types, max_shard_bytes)
    names = _shard_names(len(shards))
    index = _build_index(model, tensors, entries, names, aliases, prunable)
    reserved = _RESERVED | set(names)
    with atomic_dir(out_dir) as tmp:
        for fname, shard in zip(names, shards, strict=True):
            save_file(shard, str(tmp / fname), metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION)})
        save_config(model, tmp)
        write_preprocessors(tmp, tokenizer if tokenizer is not None else lm_tok, processor)
        for extra in extra_files or ():
            copy_extra(Path(extra), tmp, reserved)
        write_json(tmp / INDEX_NAME, index)
    return Path(out_dir)


def write_preprocessors(directory: Path, tokenizer: Any, processor: Any) -> None:
    """The tokenizer and feature extractor beside the weights, so the checkpoint loads on its own."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    if processor is not None:
        processor.save_pretrained(str(directory))


def save_config(model: Any, tmp: Path) -> None:
    """config.json (with architectures/dtype as save_pretrained writes them) + generation config."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    try:
        config.dtype = str(next(model.parameters()).dtype).split(".")[1]
    except StopIteration:  # pragma: no cover - a model without parameters
        pass
    config.save_pretrained(str(tmp))
    gen = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)()
    if gen is not None and can_generate:
        gen.save_pretrained(str(tmp))


# -- reading -------------------------------------------------------------------------------------


def _read_index(directory: Path) -> dict[str, Any]:
    path = directory / INDEX_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {INDEX_NAME}: not a prunelab sparse checkpoint")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): the sparse checkpoint is corrupt") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a {FORMAT_NAME} index (format={index.get('format')!r})"
                              if isinstance(index, dict) else f"{path} is not a {FORMAT_NAME} index")
    version = index.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version!r}; this prunelab reads version {FORMAT_VERSION}: upgrade prunelab"
        )
    files, tensors = index.get("files"), index.get("tensors")
    if not isinstance(files, list) or not all(isinstance(f, str) and "/" not in f for f in files):
        raise CheckpointError(f"{path}: 'files' must be a list of file names")
    if not isinstance(tensors, dict) or not tensors:
        raise CheckpointError(f"{path}: 'tensors' must be a non-empty object")
    for name, e in tensors.items():
        _check_entry(name, e, tensors, files)
    return index


def _check_entry(name: str, e: Any, tensors: dict[str, Any], files: list[str]) -> None:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"tensor {name}: {what} in {INDEX_NAME} (sparse checkpoint is corrupt; re-save it)")

    if not isinstance(e, dict):
        raise bad("entry is not an object")
    if "alias_of" in e:
        target = tensors.get(e["alias_of"])
        if not isinstance(target, dict) or "alias_of" in target:
            raise bad(f"alias_of {e['alias_of']!r} names no stored tensor")
        return
    if e.get("encoding") not in ENCODINGS:
        raise bad(f"unknown encoding {e.get('encoding')!r}")
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad("shape is not a list of non-negative integers")
    dtype_from_name(e.get("dtype"), name)
    nnz = e.get("nnz")
    if not isinstance(nnz, int) or not 0 <= nnz <= math.prod(shape):
        raise bad(f"nnz {nnz!r} is outside 0..numel")
    if e.get("file") not in files:
        raise bad(f"file {e.get('file')!r} is not one of the checkpoint's files")
    if not isinstance(e.get("params", {}), dict):
        raise bad("params is not an object")
    comps = e.get("components")
    if not isinstance(comps, dict) or not comps:
        raise bad("components missing")
    for cname, c in comps.items():
        if not (isinstance(c, dict) and isinstance(c.get("key"), str) and isinstance(c.get("shape"), list)
                and isinstance(c.get("crc32"), int)):
            raise bad(f"component {cname!r} is malformed")
        dtype_from_name(c.get("dtype"), name)
    for key in ("dense_bytes", "stored_bytes"):
        if not isinstance(e.get(key), int):
            raise bad(f"{key} missing")


def read_index(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The schema-checked index of a sparse checkpoint (a `CheckpointError` naming what is wrong)."""
    return _read_index(Path(directory))


def _shard_header(path: Path, owner: dict[str, str]) -> dict[str, TensorInfo]:
    """A shard's components by key, header checked, so truncation and damage name the tensor affected."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path.name} is missing from {path.parent}: the sparse checkpoint is "
                              "incomplete")
    infos = read_header(path, tensor_of=lambda key: owner.get(key, key.split(_SEP)[0]))
    return {info.name: info for info in infos}


def iter_encoded(directory: str | os.PathLike[str], index: dict[str, Any] | None = None, *, verify: bool = True,
                 structure: bool = True) -> Iterator[tuple[str, EncodedTensor]]:
    """Every stored tensor in its encoded form (no densifying), one at a time; aliases are not repeated.

    With `verify` (default) each component's CRC-32 is checked, and with `structure` each tensor
    is structurally validated (`EncodedTensor.validate`; decoding validates anyway, so decoders
    skip it). Only one tensor's components are held at a time, so checking a whole checkpoint
    costs the memory of its largest tensor.
    """
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    index = index if index is not None else _read_index(directory)
    entries = index["tensors"]
    owner = {c["key"]: name for name, e in entries.items() if "components" in e for c in e["components"].values()}
    by_file: dict[str, list[str]] = {}
    for name, e in entries.items():
        if "alias_of" not in e:
            by_file.setdefault(e["file"], []).append(name)
    for fname, names in by_file.items():
        path = directory / fname
        header = _shard_header(path, owner)
        try:
            fh_ctx = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{fname} is unreadable ({exc}): the sparse checkpoint is corrupt") from exc
        with fh_ctx as fh:
            for name in names:
                yield name, _read_one(name, entries[name], header, fh, fname, verify, structure)


def _read_component(name: str, cname: str, c: dict[str, Any], header: dict[str, TensorInfo], fh: Any,
                    fname: str, verify: bool) -> torch.Tensor:
    from safetensors import SafetensorError

    key = c["key"]
    info = header.get(key)
    if info is None:
        raise CheckpointError(f"tensor {name}: component {key} is missing from {fname}")
    want_dtype = dtype_from_name(c["dtype"], name)
    if TORCH_DTYPES.get(info.dtype) != want_dtype or list(info.shape) != c["shape"]:
        raise CheckpointError(
            f"tensor {name}: component {cname} is {info.dtype} {list(info.shape)} in {fname} but the "
            f"index says {c['dtype']} {c['shape']}"
        )
    try:
        t = fh.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"tensor {name}: component {cname} is unreadable ({exc})") from exc
    if verify and _crc(t) != c["crc32"]:
        raise CheckpointError(f"tensor {name}: component {cname} fails its checksum (corrupt file {fname}; "
                              "re-save the checkpoint)")
    return t


def _read_one(name: str, e: dict[str, Any], header: dict[str, TensorInfo], fh: Any, fname: str,
              verify: bool, structure: bool) -> EncodedTensor:
    comps = {cname: _read_component(name, cname, c, header, fh, fname, verify) for cname, c in e["components"].items()}
    enc = EncodedTensor(
        name=name, encoding=e["encoding"], shape=tuple(e["shape"]), dtype=dtype_from_name(e["dtype"], name),
        nnz=e["nnz"], components=comps, params=dict(e.get("params", {})),
    )
    if verify:
        if structure:
            enc.validate()
        if enc.stored_bytes != e["stored_bytes"] or enc.dense_bytes != e["dense_bytes"]:
            raise CheckpointError(f"tensor {name}: stored/dense byte counts disagree with the index")
    return enc


def iter_decoded(directory: str | os.PathLike[str], index: dict[str, Any] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stored tensor decoded exactly, one at a time (checksummed; decoding validates structure)."""
    for name, enc in iter_encoded(directory, index, structure=False):
        yield name, enc.to_dense()


def _decode_state(directory: Path, index: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, QuantInfo]]:
    """The full state dict, decoded (tied names share one tensor), and the quantized modules'
    `QuantInfo` by module name (every owner of a tied tensor). All-or-nothing."""
    out: dict[str, torch.Tensor] = {}
    quant: dict[str, QuantInfo] = {}
    for name, enc in iter_encoded(directory, index, structure=False):
        out[name] = enc.to_dense()
        if enc.quantized:
            quant[name.removesuffix(".weight")] = enc.quant_info()
    for name, e in index["tensors"].items():
        if "alias_of" in e:
            out[name] = out[e["alias_of"]]
            target = e["alias_of"].removesuffix(".weight")
            if target in quant:
                quant[name.removesuffix(".weight")] = quant[target]
    return out, quant


def _model_class(config: Any, state: dict[str, torch.Tensor], auto_class: Any) -> Any:
    """The saved transformers class when it exists, else the Auto class prunelab's loader would pick."""
    import transformers as tf

    if auto_class is not None:
        return auto_class
    archs = getattr(config, "architectures", None) or []
    cand = getattr(tf, archs[0], None) if archs else None
    if isinstance(cand, type) and issubclass(cand, tf.PreTrainedModel):
        return cand
    family = detect_family(config)
    cls = auto_class_for(config, family, None)
    if family == "encoder" and any(k.startswith(("cls.predictions", "lm_head")) for k in state):
        cls = tf.AutoModelForMaskedLM
    return cls


def _generation_config(directory: Path) -> Any:
    import transformers as tf

    if not (directory / "generation_config.json").is_file():
        return None
    try:
        return tf.GenerationConfig.from_pretrained(str(directory))
    except (OSError, ValueError):
        return None


def _check_loading_info(directory: Path, cls: Any, info: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    missing = [k for k in info.get("missing_keys", []) if k not in state]
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        what = (f"tensor {missing[0]} is missing" if missing else
                f"tensor {unexpected[0]} is not part of {cls.__name__}" if unexpected else
                f"tensor {mismatched[0]} has the wrong shape")
        raise CheckpointError(f"{directory}: {what} (checkpoint does not match its config.json)")


def sparse_model(directory: str | os.PathLike[str], config: Any, *, dtype: torch.dtype | None = None,
                 auto_class: Any = None) -> torch.nn.Module:
    """The Hugging Face model of a sparse checkpoint; see `sparse_model_quant`."""
    return sparse_model_quant(directory, config, dtype=dtype, auto_class=auto_class)[0]


def sparse_model_quant(directory: str | os.PathLike[str], config: Any, *, dtype: torch.dtype | None = None,
                       auto_class: Any = None) -> tuple[torch.nn.Module, dict[str, QuantInfo]]:
    """The Hugging Face model of a sparse checkpoint (eval mode), weights decoded exactly: `storage.load`'s sparse step.

    The class is the saved one (`config.architectures[0]`, a transformers class) when it
    exists, else the Auto class prunelab's loader would pick for the config's family. The
    model is built on the meta device by `from_pretrained(None, config=..., state_dict=...)`,
    so no memory goes into a random initialisation, and tied weights are re-tied by
    transformers. `dtype=None` keeps the stored dtype. Everything is decoded and checked
    before the model is built; a missing or unexpected tensor is a `CheckpointError`.

    Also returns the quantized modules' scheme and scales (`LoadedModel.quant`): their weights are
    the dequantized float32 values; with a `dtype` other than float32 they are no longer on the
    grid, so the quantization is dropped (empty dict).
    """
    directory = Path(directory)
    index = _read_index(directory)
    state, quant = _decode_state(directory, index)
    cls = _model_class(config, state, auto_class)
    stored = index.get("dtype")
    target = dtype or (dtype_from_name(stored) if stored else torch.float32)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    try:
        model, info = cls.from_pretrained(
            None, config=config, state_dict=state, dtype=target, generation_config=_generation_config(directory),
            output_loading_info=True,
        )
    except Exception as exc:
        first = first_line(exc)
        raise CheckpointError(f"cannot build {cls.__name__} from the sparse checkpoint {directory}: {first}") from exc
    _check_loading_info(directory, cls, info, state)
    model.config.name_or_path = str(directory)
    return model.eval(), (quant if target == torch.float32 else {})


def checkpoint_file_bytes(directory: str | os.PathLike[str]) -> dict[str, int]:
    """Size on disk of each file in the checkpoint directory (recursively), by relative path."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}

