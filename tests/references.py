"""Plain references that share nothing with the serving code: a copy of the backbone with a task's bias deltas
written into its biases, run by transformers' own forward, a key/value prefix given as a transformers cache (as PEFT
passes one), a soft prompt as the first input embeddings. Used where PEFT has no equivalent (bias tasks) and as a
second reference beside PEFT."""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

from prefix_store import PrefixArtifact
from service.runtime import wrap_model
from service.runtime.bias import bias_targets


def biased_copy(model: torch.nn.Module, deltas: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """A copy of `model` (a *ForMaskedLM, *LMHeadModel or bare encoder) whose bias at each module path is b + delta.
    Body paths are relative to the base model; "cls.predictions..." to the model (the decoder bias once: it is
    tied)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for path, delta in (deltas or {}).items():
            root = m if path.startswith("cls.") else m.base_model
            module = root.get_submodule(path)
            module.bias += delta
    return m


def prefix_cache(kv: torch.Tensor | None) -> DynamicCache | None:
    """A transformers cache holding a key/value prefix (L, 2, H_kv, P, D), as PEFT passes one."""
    if kv is None:
        return None
    cache = DynamicCache()
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0][None].clone(), kv[layer, 1][None].clone(), layer)
    return cache


@torch.no_grad()
def reference_generate(
    model, ids: list[int], art: PrefixArtifact | None, steps: int = 6
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and per-step logits (steps, V) of one row alone: transformers' forward and cache."""
    m = biased_copy(model, art.biases if art is not None else None)
    kv = art.kv if art is not None else None
    soft = art.soft_prompt if art is not None else None
    cache = prefix_cache(kv) or DynamicCache()
    P = 0 if kv is None else kv.shape[3]
    x = torch.tensor([ids])
    if soft is not None:
        embeds = torch.cat([soft[None], m.get_input_embeddings()(x)], 1)  # positions 0.. for prompt and tokens
        out = m(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
    else:
        pos = torch.arange(P, P + len(ids))[None]
        out = m(input_ids=x, position_ids=pos, past_key_values=cache, use_cache=True)
    n = P + (0 if soft is None else soft.shape[0]) + len(ids)
    tokens, logits = [], []
    for _ in range(steps):
        step = out.logits[0, -1]
        logits.append(step)
        tok = int(step.argmax())
        tokens.append(tok)
        out = m(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[n]]), past_key_values=cache)
        n += 1
    return tokens, torch.stack(logits)


@torch.no_grad()
def reference_encode(encoder, ids: list[int], art: PrefixArtifact | None) -> torch.Tensor:
    """The final hidden states (T, hidden) of one row alone through a bare encoder (BertModel, RobertaModel, ...):
    biases written in, a key/value prefix as the cache with the mask's P ones in front (the encoder numbers the
    tokens' positions after it, as under PEFT), a soft prompt as the first input embeddings (its states included)."""
    m = biased_copy(encoder, art.biases if art is not None else None)
    x = torch.tensor([ids])
    kv = art.kv if art is not None else None
    soft = art.soft_prompt if art is not None else None
    if soft is not None:
        embeds = torch.cat([soft[None], m.get_input_embeddings()(x)], 1)
        return m(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))[0][0]
    if kv is None:
        return m(input_ids=x, attention_mask=torch.ones_like(x))[0][0]
    mask = torch.ones(1, kv.shape[3] + len(ids), dtype=torch.long)
    return m(input_ids=x, attention_mask=mask, past_key_values=prefix_cache(kv))[0][0]


def random_deltas(model, seed: int, only: str | None = None) -> dict[str, torch.Tensor]:
    """Deltas for every bias of the served backbone (or those whose path contains `only`), large enough to matter."""
    bb = wrap_model(copy.deepcopy(model), None, name="probe")
    g = torch.Generator().manual_seed(seed)
    return {
        path: 0.5 * torch.randn(t.shape, generator=g)
        for path, t in bias_targets(bb).items()
        if only is None or only in path
    }
