"""POST /v1/embeddings on a tiny BERT, through the ASGI transport (no socket): the bare backbone's and a prefix task's
pooled states, unit length, equal to a reference run of the model (the task's through PEFT); base64 encoding; errors
name the field."""

from __future__ import annotations

import base64
import struct

import pytest
import torch
from peft import PrefixTuningConfig

from service.runtime.backbone import default_pooling
from tests.engine_harness import publish_peft, trained_peft
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import asgi_client
from tests.service.test_inference_api import make_app  # noqa: F401 (fixture)

pytestmark = pytest.mark.redis
IDS = [[5, 6, 7], [9, 10, 11, 12, 13]]


def pooled(out, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(hidden,) the reference's pooled state of one row, unit length."""
    h = out.last_hidden_state[0, -mask.shape[0] :]  # the input tokens (a prefix adds no hidden states)
    x = {"pooler": out.pooler_output[0], "cls": h[0], "mean": h.mean(0)}[pooling]
    return torch.nn.functional.normalize(x, dim=0)


@pytest.mark.peft_reference("seq_cls")
async def test_embeddings_of_the_bare_backbone_and_a_task(store, make_app, tmp_path):  # noqa: F811
    bert = tiny_model("bert-cls")
    pm = trained_peft(bert, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4), seed=5)
    await publish_peft(store, pm, "sent", bert.config, tmp_path / "sent", labels=["neg", "neu", "pos"])
    pooling = default_pooling(bert.bert, None)
    captured = []
    handle = pm.base_model.bert.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        bare = [pooled(bert.bert(input_ids=torch.tensor([ids])), torch.ones(len(ids)), pooling) for ids in IDS]
        for ids in IDS:
            pm(input_ids=torch.tensor([ids]))
    handle.remove()
    task = [pooled(out, torch.ones(len(ids)), pooling) for out, ids in zip(captured, IDS, strict=True)]
    async with asgi_client(make_app(bert.bert, tiny_tokenizer(), name="tiny-bert"), timeout=30) as c:
        models = (await c.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["base", "sent"]
        for model, want in (("base", bare), ("sent", task)):
            r = await c.post("/v1/embeddings", json={"model": model, "input": IDS})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["object"] == "list" and out["model"] == model
            assert out["usage"] == {"prompt_tokens": 8, "total_tokens": 8}
            for d, w in zip(out["data"], want, strict=True):
                got = torch.tensor(d["embedding"])
                assert d["object"] == "embedding" and (got - w).abs().max() <= 1e-5, model
                assert abs(got.norm().item() - 1) < 1e-5
        assert (task[0] - bare[0]).abs().max() > 1e-3, "the prefix shapes the embedding"
        r = await c.post("/v1/embeddings", json={"model": "sent", "input": IDS[0], "encoding_format": "base64"})
        raw = base64.b64decode(r.json()["data"][0]["embedding"])
        vec = torch.tensor(struct.unpack(f"<{len(raw) // 4}f", raw))
        assert (vec - task[0]).abs().max() <= 1e-5
        text = (await c.post("/v1/embeddings", json={"model": "base", "input": "w5 w6"})).json()
        assert len(text["data"]) == 1 and text["usage"]["prompt_tokens"] >= 2
        hidden = bert.config.hidden_size
        for body, status, words in [
            ({"model": "base", "input": IDS, "dimensions": 3}, 400, f"embeds in {hidden} dimensions"),
            ({"model": "nope", "input": "w5"}, 404, "not found"),
            ({"model": "base", "input": []}, 400, "input"),
            ({"model": "base", "input": [[5], [10**9]]}, 400, "input: expected token ids"),
            ({"model": "base", "input": "w5", "encoding_format": "int8"}, 400, "encoding_format"),
            ({"model": "base", "input": "w5", "truncate": True}, 400, "truncate"),
        ]:
            r = await c.post("/v1/embeddings", json=body)
            assert r.status_code == status and words in r.text, (body, r.text)


async def test_embeddings_on_a_causal_lm_are_refused(make_app):  # noqa: F811
    async with asgi_client(make_app(tiny_model("llama"), tiny_tokenizer()), timeout=30) as c:
        r = await c.post("/v1/embeddings", json={"model": "base", "input": "w5"})
        assert r.status_code == 400 and "causal LM" in r.json()["error"]["message"]
