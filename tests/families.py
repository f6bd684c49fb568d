"""The family matrix's backbones: one tiny random-initialised causal LM per supported decoder family, built from its
transformers config (nothing is downloaded), with every attention feature the family has switched on and small
enough to bite at the suite's context lengths: sliding windows of WINDOW tokens (shorter than a test row's prefix +
prompt + generated tokens), soft-caps of a few units (random scores reach them), attention sinks, ALiBi.

FAMILIES maps a matrix entry (a model type, or a model type with a feature variant) to its builder and the features
it exercises; `features` names the negative controls the matrix runs for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as tf

from tests.models import VOCAB, seeded_init

WINDOW = 6  # sliding windows: rows of the matrix reach 20+ tokens (prefix + prompt + generated)
HIDDEN, HEADS, KV_HEADS, LAYERS = 64, 4, 2, 3
POSITIONS = 128
COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _llama_like(**kw) -> dict:
    return (
        dict(
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            num_hidden_layers=LAYERS,
            max_position_embeddings=POSITIONS,
            **COMMON,
        )
        | kw
    )


@dataclass(frozen=True)
class Family:
    """builder: a fresh *ForCausalLM; features: the attention / output features it exercises (each has a negative
    control in the matrix); biases: whether its linear or norm layers carry bias terms (a bias task row)."""

    builder: Callable[[], torch.nn.Module]
    features: tuple[str, ...] = ()
    biases: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family(lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_like()))),
    "mistral": Family(
        lambda: tf.MistralForCausalLM(tf.MistralConfig(**_llama_like(sliding_window=WINDOW))), ("window",)
    ),
    "qwen2": Family(lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_llama_like())), biases=True),
    "qwen2-window": Family(
        # max_window_layers 1: layer 0 attends to everything, layers 1 and 2 slide (Qwen2's layer_types rule)
        lambda: tf.Qwen2ForCausalLM(
            tf.Qwen2Config(**_llama_like(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1))
        ),
        ("window",),
        biases=True,
    ),
    "qwen3": Family(lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_llama_like(head_dim=16)))),
    "qwen3-window": Family(
        lambda: tf.Qwen3ForCausalLM(
            tf.Qwen3Config(
                **_llama_like(head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
            )
        ),
        ("window",),
    ),
    "gemma": Family(lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_llama_like(head_dim=16)))),
    "gemma2": Family(
        lambda: tf.Gemma2ForCausalLM(
            tf.Gemma2Config(
                **_llama_like(
                    head_dim=16,
                    query_pre_attn_scalar=24,  # not head_dim: the scale must come from the module
                    sliding_window=WINDOW,
                    attn_logit_softcapping=1.5,
                    final_logit_softcapping=2.0,
                )
            )
        ),
        ("window", "softcap", "final_softcap"),
    ),
    "gemma3": Family(
        lambda: tf.Gemma3ForCausalLM(
            tf.Gemma3TextConfig(
                **_llama_like(
                    head_dim=16,
                    query_pre_attn_scalar=24,
                    sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    final_logit_softcapping=2.0,
                )
            )
        ),
        ("window", "final_softcap"),
    ),
    "phi3": Family(lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_llama_like(sliding_window=WINDOW))), ("window",)),
    "starcoder2": Family(
        lambda: tf.Starcoder2ForCausalLM(tf.Starcoder2Config(**_llama_like(sliding_window=WINDOW))),
        ("window",),
        biases=True,
    ),
    "stablelm": Family(
        lambda: tf.StableLmForCausalLM(tf.StableLmConfig(**_llama_like(use_qkv_bias=True, qk_layernorm=True))),
        biases=True,
    ),
    "cohere": Family(
        lambda: tf.CohereForCausalLM(tf.CohereConfig(**_llama_like(logit_scale=0.25, use_qk_norm=True))),
        ("logit_scale",),
    ),
    "gpt_neox": Family(
        lambda: tf.GPTNeoXForCausalLM(
            tf.GPTNeoXConfig(
                hidden_size=HIDDEN,
                intermediate_size=2 * HIDDEN,
                num_attention_heads=HEADS,
                num_hidden_layers=LAYERS,
                max_position_embeddings=POSITIONS,
                **COMMON,
            )
        ),
        biases=True,
    ),
    "gpt2": Family(
        lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS, **COMMON)
        ),
        biases=True,
    ),
    "opt": Family(
        lambda: tf.OPTForCausalLM(
            tf.OPTConfig(
                hidden_size=HIDDEN,
                ffn_dim=2 * HIDDEN,
                num_attention_heads=HEADS,
                num_hidden_layers=LAYERS,
                word_embed_proj_dim=HIDDEN,
                max_position_embeddings=POSITIONS,
                **COMMON,
            )
        ),
        biases=True,
    ),
    "olmo2": Family(lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**_llama_like()))),
    "gpt_oss": Family(
        lambda: tf.GptOssForCausalLM(
            tf.GptOssConfig(
                **_llama_like(
                    head_dim=16,
                    sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    num_local_experts=4,
                    num_experts_per_tok=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                )
            )
        ),
        ("window", "sinks"),
        biases=True,
    ),
}


def family_model(name: str, seed: int = 0, attn: str | None = None) -> torch.nn.Module:
    """A fresh tiny model of `name`, weights from seeded_init, eval mode; `attn` overrides the attention
    implementation (by default the family's own: SDPA where transformers supports it, else eager)."""
    torch.manual_seed(seed)
    model = FAMILIES[name].builder()
    seeded_init(model, seed)
    if model.config.model_type.startswith("gemma"):
        # Gemma's norms scale by (1 + weight): seeded_init's weights near 1 would double the states at every norm,
        # where trained Gemma checkpoints keep the weights near 0. Centre them there.
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.sub_(1)
    if attn is None:
        attn = "sdpa" if type(model)._supports_sdpa else "eager"
    model.config._attn_implementation = attn
    return model.eval()


_ENCODER = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=POSITIONS,
    pad_token_id=1,  # RoBERTa-style encoders number positions from padding_idx + 1
)
# The encoder families, as the engine serves them: the bare encoder (its pooler where it has one).
ENCODERS: dict[str, Callable[[], torch.nn.Module]] = {
    "bert": lambda: tf.BertModel(tf.BertConfig(**_ENCODER)),
    "roberta": lambda: tf.RobertaModel(tf.RobertaConfig(**_ENCODER)),
    "xlm-roberta": lambda: tf.XLMRobertaModel(tf.XLMRobertaConfig(**_ENCODER)),
    "camembert": lambda: tf.CamembertModel(tf.CamembertConfig(**_ENCODER)),
    "electra": lambda: tf.ElectraModel(tf.ElectraConfig(embedding_size=48, **_ENCODER)),
}


def encoder_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ENCODERS[name]()
    seeded_init(model, seed)
    model.config._attn_implementation = "sdpa"
    return model.eval()
