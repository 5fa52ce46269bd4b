"""Tiny randomly initialised models (2 layers, width 64) of every family, for fast tests.

They come with a byte-level tokenizer built in-process (no download), so every stage —
calibration, perplexity, probes — runs on them exactly as on a real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prunelab.errors import ConfigError

TINY_ARCHS = ("gpt2", "llama", "bert", "bart", "t5")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
N_SENTINELS = 8  # T5 span-corruption sentinels <extra_id_0..7>
VOCAB_SIZE = 256 + len(SPECIALS) + N_SENTINELS  # 269
PAD, BOS, EOS, UNK, MASK = range(len(SPECIALS))


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_alphabet):
        vocab[ch] = len(vocab)
    sentinels = [f"<extra_id_{i}>" for i in range(N_SENTINELS)]
    for s in sentinels:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", mask_token="<mask>", additional_special_tokens=sentinels,
    )
    fast.model_max_length = 128
    return fast


def tiny_config(arch: str) -> Any:
    """A 2-layer, width-64 config of `arch` using the byte tokenizer's vocabulary."""
    import transformers as tf

    common: dict[str, Any] = {"vocab_size": VOCAB_SIZE, "pad_token_id": PAD, "bos_token_id": BOS,
                              "eos_token_id": EOS}
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common,
                             architectures=["GPT2LMHeadModel"])
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              architectures=["LlamaForCausalLM"], **common)
    if arch == "bert":
        return tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=128,
                             architectures=["BertForMaskedLM"], vocab_size=VOCAB_SIZE, pad_token_id=PAD)
    if arch == "bart":
        return tf.BartConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                             max_position_embeddings=128, decoder_start_token_id=EOS,
                             forced_eos_token_id=EOS, architectures=["BartForConditionalGeneration"], **common)
    if arch == "t5":
        return tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                           vocab_size=VOCAB_SIZE, pad_token_id=PAD, eos_token_id=EOS,
                           decoder_start_token_id=PAD, architectures=["T5ForConditionalGeneration"])
    raise ConfigError(f"unknown tiny architecture '{arch}': choose one of {', '.join(TINY_ARCHS)}")


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model with its LM head, deterministic given `seed`."""
    import transformers as tf

    config = tiny_config(arch)
    torch.manual_seed(seed)
    cls = {
        "gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM, "bert": tf.BertForMaskedLM,
        "bart": tf.BartForConditionalGeneration, "t5": tf.T5ForConditionalGeneration,
    }[arch]
    return cls(config).eval()


def save_tiny(arch: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer as a normal HF checkpoint directory."""
    directory = Path(directory)
    model = tiny_model(arch, seed)
    model.save_pretrained(directory, safe_serialization=True)
    byte_tokenizer().save_pretrained(directory)
    return directory
