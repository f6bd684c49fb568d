"""Which backbone families the engine serves, and what each asks of it.

A family is served only where the suite proves it exact: the family matrix (tests/service/runtime/test_families.py)
runs every supported causal-LM family with its attention features switched on (sliding windows shorter than the
test rows, soft-caps that bite, attention sinks) and compares every row of a mixed batch with transformers / PEFT
run alone. Anything else is refused when the backbone is loaded, with a message naming the model type, what is
unsupported and the supported list, unless the operator opts in (`allow_unverified`), which loads it with a loud
warning and `/ready` saying so; the engine's run-time guards (every layer's attention called once per forward, no
attention argument it does not implement) stay on either way.

What a family asks of the engine, beyond its own modules (which run unchanged):
- attention windows per layer (`attention_windows`): `layer_types` + `sliding_window` (Gemma 2/3, gpt-oss, Qwen2/3
  with `use_sliding_window`, whose `max_window_layers` transformers folds into `layer_types`), or one window on every
  layer (Mistral, Phi-3, Starcoder2). The attention arguments the modules pass (`sliding_window`, `softcap`,
  `s_aux`, `scaling` from `query_pre_attn_scalar`) are honoured by service.runtime.attention.
- the model's own output processing after the LM head (`final_logits`): Cohere's `logit_scale`, Gemma 2/3's
  `final_logit_softcapping`; `check_output_head` proves at load that it reproduces the model's own logits.
- token positions: RoBERTa-style encoders number positions from `padding_idx + 1` (`position_offset`).

A prefix's virtual tokens sit at sequence positions 0..P-1 in front of the row's tokens, as PEFT's cache puts them:
under a sliding window of W a token at position q sees prefix token p only while p > q - W, exactly as transformers'
sliding-window mask treats the prefix that PEFT hands it as cache entries.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


class UnsupportedBackbone(ValueError):
    """The backbone's family, or a feature of its config, is not one the engine is proven exact on."""


@dataclass(frozen=True)
class Family:
    """kind: "causal_lm", "encoder" or "image"; features: what the family's attention and head do beyond plain
    causal/bidirectional softmax attention (for the supported-backbone table); tested: the matrix rows that prove it."""

    kind: str
    features: tuple[str, ...] = ()


_ROPE = "rotary positions"
CAUSAL_FAMILIES: dict[str, Family] = {
    "llama": Family("causal_lm", (_ROPE, "grouped-query attention")),
    "mistral": Family("causal_lm", (_ROPE, "sliding window (every layer)")),
    "qwen2": Family("causal_lm", (_ROPE, "qkv biases", "sliding window (layers past max_window_layers)")),
    "qwen3": Family("causal_lm", (_ROPE, "q/k norm", "sliding window (layers past max_window_layers)")),
    "gemma": Family("causal_lm", (_ROPE, "scaled embeddings")),
    "gemma2": Family(
        "causal_lm",
        (_ROPE, "sliding window (alternate layers)", "attention soft-cap", "query_pre_attn_scalar", "final soft-cap"),
    ),
    "gemma3_text": Family(
        "causal_lm", (_ROPE, "sliding window (layer_types)", "q/k norm", "query_pre_attn_scalar", "final soft-cap")
    ),
    "phi3": Family("causal_lm", (_ROPE, "fused qkv", "sliding window (every layer)")),
    "starcoder2": Family("causal_lm", (_ROPE, "biases", "sliding window (every layer)")),
    "stablelm": Family(
        "causal_lm", (_ROPE, "qkv biases", "q/k layer norm", "layers that pass no keyword arguments on")
    ),
    "cohere": Family("causal_lm", (_ROPE, "q/k norm", "parallel blocks", "logit_scale")),
    "gpt_neox": Family("causal_lm", (_ROPE, "fused qkv", "biases")),
    "gpt2": Family("causal_lm", ("learned positions", "fused qkv", "biases")),
    "opt": Family("causal_lm", ("learned positions (offset 2)", "biases")),
    "olmo2": Family("causal_lm", (_ROPE, "q/k norm")),
    "gpt_oss": Family("causal_lm", (_ROPE, "attention sinks", "sliding window (layer_types)", "mixture of experts")),
}
ENCODER_FAMILIES: dict[str, Family] = {
    "bert": Family("encoder", ("learned positions", "token types")),
    "roberta": Family("encoder", ("learned positions from padding_idx + 1",)),
    "xlm-roberta": Family("encoder", ("learned positions from padding_idx + 1",)),
    "camembert": Family("encoder", ("learned positions from padding_idx + 1",)),
    "electra": Family("encoder", ("learned positions", "token types")),
}
IMAGE_FAMILIES: dict[str, Family] = {"vit": Family("image", ("patch embeddings", "visual prompts"))}
SUPPORTED: dict[str, Family] = CAUSAL_FAMILIES | ENCODER_FAMILIES | IMAGE_FAMILIES

# Families users bring that the engine cannot serve exactly today, and why.
REFUSED: dict[str, str] = {
    "bloom": "its attention (ALiBi) is computed inside BloomAttention, not through transformers' attention "
    "interface, so the engine's mixed-prefix attention never runs",
    "mpt": "its attention (ALiBi) is computed inside MptAttention, not through transformers' attention interface",
    "falcon": "its attention (rotary or ALiBi, multi-query) is computed inside FalconAttention, not through "
    "transformers' attention interface",
    "deberta-v2": "its disentangled relative-position attention takes no key/value cache, so a prefix has no "
    "defined meaning (PEFT cannot run one either)",
    "modernbert": "its encoder takes no key/value cache, so a prefix has no defined meaning (PEFT cannot run one)",
    "gemma3": "the multimodal Gemma 3 (vision tower) is not served; a text-only Gemma 3 checkpoint (model type "
    "gemma3_text) is",
}

# Attention arguments the modules of supported families pass that need nothing from the engine: positions were
# applied to the keys already, dropout is off in eval mode, no cache or mask of transformers' is in play.
HARMLESS_ARGS = frozenset({"position_ids", "use_cache", "past_key_values", "dropout", "output_attentions"})
HONOURED_ARGS = frozenset({"sliding_window", "softcap", "s_aux", "scaling", "is_causal"})


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED))


def check_family(config: Any, *, allow_unverified: bool = False) -> str | None:
    """Refuses a backbone the engine is not proven exact on (UnsupportedBackbone); returns None for a proven one, or
    the warning an unproven causal-LM family was loaded under with `allow_unverified`. Refused either way: the
    families known not to work (REFUSED), a supported family with a feature the engine does not serve, and unproven
    encoders (their serving paths are family-specific)."""
    problems = unsupported_features(config)
    if not problems:
        return None
    message = (
        f"backbone model type {config.model_type!r}: "
        + "; ".join(problems)
        + f". Supported families (proven exact by the family matrix): {supported_list()}"
    )
    unknown_causal = config.model_type not in SUPPORTED | REFUSED.keys() and _causal_lm(config)
    if not (allow_unverified and unknown_causal):
        hint = (
            ". Set PREFIXSERVE_ALLOW_UNVERIFIED_BACKBONE=true to serve it anyway, unverified" if unknown_causal else ""
        )
        raise UnsupportedBackbone(message + hint)
    warning = "UNVERIFIED BACKBONE, served without proof of exactness: " + message
    log.warning("%s", warning)
    return warning


def _causal_lm(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def unsupported_features(config: Any) -> list[str]:
    """What stands between this config and a proven family; empty when it is one."""
    model_type = config.model_type
    if model_type in REFUSED:
        return [f"not supported: {REFUSED[model_type]}"]
    if model_type not in SUPPORTED:
        return ["not a family the engine has been proven on"]
    problems = []
    if getattr(config, "use_bidirectional_attention", None):
        problems.append("use_bidirectional_attention is set (bidirectional decoder attention is not served)")
    for kind in set(getattr(config, "layer_types", None) or ()):
        if kind not in ("full_attention", "sliding_attention"):
            problems.append(f"layer type {kind!r} (only full_attention and sliding_attention are served)")
    if getattr(config, "is_encoder_decoder", False):
        problems.append("encoder-decoder models are not served")
    if model_type in ENCODER_FAMILIES and getattr(config, "is_decoder", False):
        problems.append("is_decoder is set (a causal encoder: its modules mask causally, the engine's encoders do not)")
    return problems


# Families whose attention modules pass `config.sliding_window` on every layer (no layer_types).
WINDOW_ON_EVERY_LAYER = frozenset({"mistral", "phi3", "starcoder2"})


def attention_windows(config: Any) -> tuple[int | None, ...]:
    """Per layer, the sliding window W (a token at position q attends to positions q-W+1..q) or None (everything
    before it), as the family's modules pass it to the attention (their `sliding_window` argument): from
    `layer_types`, or on every layer for the families whose modules read `config.sliding_window` directly. A
    `sliding_window` key on another family (converted checkpoints carry one) is ignored, as its modules ignore it.
    A window that covers the whole context is no window. An unverified family's modules may still pass a window:
    the attention honours it (attention.call_features), with every token kept."""
    L: int = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    context = getattr(config, "max_position_embeddings", None)
    if window is None or (context is not None and window >= context):
        return (None,) * L
    types = getattr(config, "layer_types", None)
    if types is not None:
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    if config.model_type in WINDOW_ON_EVERY_LAYER:
        return (int(window),) * L
    return (None,) * L


def final_logits(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the family's *ForCausalLM applies to the LM head's output, or None when nothing."""
    scale = getattr(config, "logit_scale", None) if config.model_type == "cohere" else None
    cap = getattr(config, "final_logit_softcapping", None) if config.model_type.startswith("gemma") else None
    if scale is not None:
        return lambda x: x * scale
    if cap is not None:
        return lambda x: torch.tanh(x / cap) * cap
    return None


def position_offset(config: Any) -> int:
    """The position id of a row's first (virtual) token: RoBERTa-style embeddings start at padding_idx + 1 (as their
    own `create_position_ids_from_input_ids` numbers them, a prefix's tokens included), everything else at 0."""
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        return int(config.pad_token_id) + 1
    return 0


def check_output_head(model: Any, head: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Proves at load that `head(body(ids))` reproduces the model's own logits for a few tokens: a family whose
    *ForCausalLM post-processes its logits in a way `final_logits` does not know is refused, never served wrong.

    The two forwards run on a thread of their own that ends with them: a thread that has run a torch op keeps an
    OpenMP team of worker threads, and that idle team competing with the engine thread's cost 20% of decode
    throughput on a 2-core CPU (bench/engine.py --only bare)."""
    failure: list[BaseException] = []

    def probe() -> None:
        try:
            _check_output_head(model, head)
        except BaseException as e:  # handed to the loading thread
            failure.append(e)

    thread = threading.Thread(target=probe, name="output-head-check")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


@torch.inference_mode()
def _check_output_head(model: Any, head: Callable[[torch.Tensor], torch.Tensor]) -> None:
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    ids = (torch.arange(5, device=device) * 7 + 3) % vocab  # any in-vocabulary tokens
    own = model(input_ids=ids[None]).logits[0].float()  # (5, V)
    ours = head(model.base_model(input_ids=ids[None]).last_hidden_state)[0].float()
    err = (own - ours).abs().max().item()
    # The same forward twice: equal up to kernel rounding in fp32; a missed scale or cap moves logits by O(1).
    tol = 1e-4 if model.dtype == torch.float32 else 2e-2 * max(1.0, own.abs().max().item())
    if err > tol:
        raise UnsupportedBackbone(
            f"backbone model type {model.config.model_type!r}: its LM head's logits differ from the model's own by "
            f"{err:.3g} (the family post-processes its logits in a way the engine does not reproduce)"
        )
