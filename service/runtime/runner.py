"""Runs the frozen backbone on mixed-prefix batches: prefill chunks, decode, encoder classification, and turning an
artifact into device tensors. Tensors only; everything here runs on the engine's one worker thread.

Positions: a row's j-th prompt token gets position P + j, P its prefix length (PEFT's layout, see prefix_kv.py);
soft prompts on causal LMs are key/values at positions 0..P-1, computed once when the prefix is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from prefix_store import ClassificationHead, PrefixArtifact, VersionKey

from .attention import ForwardState, serving
from .backbone import Backbone, vit_layers
from .bias import BiasTable
from .kv_cache import PrefixPool, SlotCache
from .prefix_kv import right_pad, token_positions


@dataclass
class DevicePrefix:
    """A task version ready to run on the device.

    index: (P,) long, its key/values' positions in the PrefixPool (key/value methods, and soft prompts on causal LMs,
        whose key/values do not depend on what follows them under causal attention); None for encoder soft prompts.
    soft_prompt: (P, hidden) for soft prompts on encoders, where attention is bidirectional: fed as embeddings.
    head: the classification head, its tensors on the device.
    bias_slot: the task's slot in the BiasTable (bias methods), 0 for none.
    verbalizer: (C,) long, a verbalizer head's label tokens on the device.
    """

    task: str
    version: int
    method: str
    num_virtual_tokens: int
    index: torch.Tensor | None
    soft_prompt: torch.Tensor | None
    head: ClassificationHead | None
    bias_slot: int = 0
    verbalizer: torch.Tensor | None = None

    @property
    def key(self) -> VersionKey:
        return (self.task, self.version)

    @property
    def kv_len(self) -> int:
        """Prefix key/value columns a row of this task attends to (0 for an encoder's soft prompt)."""
        return 0 if self.index is None else self.num_virtual_tokens


@dataclass
class Chunk:
    """Part (or all) of one row's prompt, prefilled into its slot in one forward.

    slot: the row's slot; past: tokens already in it; ids: this chunk's token ids; prefix: the row's task (or None);
    final: the chunk ends the prompt (its last token's state is read); pool_mean: add the chunk's hidden states to
    the row's sum (mean pooling); states: return every token's state (the prompt's log-probabilities).
    """

    slot: int
    past: int
    ids: list[int]
    prefix: DevicePrefix | None
    final: bool
    pool_mean: bool = False
    states: bool = False


@dataclass
class ChunkResult:
    last: torch.Tensor | None  # (hidden,) the final token's state, for final chunks
    hidden_sum: torch.Tensor | None  # (hidden,) sum of the chunk's token states, when pool_mean
    states: torch.Tensor | None = None  # (T_chunk, hidden) every token's state, when asked


@dataclass
class ImageItem:
    prefix: DevicePrefix | None
    pixel_values: torch.Tensor  # (C, H, W)
    embed: bool = False  # return the row's pooled state instead of its head's logits


@dataclass
class EncodeItem:
    prefix: DevicePrefix | None
    input_ids: list[int]
    token_type_ids: list[int] | None = None
    embed: bool = False  # return the row's pooled state instead of its head's logits


class ModelRunner:
    def __init__(self, backbone: Backbone, pool: PrefixPool, cache: SlotCache | None) -> None:
        self.bb = backbone
        self.pool, self.cache = pool, cache
        self.biases = BiasTable(backbone)
        self.body = backbone.body
        self.embed = backbone.embeddings
        self.layers = backbone.fingerprint.num_layers  # attention layers: each runs once per forward
        tok = backbone.tokenizer
        self.pad_id = (tok.pad_token_id if tok is not None else None) or 0

    # -- loading ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefix_tensors(self, artifact: PrefixArtifact) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(key/values (L, 2, H_kv, P, D) or None, soft prompt (P, hidden) or None) on the device, in its dtype.
        Checks the artifact against the backbone first."""
        self.bb.check(artifact)
        dev, dt = self.bb.device, self.bb.dtype
        kv = artifact.kv.to(device=dev, dtype=dt) if artifact.kv is not None else None
        soft = artifact.soft_prompt.to(device=dev, dtype=dt) if artifact.soft_prompt is not None else None
        if soft is not None and not self.bb.is_encoder:
            kv, soft = self._soft_prompt_kv(soft), None
        if artifact.deep_prompt is not None:
            kv = self._deep_prompt_kv(artifact.deep_prompt.to(device=dev, dtype=dt))
        return kv, soft

    def head_tensors(self, artifact: PrefixArtifact) -> ClassificationHead | None:
        head = artifact.head
        if head is None:
            return None
        dev, dt = self.bb.device, self.bb.dtype

        def put(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=dev, dtype=dt)

        return ClassificationHead(put(head.weight), put(head.bias), list(head.labels), head.pooling, head.token_ids)

    def bias_tensors(self, artifact: PrefixArtifact) -> dict[str, torch.Tensor] | None:
        """A bias task's deltas, path -> (out,), on the device in its dtype (checked by prefix_tensors)."""
        if artifact.biases is None:
            return None
        return {k: v.to(device=self.bb.device, dtype=self.bb.dtype) for k, v in artifact.biases.items()}

    def _soft_prompt_kv(self, soft: torch.Tensor) -> torch.Tensor:
        """Keys/values of a soft prompt at positions 0..P-1: (P, hidden) -> (L, 2, H_kv, P, D)."""
        P = soft.shape[0]
        cache = DynamicCache()
        pos = torch.arange(P, device=soft.device)[None]  # (1, P)
        self.body(inputs_embeds=soft[None], position_ids=pos, use_cache=True, **self.bb.with_cache(cache))
        layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # each (2, H_kv, P, D)
        return torch.stack(layers)

    def _deep_prompt_kv(self, prompts: torch.Tensor) -> torch.Tensor:
        """VPT-deep: layer i's prompt tokens p_i (L, P, hidden) only ever serve as keys/values of the image tokens
        (their outputs are discarded), so each layer's prefix is `k_proj(LN1(p_i))`, `v_proj(LN1(p_i))`, computed
        once here: (L, 2, H, P, D). ViT is pre-LN: the LayerNorm belongs in it."""
        fp = self.bb.fingerprint
        L, P, _ = prompts.shape
        out = []
        for i, layer in enumerate(vit_layers(self.body)):
            x = layer.layernorm_before(prompts[i])  # (P, hidden)
            att = layer.attention
            k = att.k_proj(x).view(P, fp.num_kv_heads, fp.head_dim).transpose(0, 1)  # (H, P, D)
            v = att.v_proj(x).view(P, fp.num_kv_heads, fp.head_dim).transpose(0, 1)
            out.append(torch.stack([k, v]))
        return torch.stack(out)

    # -- causal LM --------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: list[Chunk]) -> list[ChunkResult]:
        """One forward over chunks of rows of any mix of tasks: writes their key/values into their slots and returns
        what each chunk's row needs (its final token's state, the sum of its states)."""
        assert self.cache is not None
        dev = self.bb.device
        lengths = [len(c.ids) for c in chunks]
        prefix_lens = [c.prefix.kv_len if c.prefix is not None else 0 for c in chunks]
        ids, _ = right_pad([c.ids for c in chunks], self.pad_id, dev)  # (B, T)
        starts = [p + c.past for p, c in zip(prefix_lens, chunks, strict=True)]
        pos = token_positions(starts, lengths, ids.shape[1], dev)  # (B, T): token j of the chunk at P + past + j
        past = torch.tensor([c.past for c in chunks], device=dev)
        self.cache.ensure_width(int((past + ids.shape[1]).max()))
        state = ForwardState(
            "prefill",
            self.pool,
            *self._prefix_index([c.prefix for c in chunks]),
            new=torch.tensor(lengths, device=dev),
            cache=self.cache,
            slots=torch.tensor([c.slot for c in chunks], device=dev),
            past=past,
            layers=self.layers,
        )
        with serving(self.body.config, state), self.biases.rows(self._bias_slots([c.prefix for c in chunks])):
            h = self.body(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        results = []
        for i, c in enumerate(chunks):  # h: (B, T, hidden)
            last = h[i, lengths[i] - 1] if c.final else None
            states = h[i, : lengths[i]] if c.states else None
            results.append(ChunkResult(last, h[i, : lengths[i]].sum(0) if c.pool_mean else None, states))
        return results

    @torch.inference_mode()
    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        past: torch.Tensor,
        prefix_index: torch.Tensor,
        prefix_len: torch.Tensor,
        bias_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token per row for rows in slots 0..B-1: tokens, positions, past (tokens in each slot) (B,), prefix
        positions (B, Pmax) and lengths (B,), bias slots (B,). Appends the tokens' key/values to the slots; returns
        next-token logits (B, V) fp32."""
        state = ForwardState(
            "decode",
            self.pool,
            prefix_index,
            prefix_len,
            new=torch.ones_like(past),
            cache=self.cache,
            past=past,
            layers=self.layers,
        )
        with serving(self.body.config, state), self.biases.rows(bias_slots):
            h = self.body(input_ids=tokens[:, None], position_ids=positions[:, None], use_cache=False)
        return self.lm_logits(h.last_hidden_state[:, -1])

    def lm_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., V) fp32 from final states (..., hidden): the LM head and whatever the model applies
        after it (Backbone.logits), for generation, sampling and log-probabilities alike."""
        return self.bb.logits(states).float()

    # -- encoder ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def classify_encoder(self, items: list[EncodeItem]) -> list[torch.Tensor]:
        """Head logits (C,) per item for a BERT-family backbone, or for an `embed` item its pooled state (hidden,)
        fp32, pooled as the backbone pools. Key/value prefixes come from the pool; soft prompts are input embeddings
        in front of the tokens (positions from 0, as PEFT feeds them)."""
        dev = self.bb.device
        n_soft = [
            0 if it.prefix is None or it.prefix.soft_prompt is None else it.prefix.num_virtual_tokens for it in items
        ]
        lengths = [ns + len(it.input_ids) for ns, it in zip(n_soft, items, strict=True)]
        offset = self.bb.position_offset
        starts = [offset + (0 if it.prefix is None else it.prefix.kv_len) for it in items]  # soft rows: at 0
        ids, _ = right_pad(
            [[self.pad_id] * ns + it.input_ids for ns, it in zip(n_soft, items, strict=True)], self.pad_id, dev
        )
        types, _ = right_pad(
            [[0] * ns + (it.token_type_ids or [0] * len(it.input_ids)) for ns, it in zip(n_soft, items, strict=True)],
            0,
            dev,
        )
        inputs: dict[str, torch.Tensor] = {"input_ids": ids}
        if any(n_soft):
            embeds = self.embed(ids)  # (B, T, hidden)
            for i, it in enumerate(items):
                if n_soft[i]:
                    embeds[i, : n_soft[i]] = it.prefix.soft_prompt  # type: ignore[union-attr]
            inputs = {"inputs_embeds": embeds}
        prefixes = [it.prefix for it in items]
        state = self._encode_state(prefixes, lengths)
        bias_slots = self._bias_slots(prefixes)
        with serving(self.body.config, state), self.biases.rows(bias_slots):
            out = self.body(
                **inputs, token_type_ids=types, position_ids=token_positions(starts, lengths, ids.shape[1], dev)
            )
        h = out.last_hidden_state  # (B, T, hidden)
        pooled = getattr(out, "pooler_output", None)  # (B, hidden) or None
        logits: list[torch.Tensor | None] = []
        for i, it in enumerate(items):
            mean, first = h[i, n_soft[i] : lengths[i]].mean(0), h[i, 0]
            pooler = pooled[i] if pooled is not None else None
            if it.embed:
                logits.append(pool(self.bb.pooling, mean, first, pooler).float())
            elif it.prefix is not None and it.prefix.verbalizer is not None:
                logits.append(None)  # scored at [MASK] below
            else:
                logits.append(head_logits(it.prefix, mean, first, pooler))
        verbal = [i for i, x in enumerate(logits) if x is None]
        if verbal:
            mask_id = self.bb.mask_token_id
            pos = [n_soft[i] + items[i].input_ids.index(mask_id) for i in verbal]  # the first [MASK] of each row
            states = h[verbal, pos]  # (n, hidden)
            slots = bias_slots[verbal] if bias_slots is not None else None
            for i, row_logits in zip(verbal, self.verbalize(states, [prefixes[i] for i in verbal], slots), strict=True):
                logits[i] = row_logits
        return logits  # type: ignore[return-value]

    # -- image encoder ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def classify_images(self, items: list[ImageItem]) -> list[torch.Tensor]:
        """Head logits (C,) per image on a ViT (an `embed` item: its pooled state), rows of any mix of tasks and bare
        rows in one forward. A row reads
        `[CLS, shallow prompts (no position embedding), patches, padding]` (attention is bidirectional and positions
        are in the embeddings, so where the padding sits does not matter, and right padding keeps the key mask a
        length); deep prompts and key/value prefixes come from the pool through the registered attention."""
        dev = self.bb.device
        pixels = torch.stack([it.pixel_values for it in items]).to(device=dev, dtype=self.bb.dtype)  # (B, C, H, W)
        emb = self.body.embeddings(pixels)  # (B, 1 + N, hidden): [CLS] and patches, position embeddings added
        B, N = emb.shape[0], emb.shape[1] - 1
        shallow = [
            0 if it.prefix is None or it.prefix.soft_prompt is None else it.prefix.num_virtual_tokens for it in items
        ]
        lengths = [1 + s + N for s in shallow]
        x = emb.new_zeros(B, max(lengths), emb.shape[2])  # (B, T, hidden)
        x[:, 0] = emb[:, 0]
        for i, it in enumerate(items):
            if shallow[i]:
                x[i, 1 : 1 + shallow[i]] = it.prefix.soft_prompt  # type: ignore[union-attr]
            x[i, 1 + shallow[i] : lengths[i]] = emb[i, 1:]
        prefixes = [it.prefix for it in items]
        state = self._encode_state(prefixes, lengths)
        with serving(self.body.config, state), self.biases.rows(self._bias_slots(prefixes)):
            for layer in vit_layers(self.body):
                x = layer(x, None)
        h = self.body.layernorm(x)  # (B, T, hidden)
        out = []
        for i, it in enumerate(items):
            mean, first = h[i, 1 + shallow[i] : lengths[i]].mean(0), h[i, 0]  # patches only; [CLS]
            out.append(pool(self.bb.pooling, mean, first).float() if it.embed else head_logits(it.prefix, mean, first))
        return out

    def verbalize(
        self, states: torch.Tensor, prefixes: list[DevicePrefix | None], slots: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """Label logits (C_i,) fp32 of verbalizer rows from their [MASK] states (n, hidden): the masked-LM head at
        each row's verbalizer tokens only, `transform(h) . E[verb]^T + b_dec[verb] + delta_dec[verb]`."""
        mlm = self.bb.mlm
        assert mlm is not None, "verbalizer tasks are refused on backbones without a masked-LM scoring"
        z = states
        if mlm.transform is not None:
            with self.biases.rows(slots):  # the transform's dense and LayerNorm carry bias deltas too
                z = mlm.transform(states)  # (n, hidden)
        out = []
        for i, p in enumerate(prefixes):
            assert p is not None and p.verbalizer is not None
            verb = p.verbalizer  # (C,)
            logits = z[i] @ mlm.weight[verb].T  # (C,)
            if mlm.bias is not None:
                logits = logits + mlm.bias[verb]
            if p.bias_slot:
                delta = self.biases.decoder_bias(torch.tensor([p.bias_slot], device=verb.device), verb[None])
                if delta is not None:
                    logits = logits + delta[0]
            out.append(logits.float())
        return out

    # -- shared -----------------------------------------------------------------------------------------------------
    def _encode_state(self, prefixes: list[DevicePrefix | None], lengths: list[int]) -> ForwardState:
        new = torch.tensor(lengths, device=self.bb.device)
        return ForwardState("encode", self.pool, *self._prefix_index(prefixes), new=new, layers=self.layers)

    def _bias_slots(self, prefixes: list[DevicePrefix | None]) -> torch.Tensor | None:
        """(B,) long, each row's slot in the bias table; None when no row has bias deltas."""
        slots = [0 if p is None else p.bias_slot for p in prefixes]
        return torch.tensor(slots, device=self.bb.device) if any(slots) else None

    def _prefix_index(self, prefixes: list[DevicePrefix | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Pmax) pool positions and (B,) lengths of the rows' key/value prefixes."""
        dev = self.bb.device
        lens = [0 if p is None else p.kv_len for p in prefixes]
        index = torch.zeros(len(prefixes), max(lens, default=0), dtype=torch.long, device=dev)
        for i, p in enumerate(prefixes):
            if lens[i]:
                index[i, : lens[i]] = p.index  # type: ignore[union-attr]
        return index, torch.tensor(lens, device=dev)


def head_logits(
    prefix: DevicePrefix | None, mean: torch.Tensor, first_or_last: torch.Tensor, pooler: torch.Tensor | None = None
) -> torch.Tensor:
    """A classification head's logits (C,) fp32 over one row, pooled as the head asks.

    mean: the mean of the row's input-token states; first_or_last: the [CLS] state (encoders) or the last real
    token's state (causal LMs); pooler: the encoder's pooler output for the row.
    """
    assert prefix is not None and prefix.head is not None, "classification rows are checked for a head"
    head = prefix.head
    x = pool(head.pooling, mean, first_or_last, pooler)
    logits = x @ head.weight.T + (head.bias if head.bias is not None else 0)  # (C,)
    return logits.float()


def pool(
    pooling: str, mean: torch.Tensor, first_or_last: torch.Tensor, pooler: torch.Tensor | None = None
) -> torch.Tensor:
    """One row's pooled state (hidden,): "pooler", "mean", or "cls" / "last_token" (first_or_last)."""
    if pooling == "pooler":
        assert pooler is not None, "pooler pooling is checked against the backbone"
        return pooler
    if pooling == "mean":
        return mean
    return first_or_last
