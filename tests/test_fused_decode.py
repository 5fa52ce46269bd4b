"""fused_decode: the compiled decode step gives HF's logits and greedy tokens on the dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunelab.errors import ConfigError
from prunelab.models.types import LoadedModel
from prunelab.pruning import PruneConfig, prune
from prunelab.runtime.fused_decode import DecodeEngine
from prunelab.storage import load


def _hf_logits(lm: LoadedModel, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return lm.model(ids[None]).logits[0].float().numpy()


def _check(lm: LoadedModel, fast: bool | None = None, n: int = 24) -> DecodeEngine:
    eng = DecodeEngine.from_model(lm, fast=fast)
    ids = torch.randint(5, int(lm.config.vocab_size), (n,), generator=torch.Generator().manual_seed(0))
    ref = _hf_logits(lm, ids)
    out = eng.logits(ids)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    new = eng.generate(ids[:8], 8)
    with torch.no_grad():
        hf = lm.model.generate(ids[None, :8], max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert new == hf[0, 8:].tolist()
    return eng


@pytest.mark.parametrize("fast", [None, False], ids=["default", "scalar"])
@pytest.mark.parametrize("recipe", [
    {"method": "magnitude", "sparsity": 0.7, "quant": "int8"},
    {"method": "magnitude", "pattern": "2:4", "quant": "int4", "group_size": 64},
    {"method": "magnitude", "sparsity": 0.7},
], ids=["70-int8", "2of4-int4", "70-fp32"])
def test_matches_hf_on_tiny_llama(tiny_dirs, recipe: dict, fast: bool | None) -> None:
    lm = load(str(tiny_dirs["llama"]))
    prune(lm, PruneConfig(**recipe))
    eng = _check(lm, fast)
    if recipe.get("quant"):
        emb = lm.model.get_input_embeddings().weight  # untied here: the token embedding stays float
        assert eng.pack.fvals.size <= emb.numel() + 64  # no other fp32 matrix is kept


def test_odd_widths_untied_head_and_cache_growth(tmp_path) -> None:
    """hidden 48 (rows not whole 64-bit words: scalar rows), an untied head, > 256 positions (cache grows)."""
    import transformers as tf

    from prunelab.models.tiny import VOCAB_SIZE, byte_tokenizer

    cfg = tf.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=False, rope_theta=500.0, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    lm = load(str(tmp_path))
    prune(lm, PruneConfig(method="magnitude", sparsity=0.5, quant="int8", group_size=16))
    _check(lm, n=300)


def test_refuses_non_llama(tiny_dirs) -> None:
    lm = load(str(tiny_dirs["gpt2"]))
    with pytest.raises(ConfigError, match="Llama"):
        DecodeEngine.from_model(lm)


@pytest.mark.slow
def test_smollm2_first_tokens_match_hf() -> None:
    lm = load("zoo:smollm2")
    prune(lm, PruneConfig(method="magnitude", sparsity=0.7, quant="int8"))
    _check(lm, n=12)


def test_load_decoder_from_saved_quantized_checkpoint(tiny_dirs, tmp_path) -> None:
    """prune --quant → save(format="sparse") → load_decoder: same logits as the pruned model, no fp32 matrices."""
    from prunelab.runtime import load_decoder
    from prunelab.storage import save

    lm = load(str(tiny_dirs["llama"]))
    prune(lm, PruneConfig(method="magnitude", sparsity=0.7, quant="int8"))
    save(lm, tmp_path / "q", format="sparse")
    eng = load_decoder(str(tmp_path / "q"))
    ids = torch.arange(5, 25)
    ref = _hf_logits(lm, ids)
    assert np.abs(eng.logits(ids) - ref).max() <= 1e-4 * np.abs(ref).max()
    assert eng.tokenizer is not None
    assert eng.pack.fvals.size <= lm.model.get_input_embeddings().weight.numel() + 64


@pytest.mark.slow
def test_smollm2_resident_weights_within_stored_bytes(tmp_path) -> None:
    """Issue 14: the engine's resident weights ≤ 1.1 × the stored weights file, loaded in a fresh process."""
    import json
    import subprocess
    import sys

    from prunelab.storage import save

    lm = load("zoo:smollm2")
    prune(lm, PruneConfig(method="magnitude", sparsity=0.7, quant="int8"))
    folder = save(lm, tmp_path / "q", format="sparse")
    del lm
    code = ("import json,sys; from prunelab.runtime import load_decoder; "
            "e = load_decoder(sys.argv[1]); print(json.dumps(e.resident_bytes))")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    resident = json.loads(out.stdout.strip().splitlines()[-1])
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert resident <= 1.1 * stored
