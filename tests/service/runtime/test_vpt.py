"""Visual Prompt Tuning (Jia et al. 2022) on a ViT, served mixed: two VPT-deep tasks of different P, a VPT-shallow
task and bare rows in one forward, each row equal to an independent layer-by-layer implementation of the paper's
method (fp32, max |dlogit| <= 1e-5); negative controls (deep keys/values without the layer's LayerNorm; shallow
prompts given position embeddings) must fail, and a guard fails if the prompts stop reaching the attention. The engine
is driven directly (no Redis), the artifacts as the store hands them back."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import ViTConfig, ViTModel

from prefix_store import BackboneFingerprint, BackboneMismatch, ClassificationHead, PrefixArtifact
from service.runtime import EngineRequest, Kind, wrap_model
from service.runtime.backbone import vit_layers
from service.runtime.methods import check as check_artifact
from service.runtime.methods import visual_prompt
from tests.engine_harness import engine_for, run_engine, stored
from tests.models import seeded_init

LABELS = ["a", "b", "c"]


def tiny_vit() -> ViTModel:
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        layer_norm_eps=1e-6,  # the reference code's
    )
    model = ViTModel(config)
    seeded_init(model, 0)
    return model.eval()


# -- the reference: the paper's method, layer by layer, attention by hand --------------------------------------------
def attention(layer, x: torch.Tensor) -> torch.Tensor:
    """One ViT layer on tokens x (T, hidden): pre-LN self-attention and MLP, softmax written out."""
    att = layer.attention
    H, D = att.num_attention_heads, att.head_dim
    h = layer.layernorm_before(x)
    q, k, v = (proj(h).view(-1, H, D).transpose(0, 1) for proj in (att.q_proj, att.k_proj, att.v_proj))  # (H, T, D)
    probs = torch.softmax(q @ k.transpose(1, 2) * D**-0.5, dim=-1)
    x = x + att.o_proj((probs @ v).transpose(0, 1).reshape(x.shape[0], -1))
    return x + layer.mlp(layer.layernorm_after(x))


@torch.no_grad()
def reference(vit: ViTModel, pixels: torch.Tensor, art: PrefixArtifact | None) -> torch.Tensor:
    """VPT as Jia et al. define it: shallow prompts inserted after [CLS] after the position embeddings were added;
    deep prompts inserted at every layer's input, their outputs dropped. Head over [CLS] after the final LayerNorm."""
    x = vit.embeddings(pixels[None])[0]  # (1 + N, hidden)
    if art is not None and art.soft_prompt is not None:
        x = torch.cat([x[:1], art.soft_prompt, x[1:]])
    for i, layer in enumerate(vit.layers):
        if art is not None and art.deep_prompt is not None:
            P = art.deep_prompt.shape[1]
            out = attention(layer, torch.cat([x[:1], art.deep_prompt[i], x[1:]]))
            x = torch.cat([out[:1], out[1 + P :]])
        else:
            x = attention(layer, x)
    h = vit.layernorm(x)
    head = art.head if art is not None else None
    return h[0] if head is None else h[0] @ head.weight.T + head.bias


def vpt(vit: ViTModel, task: str, method: str, P: int, seed: int) -> PrefixArtifact:
    fp = BackboneFingerprint.from_config(vit.config)
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randn(
        (fp.num_layers, P, fp.hidden_size) if method == "vpt_deep" else (P, fp.hidden_size), generator=g
    )
    head = ClassificationHead(torch.randn(3, fp.hidden_size, generator=g), torch.randn(3, generator=g), LABELS, "cls")
    return PrefixArtifact(
        task=task,
        method=method,
        fingerprint=fp,
        deep_prompt=prompts if method == "vpt_deep" else None,
        soft_prompt=prompts if method == "vpt_shallow" else None,
        head=head,
    )


def serve_all(
    vit, arts: list[PrefixArtifact], images: torch.Tensor, bare: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Every artifact's row, and one bare row per image in `bare` (no task: the backbone's embedding, the bare
    [CLS] state after the final LayerNorm, unit length), all in one forward; returns head logits, then embeddings."""
    engine = engine_for(copy.deepcopy(vit))
    reqs = [EngineRequest(f"r{i}", Kind.CLASSIFY, [], stored(a), pixel_values=images[i]) for i, a in enumerate(arts)]
    for j, img in enumerate(bare if bare is not None else []):
        reqs.append(EngineRequest(f"bare{j}", Kind.EMBED, [], None, pixel_values=img))
    got = run_engine(engine, reqs)
    outs = [o for r in reqs for o in got[r.request_id]]
    assert len(outs) == len(reqs), "one output per row"
    assert len({o.step for o in outs}) == 1, "the rows shared one forward"
    return [o.logits if o.embedding is None else o.embedding for o in outs]


def case():
    vit = tiny_vit()
    arts = [
        vpt(vit, "deep5", "vpt_deep", 5, 1),
        vpt(vit, "deep2", "vpt_deep", 2, 2),
        vpt(vit, "shallow", "vpt_shallow", 4, 3),
        vpt(vit, "deep5b", "vpt_deep", 5, 4),
    ]
    images = torch.randn(len(arts), 3, 16, 16, generator=torch.Generator().manual_seed(5))
    return vit, arts, images


def test_deep_shallow_and_bare_rows_mixed_match_the_reference():
    vit, arts, images = case()
    bare = images.flip(0)[:2]
    got = serve_all(vit, arts, images, bare)
    for art, img, logits in zip(arts, images, got, strict=False):
        diff = (logits - reference(vit, img, art)).abs().max().item()
        assert diff <= 1e-5, (art.task, diff)
    for img, emb in zip(bare, got[len(arts) :], strict=True):
        want = torch.nn.functional.normalize(reference(vit, img, None), dim=0)
        assert (emb - want).abs().max().item() <= 1e-5


def test_control_deep_keys_without_the_layer_norm_fail(monkeypatch):
    vit, arts, images = case()

    def without_ln(bb, prompts):
        fp = bb.fingerprint
        out = []
        for i, layer in enumerate(vit_layers(bb.body)):
            att, P = layer.attention, prompts.shape[1]
            k = att.k_proj(prompts[i]).view(P, fp.num_kv_heads, fp.head_dim).transpose(0, 1)
            v = att.v_proj(prompts[i]).view(P, fp.num_kv_heads, fp.head_dim).transpose(0, 1)
            out.append(torch.stack([k, v]))
        return torch.stack(out)

    monkeypatch.setattr(visual_prompt, "deep_prompt_kv", without_ln)
    got = serve_all(vit, arts[:2], images)
    assert all((g - reference(vit, img, a)).abs().max() > 1e-3 for a, img, g in zip(arts, images, got, strict=False))


def test_control_shallow_prompts_with_position_embeddings_fail():
    """Served as if the prompts had taken the positions of the first patches, the row no longer matches."""
    vit, arts, images = case()
    shallow = arts[2]
    pos = vit.embeddings.position_embeddings[0, 1 : 1 + shallow.num_virtual_tokens].detach()
    moved = PrefixArtifact(**{**vars(shallow), "task": "moved", "soft_prompt": shallow.soft_prompt + pos})
    (got,) = serve_all(vit, [moved], images[2:3])
    assert (got - reference(vit, images[2], shallow)).abs().max() > 1e-3


def test_guard_the_prompts_reach_the_attention():
    """transformers' ViT ignores past_key_values silently: if the deep prompts stopped entering through the
    registered attention, the rows would equal the prompt-free model's. They must not."""
    vit, arts, images = case()
    got = serve_all(vit, arts[:2], images)
    for art, img, logits in zip(arts, images, got, strict=False):
        bare = reference(vit, img, None) @ art.head.weight.T + art.head.bias
        assert (logits - bare).abs().max() > 1e-2


def test_methods_fit_only_their_backbone_kind():
    vit = wrap_model(tiny_vit(), None, name="vit")
    soft = PrefixArtifact(task="t", method="prompt_tuning", fingerprint=vit.fingerprint, soft_prompt=torch.randn(3, 32))
    with pytest.raises(BackboneMismatch, match="prompt_tuning .soft_prompt. is served on causal, encoder backbones"):
        check_artifact(vit, soft)
    from tests.models import tiny_model

    gpt2 = wrap_model(tiny_model("gpt2"), None, name="gpt2")
    fp = gpt2.fingerprint
    deep = PrefixArtifact(task="t", method="vpt_deep", fingerprint=fp, deep_prompt=torch.randn(fp.num_layers, 2, 64))
    with pytest.raises(BackboneMismatch, match="vpt_deep .visual_prompt. is served on image backbones"):
        check_artifact(gpt2, deep)


def test_a_vit_directory_loads_as_an_image_backbone(tmp_path):
    from transformers import ViTImageProcessor

    from service.runtime import load_backbone

    tiny_vit().save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path), device="cpu")
    assert bb.is_image and bb.is_encoder and bb.tokenizer is None and bb.pooling == "cls"
    assert bb.image_processor.size == {"height": 16, "width": 16}
    assert [layer.attention.layer_idx for layer in bb.body.layers] == [0, 1, 2]
