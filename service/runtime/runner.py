"""Runs the frozen backbone on mixed-prefix batches: prefill chunks, decode, encoder classification, and turning an
artifact into device tensors. Tensors only; everything here runs on the engine's one worker thread.

Positions: a row's j-th prompt token gets position P + j, P its prefix length (PEFT's layout, see prefix_kv.py);
soft prompts on causal LMs are key/values at positions 0..P-1, computed once when the prefix is loaded
(runtime/methods/soft_prompt.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch

from prefix_store import ClassificationHead, PrefixArtifact, VersionKey

from .attention import ForwardState, serving
from .backbone import Backbone, vit_layers
from .bias import BiasTable
from .heads import head_logits, mlm_states, pool, verbalizer_logits
from .kv_cache import PrefixPool, SlotCache
from .low_rank import LowRankTable
from .prefix_kv import right_pad, token_positions
from .scaling import ScaleTable


@dataclass
class DevicePrefix:
    """A task version ready to run on the device.

    index: (P,) long, its key/values' positions in the PrefixPool (DeviceParts.kv of its family); None when it has
        none.
    soft_prompt: (P, hidden) input embeddings (DeviceParts.embeds: soft prompts on encoders, VPT-shallow).
    head: the classification head, its tensors on the device.
    bias_slot: the task's slot in the BiasTable (bias methods), 0 for none.
    lora_slot: its slot in the LowRankTable (low-rank methods), 0 for none.
    scale_slot: its slot in the ScaleTable (scaling methods), 0 for none.
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
    lora_slot: int = 0
    scale_slot: int = 0

    @property
    def table_slots(self) -> tuple[int, int, int]:
        """Its slots in the per-row tables, in ModelRunner.tables' order (bias, low rank, scale)."""
        return (self.bias_slot, self.lora_slot, self.scale_slot)

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
        self.low_rank = LowRankTable(backbone)
        self.scales = ScaleTable(backbone)
        self.body = backbone.body
        self.embed = backbone.embeddings
        self.layers = backbone.fingerprint.num_layers  # attention layers: each runs once per forward
        tok = backbone.tokenizer
        self.pad_id = (tok.pad_token_id if tok is not None else None) or 0

    # -- loading ----------------------------------------------------------------------------------------------------
    def head_tensors(self, artifact: PrefixArtifact) -> ClassificationHead | None:
        head = artifact.head
        if head is None:
            return None
        dev, dt = self.bb.device, self.bb.dtype

        def put(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=dev, dtype=dt)

        return ClassificationHead(put(head.weight), put(head.bias), list(head.labels), head.pooling, head.token_ids)

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
        with serving(self.body.config, state), self.adapted(self.table_slots([c.prefix for c in chunks])):
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
        table_slots: torch.Tensor | None = None,
        task_names: Sequence[Hashable] | None = None,
    ) -> torch.Tensor:
        """One token per row for rows in slots 0..B-1: tokens, positions, past (tokens in each slot) (B,), prefix
        positions (B, Pmax) and lengths (B,), slots in the per-row tables (B, 3) (see `adapted`). Appends the tokens'
        key/values to the slots; returns next-token logits (B, V) fp32."""
        state = ForwardState(
            "decode",
            self.pool,
            prefix_index,
            prefix_len,
            new=torch.ones_like(past),
            cache=self.cache,
            past=past,
            layers=self.layers,
            task_names=task_names,
        )
        with serving(self.body.config, state), self.adapted(table_slots):
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
                soft = None if it.prefix is None else it.prefix.soft_prompt
                if soft is not None and n_soft[i]:
                    embeds[i, : n_soft[i]] = soft
            inputs = {"inputs_embeds": embeds}
        prefixes = [it.prefix for it in items]
        state = self._encode_state(prefixes, lengths)
        slots = self.table_slots(prefixes)
        with serving(self.body.config, state), self.adapted(slots):
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
                assert it.prefix is not None and it.prefix.head is not None, "classification rows have a head"
                logits.append(head_logits(it.prefix.head, mean, first, pooler))
        verbal = [i for i, x in enumerate(logits) if x is None]
        if verbal:
            mask_id = self.bb.mask_token_id
            assert mask_id is not None, "verbalizer tasks are refused on backbones without a [MASK] token"
            pos = [n_soft[i] + items[i].input_ids.index(mask_id) for i in verbal]  # the first [MASK] of each row
            states = h[verbal, pos]  # (n, hidden)
            bias = slots[verbal, 0] if slots is not None else None
            for i, row_logits in zip(verbal, self.verbalize(states, [prefixes[i] for i in verbal], bias), strict=True):
                logits[i] = row_logits
        scored = [x for x in logits if x is not None]
        assert len(scored) == len(items), "every row has its logits: the verbalizer rows' were filled in above"
        return scored

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
            soft = None if it.prefix is None else it.prefix.soft_prompt
            if soft is not None and shallow[i]:
                x[i, 1 : 1 + shallow[i]] = soft
            x[i, 1 + shallow[i] : lengths[i]] = emb[i, 1:]
        prefixes = [it.prefix for it in items]
        state = self._encode_state(prefixes, lengths)
        with serving(self.body.config, state), self.adapted(self.table_slots(prefixes)):
            for layer in vit_layers(self.body):
                x = layer(x, None)
        h = self.body.layernorm(x)  # (B, T, hidden)
        out = []
        for i, it in enumerate(items):
            mean, first = h[i, 1 + shallow[i] : lengths[i]].mean(0), h[i, 0]  # patches only; [CLS]
            if it.embed:
                out.append(pool(self.bb.pooling, mean, first).float())
            else:
                assert it.prefix is not None and it.prefix.head is not None, "classification rows have a head"
                out.append(head_logits(it.prefix.head, mean, first))
        return out

    def verbalize(
        self, states: torch.Tensor, prefixes: list[DevicePrefix | None], slots: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """Label logits (C_i,) fp32 of verbalizer rows from their [MASK] states (n, hidden): the masked-LM head at
        each row's verbalizer tokens only, `transform(h) . E[verb]^T + b_dec[verb] + delta_dec[verb]`."""
        mlm = self.bb.mlm
        assert mlm is not None, "verbalizer tasks are refused on backbones without a masked-LM scoring"
        with self.biases.rows(slots):  # the transform's dense and LayerNorm carry bias deltas too
            z = mlm_states(mlm, states)  # (n, hidden)
        out = []
        for i, p in enumerate(prefixes):
            assert p is not None and p.verbalizer is not None
            verb = p.verbalizer  # (C,)
            delta = None
            if p.bias_slot:  # (1, C) the task's decoder-bias delta at its label tokens, or None
                delta = self.biases.decoder_bias(torch.tensor([p.bias_slot], device=verb.device), verb[None])
            out.append(verbalizer_logits(mlm, z[i : i + 1], verb, delta)[0])
        return out

    # -- shared -----------------------------------------------------------------------------------------------------
    def _encode_state(self, prefixes: list[DevicePrefix | None], lengths: list[int]) -> ForwardState:
        new = torch.tensor(lengths, device=self.bb.device)
        return ForwardState("encode", self.pool, *self._prefix_index(prefixes), new=new, layers=self.layers)

    @contextlib.contextmanager
    def adapted(self, slots: torch.Tensor | None) -> Iterator[None]:
        """The forward inside applies each row's per-row adapters: `slots` (B, 3) its slots in the bias, low-rank
        and scale tables (DevicePrefix.table_slots), 0 where it has none; None: no row has any."""
        with (
            self.biases.rows(None if slots is None else slots[:, 0]),
            self.low_rank.rows(None if slots is None else slots[:, 1]),
            self.scales.rows(None if slots is None else slots[:, 2]),
        ):
            yield

    def table_slots(self, prefixes: list[DevicePrefix | None]) -> torch.Tensor | None:
        """(B, 3) long, each row's slots in the per-row tables; None when no row has any."""
        slots = [(0, 0, 0) if p is None else p.table_slots for p in prefixes]
        return torch.tensor(slots, device=self.bb.device) if any(map(any, slots)) else None

    def _prefix_index(self, prefixes: list[DevicePrefix | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Pmax) pool positions and (B,) lengths of the rows' key/value prefixes."""
        dev = self.bb.device
        lens = [0 if p is None else p.kv_len for p in prefixes]
        index = torch.zeros(len(prefixes), max(lens, default=0), dtype=torch.long, device=dev)
        for i, p in enumerate(prefixes):
            if p is not None and p.index is not None and lens[i]:  # lens[i] > 0: the row's prefix has an index
                index[i, : lens[i]] = p.index
        return index, torch.tensor(lens, device=dev)
