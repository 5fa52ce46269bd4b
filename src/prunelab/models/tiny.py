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


# Width 32 (4 heads of 8), 2 layers, FFN 64: the smallest shapes every architecture accepts, so
# that a test can build a few dozen of them in seconds. Keys are transformers' model_type values.
_H, _FFN, _LAYERS, _HEADS = 32, 64, 2, 4


def _hub_table() -> dict[str, tuple[str, str, dict[str, Any]]]:
    """model_type -> (config class, model class with its LM head, config arguments)."""
    ids = {"vocab_size": VOCAB_SIZE, "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
    llama = dict(hidden_size=_H, intermediate_size=_FFN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
                 num_key_value_heads=2, max_position_embeddings=128, **ids)
    gemma = dict(llama, head_dim=8, sliding_window=16)
    gpt = dict(n_embd=_H, n_layer=_LAYERS, n_head=_HEADS, n_positions=128, **ids)
    bert = dict(hidden_size=_H, intermediate_size=_FFN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
                max_position_embeddings=130, vocab_size=VOCAB_SIZE, pad_token_id=PAD)
    t5 = dict(d_model=_H, d_kv=8, d_ff=_FFN, num_layers=_LAYERS, num_decoder_layers=_LAYERS, num_heads=_HEADS,
              vocab_size=VOCAB_SIZE, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)
    bart = dict(d_model=_H, encoder_layers=_LAYERS, decoder_layers=_LAYERS, encoder_attention_heads=_HEADS,
                decoder_attention_heads=_HEADS, encoder_ffn_dim=_FFN, decoder_ffn_dim=_FFN,
                max_position_embeddings=128, decoder_start_token_id=EOS, **ids)
    return {
        # decoders
        "llama": ("LlamaConfig", "LlamaForCausalLM", llama),
        "mistral": ("MistralConfig", "MistralForCausalLM", llama),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", llama),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(llama, head_dim=8)),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(llama, head_dim=8)),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", gemma),
        "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", gemma),
        "phi": ("PhiConfig", "PhiForCausalLM", llama),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", llama),
        "stablelm": ("StableLmConfig", "StableLmForCausalLM", llama),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", llama),
        "granite": ("GraniteConfig", "GraniteForCausalLM", llama),
        "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", llama),
        "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", llama),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", gpt),
        "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", gpt),
        "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(gpt, rotary_dim=4)),
        "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(gpt, n_ctx=128, rotary_dim=4)),
        "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM",
                    dict(hidden_size=_H, num_layers=_LAYERS, num_heads=_HEADS, window_size=16,
                         attention_types=[[["global", "local"], 1]], max_position_embeddings=128, **ids)),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                     dict(hidden_size=_H, intermediate_size=_FFN, num_hidden_layers=_LAYERS,
                          num_attention_heads=_HEADS, max_position_embeddings=128, **ids)),
        "opt": ("OPTConfig", "OPTForCausalLM",
                dict(hidden_size=_H, ffn_dim=_FFN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
                     word_embed_proj_dim=_H, max_position_embeddings=128, **ids)),
        "falcon": ("FalconConfig", "FalconForCausalLM",
                   dict(hidden_size=_H, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS, **ids)),
        "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=_H, n_layer=_LAYERS, n_head=_HEADS, **ids)),
        "olmo": ("OlmoConfig", "OlmoForCausalLM", llama),
        "cohere": ("CohereConfig", "CohereForCausalLM", llama),
        "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(llama, sliding_window=16)),
        "xglm": ("XGLMConfig", "XGLMForCausalLM",
                 dict(d_model=_H, num_layers=_LAYERS, attention_heads=_HEADS, ffn_dim=_FFN,
                      max_position_embeddings=128, **ids)),
        "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", llama),
        "nemotron": ("NemotronConfig", "NemotronForCausalLM", llama),
        "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(llama, sliding_window=16)),
        "glm": ("GlmConfig", "GlmForCausalLM", dict(llama, head_dim=8)),
        "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(llama, head_dim=8)),
        "helium": ("HeliumConfig", "HeliumForCausalLM", dict(llama, head_dim=8)),
        "biogpt": ("BioGptConfig", "BioGptForCausalLM", dict(llama, max_position_embeddings=130)),
        "arcee": ("ArceeConfig", "ArceeForCausalLM", llama),
        "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(llama, sliding_window=16)),
        "apertus": ("ApertusConfig", "ApertusForCausalLM", llama),
        "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", dict(llama, head_dim=8)),
        "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(llama, head_dim=8)),
        "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", llama),
        # encoders
        "bert": ("BertConfig", "BertForMaskedLM", bert),
        "roberta": ("RobertaConfig", "RobertaForMaskedLM", bert),
        "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForMaskedLM", bert),
        "camembert": ("CamembertConfig", "CamembertForMaskedLM", bert),
        "deberta-v2": ("DebertaV2Config", "DebertaV2ForMaskedLM",
                       dict(bert, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"],
                            position_biased_input=False)),
        "electra": ("ElectraConfig", "ElectraForMaskedLM", dict(bert, embedding_size=_H)),
        "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM",
                       dict(dim=_H, hidden_dim=_FFN, n_layers=_LAYERS, n_heads=_HEADS, max_position_embeddings=128,
                            vocab_size=VOCAB_SIZE, pad_token_id=PAD)),
        "mpnet": ("MPNetConfig", "MPNetForMaskedLM", bert),
        "roformer": ("RoFormerConfig", "RoFormerForMaskedLM", bert),
        "megatron-bert": ("MegatronBertConfig", "MegatronBertForMaskedLM", bert),
        "ernie": ("ErnieConfig", "ErnieForMaskedLM", bert),
        "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM",
                       dict(bert, global_attn_every_n_layers=2, local_attention=16, bos_token_id=BOS,
                            eos_token_id=EOS, cls_token_id=BOS, sep_token_id=EOS)),
        # encoder-decoders
        "t5": ("T5Config", "T5ForConditionalGeneration", t5),
        "mt5": ("MT5Config", "MT5ForConditionalGeneration", t5),
        "bart": ("BartConfig", "BartForConditionalGeneration", bart),
        "mbart": ("MBartConfig", "MBartForConditionalGeneration", bart),
        "marian": ("MarianConfig", "MarianMTModel", dict(bart, decoder_start_token_id=PAD)),
        "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration", dict(bart, decoder_start_token_id=PAD)),
        "m2m_100": ("M2M100Config", "M2M100ForConditionalGeneration", bart),
        "umt5": ("UMT5Config", "UMT5ForConditionalGeneration", t5),
        "longt5": ("LongT5Config", "LongT5ForConditionalGeneration", t5),
        "switch_transformers": ("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration",
                                dict(t5, num_experts=2)),
        "plbart": ("PLBartConfig", "PLBartForConditionalGeneration", bart),
        "blenderbot-small": ("BlenderbotSmallConfig", "BlenderbotSmallForConditionalGeneration", bart),
        "fsmt": ("FSMTConfig", "FSMTForConditionalGeneration",
                 dict(bart, src_vocab_size=VOCAB_SIZE, tgt_vocab_size=VOCAB_SIZE, langs=["en", "de"])),
        "blenderbot": ("BlenderbotConfig", "BlenderbotForConditionalGeneration", bart),
    }


TINY_HUB_ARCHS = tuple(_hub_table())


def tiny_hub_config(arch: str) -> Any:
    """A 2-layer, width-32 config of a hub architecture (its model_type) for the byte tokenizer.

    For tests that must cover many architectures cheaply (out of core vs in memory); the five
    `TINY_ARCHS` keep their own, wider configs.
    """
    import transformers as tf

    table = _hub_table()
    if arch not in table:
        raise ConfigError(f"unknown tiny hub architecture '{arch}': choose one of {', '.join(table)}")
    config_cls, model_cls, kwargs = table[arch]
    return getattr(tf, config_cls)(**kwargs, architectures=[model_cls])


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


def save_tiny_hub(arch: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random model of a hub architecture (`TINY_HUB_ARCHS`) and the byte tokenizer.

    `save_pretrained` writes it exactly as a real checkpoint of that architecture is written
    (transformers' own key names on disk, tied weights stored once), which is what out-of-core
    loading must map back.
    """
    import transformers as tf

    directory = Path(directory)
    config = tiny_hub_config(arch)
    torch.manual_seed(seed)
    model = getattr(tf, config.architectures[0])(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    byte_tokenizer().save_pretrained(directory)
    return directory
