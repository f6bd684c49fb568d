"""Tiny random-initialised backbones built from transformers configs (nothing is downloaded)."""

from __future__ import annotations

import math
import zlib

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128


def _bert_config(**kw) -> BertConfig:
    return BertConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        **kw,
    )


def _llama_config(vocab_size: int = VOCAB, **kw) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=3,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        pad_token_id=0,
        **kw,
    )


BYTE_EOS = 256  # byte_tokenizer's <|endoftext|>, after the 256 byte tokens

BUILDERS = {
    # For byte_tokenizer: every byte a token, so any text (JSON included) can be generated.
    "llama-bytes": lambda: LlamaForCausalLM(
        _llama_config(vocab_size=BYTE_EOS + 8, bos_token_id=BYTE_EOS, eos_token_id=BYTE_EOS)
    ),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(
            n_embd=64,
            n_layer=3,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    ),
    "llama": lambda: LlamaForCausalLM(_llama_config()),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_hidden_layers=2,
            vocab_size=VOCAB,
            max_position_embeddings=256,
            pad_token_id=0,
        )
    ),
    "llama-cls": lambda: LlamaForSequenceClassification(_llama_config(num_labels=3)),
    "bert-cls": lambda: BertForSequenceClassification(_bert_config(num_labels=3)),
    "bert-mlm": lambda: BertForMaskedLM(_bert_config()),
}


def tiny_model(kind: str, seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[kind]()
    seeded_init(model, seed)
    model.config._attn_implementation = attn
    return model.eval()


@torch.no_grad()
def seeded_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrites every parameter from a generator seeded by (seed, parameter name), so the weights depend neither
    on the order nor on the init code of the installed transformers: outputs recorded under one release (the golden
    files) stay comparable under another. Matrices get std 1/sqrt(last dim), so logits are O(1) with clear argmax
    margins; 1-D weights (norm scales) are near 1 and biases near 0."""
    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        x = torch.randn(p.shape, generator=g)
        if p.ndim == 1:
            p.copy_(1 + 0.1 * x if name.endswith("weight") else 0.1 * x)
        else:
            p.copy_(x / math.sqrt(p.shape[-1]))


MASK_ID = VOCAB - 1  # "[MASK]" in tiny_tokenizer(mask=True), in place of "w127"


def tiny_tokenizer(mask: bool = False):
    """A word-level tokenizer over VOCAB words "w3".."w127" (0 pad, 1 eos, 2 unk), built offline. mask=True: the
    last word is "[MASK]", the mask token (MASK_ID)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    extra = {}
    if mask:
        del vocab[f"w{MASK_ID}"]
        vocab["[MASK]"] = MASK_ID
        extra = {"mask_token": "[MASK]"}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", **extra
    )


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (GPT-2's byte alphabet): every byte is one token, ids 0..255, and
    <|endoftext|> is BYTE_EOS. Built offline; grammar libraries read it as GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))} | {"<|endoftext|>": BYTE_EOS}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
