"""Model loading: families, prunable-matrix discovery, spec errors, zoo models."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from prunelab.errors import ModelLoadError
from prunelab.models import parse_spec, tiny_model
from prunelab.models.discovery import module_type_of
from prunelab.storage import load

EXPECTED = {
    # arch: (family, number of prunable matrices, module types)
    "gpt2": ("decoder", 8, {"qkv": 2, "o": 2, "up": 2, "down": 2}),
    "llama": ("decoder", 14, {"q": 2, "k": 2, "v": 2, "o": 2, "gate": 2, "up": 2, "down": 2}),
    "bert": ("encoder", 12, {"q": 2, "k": 2, "v": 2, "o": 2, "up": 2, "down": 2}),
    "bart": ("encoder-decoder", 32, {"q": 4, "k": 4, "v": 4, "o": 4, "up": 4, "down": 4,
                                     "cross_q": 2, "cross_k": 2, "cross_v": 2, "cross_o": 2}),
    "t5": ("encoder-decoder", 32, {"q": 4, "k": 4, "v": 4, "o": 4, "up": 4, "down": 4,
                                   "cross_q": 2, "cross_k": 2, "cross_v": 2, "cross_o": 2}),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_tiny_models_load_and_list(tiny_dirs, arch):
    family, n, types = EXPECTED[arch]
    lm = load(str(tiny_dirs[arch]))
    assert lm.family == family
    assert len(lm.prunable) == n
    assert Counter(m.module_type for m in lm.prunable) == types
    for m in lm.prunable:
        w = m.weight(lm.model)
        assert tuple(w.shape) == (m.out_features, m.in_features)
        assert m.block in (0, 1)
    stacks = {m.stack for m in lm.prunable}
    assert stacks == ({"encoder", "decoder"} if family == "encoder-decoder" else {family.split("-")[0]})
    # Cross-attention exists only in the decoder stack.
    assert all(m.stack == "decoder" for m in lm.prunable if m.module_type.startswith("cross_"))


def test_gpt2_conv1d_is_transposed(tiny_dirs):
    lm = load(str(tiny_dirs["gpt2"]))
    qkv = next(m for m in lm.prunable if m.module_type == "qkv")
    assert qkv.transposed and (qkv.in_features, qkv.out_features) == (64, 192)
    # weight() is a view: writing through it reaches the model's Conv1D parameter.
    with torch.no_grad():
        qkv.weight(lm.model)[5, 7] = 123.0
    assert lm.model.get_submodule(qkv.name).weight[7, 5].item() == 123.0


def test_embeddings_excluded_by_default_and_included_on_request(tiny_dirs):
    default = load(str(tiny_dirs["llama"]))
    assert not any("embed" in m.name or "lm_head" in m.name for m in default.prunable)
    full = load(str(tiny_dirs["llama"]), include_embeddings=True)
    extra = {m.module_type for m in full.prunable} - {m.module_type for m in default.prunable}
    assert "embedding" in extra
    assert len(full.prunable) > len(default.prunable)


def test_module_type_names():
    assert module_type_of("encoder.layer.3.attention.output.dense") == "o"
    assert module_type_of("encoder.layer.3.intermediate.dense") == "up"
    assert module_type_of("encoder.layer.3.output.dense") == "down"
    assert module_type_of("transformer.h.0.mlp.c_proj") == "down"
    assert module_type_of("transformer.h.0.attn.c_proj") == "o"
    assert module_type_of("decoder.block.1.layer.1.EncDecAttention.k") == "cross_k"
    assert module_type_of("model.decoder.layers.0.encoder_attn.out_proj") == "cross_o"


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("zoo:nope", "unknown zoo model"),
        ("./does/not/exist", "not found"),
        ("/tmp/missing.gguf", "GGUF file not found"),
        ("", "empty model spec"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, fragment):
    with pytest.raises(ModelLoadError) as info:
        parse_spec(spec)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_model("llama").config.to_dict()))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load(str(tmp_path))


def test_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Hugging Face Hub"):
        load("some-org/some-model-that-is-not-cached")


def test_cli_models_lists_zoo():
    from prunelab.cli import app

    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    assert "zoo:smollm2" in result.stdout and "zoo:minilm" in result.stdout


def test_zoo_minilm_is_a_real_encoder():
    lm = load("zoo:minilm")
    assert lm.family == "encoder" and type(lm.model).__name__ == "BertModel"
    assert len(lm.prunable) == 6 * 6
    assert lm.tokenizer is not None


@pytest.mark.slow
def test_zoo_smollm2_converts_once_and_reloads_fast():
    load("zoo:smollm2")  # converts on first use (cached afterwards)
    start = time.perf_counter()
    lm = load("zoo:smollm2")
    assert time.perf_counter() - start < 5.0  # "well under a second" on an idle machine
    assert lm.family == "decoder" and len(lm.prunable) == 30 * 7
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert torch.isfinite(logits).all()
    # A real model predicts far better than uniform over its 49 k vocabulary.
    text = "The quick brown fox jumps over the lazy dog. " * 4
    enc = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        loss = lm.model(**enc, labels=enc.input_ids).loss
    assert loss.item() < 4.0


def test_load_reads_a_sparse_checkpoint(tmp_path, tiny_dirs):
    """`load` treats a prunelab sparse checkpoint like any HF directory, bit-exactly."""
    import prunelab.models.loader
    from prunelab.storage import save

    assert not hasattr(prunelab.models.loader, "is_sparse_checkpoint")  # models/ knows nothing of storage/
    dense = load(str(tiny_dirs["llama"]))
    with torch.no_grad():
        for m in dense.prunable:
            w = m.weight(dense.model)
            w[w.abs() < w.abs().median()] = 0.0
    save(dense.model, tmp_path / "sparse", format="sparse", tokenizer=dense.tokenizer)
    back = load(str(tmp_path / "sparse"))
    assert back.family == "decoder" and len(back.prunable) == len(dense.prunable)
    ref = dense.model.state_dict()
    for k, v in back.model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_unknown_family_is_a_one_line_error():
    from transformers import ResNetConfig

    from prunelab.models import detect_family

    with pytest.raises(ModelLoadError, match="cannot tell the family"):
        detect_family(ResNetConfig())
