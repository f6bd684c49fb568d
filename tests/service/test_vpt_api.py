"""Images over HTTP on a ViT backbone: a VPT task classifies base64 images and data URLs as the reference does;
bad images, text on an image backbone, images on a text one and bad VPT artifacts are 400/409 naming the problem."""

from __future__ import annotations

import base64
import copy
import io
import uuid

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save as st_save

from prefix_store import PrefixArtifact, encode
from service.app import create_app
from service.runtime import wrap_model
from service.settings import ServiceSettings
from tests.factories import rewrite_blob
from tests.models import tiny_model
from tests.service.runtime.test_vpt import LABELS, reference, tiny_vit, vpt

pytestmark = pytest.mark.redis


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def client(redis_url, model, tokenizer=None):
    s = ServiceSettings(redis_url=redis_url, namespace=f"vpt-{uuid.uuid4().hex[:8]}")
    return TestClient(create_app(s, backbone=wrap_model(copy.deepcopy(model), tokenizer, name="tiny-vit")))


def test_vpt_tasks_classify_images_as_the_reference(redis_url):
    vit = tiny_vit()
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), rng.integers(0, 256, (16, 16), dtype=np.uint8)]
    with client(redis_url, vit) as c:
        for art in (vpt(vit, "deep", "vpt_deep", 3, 1), vpt(vit, "shallow", "vpt_shallow", 2, 2)):
            r = c.put(f"/v1/tasks/{art.task}", files={"artifact": ("a.safetensors", encode(art))})
            assert r.status_code == 201, r.text
            images = [b64(png(pictures[0])), "data:image/jpeg;base64," + b64(png(pictures[1], "JPEG"))]
            r = c.post("/v1/classify", json={"task": art.task, "images": images})
            assert r.status_code == 200, r.text
            processor = c.app.state.services.backbone.image_processor
            decoded = [Image.open(io.BytesIO(base64.b64decode(x.split(",")[-1]))).convert("RGB") for x in images]
            pixels = processor(images=decoded, return_tensors="pt")["pixel_values"]
            for result, px in zip(r.json()["results"], pixels, strict=True):
                want = torch.softmax(reference(vit, px, art), -1).tolist()
                got = [result["scores"][label] for label in LABELS]
                assert got == pytest.approx(want, abs=1e-5)


def test_image_embeddings_bare_and_through_a_task(redis_url):
    """/v1/embeddings on a ViT: [CLS] after the final LayerNorm, unit length, bare or through a VPT task's prompts."""
    vit = tiny_vit()
    picture = b64(png(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    with client(redis_url, vit) as c:
        art = vpt(vit, "deep", "vpt_deep", 3, 1)
        assert c.put("/v1/tasks/deep", files={"artifact": ("a", encode(art))}).status_code == 201
        processor = c.app.state.services.backbone.image_processor
        px = processor(images=[Image.open(io.BytesIO(base64.b64decode(picture))).convert("RGB")], return_tensors="pt")
        for model, ref_art in (("base", None), ("deep", art)):
            r = c.post("/v1/embeddings", json={"model": model, "input": [picture]})
            assert r.status_code == 200, r.text
            h = reference(vit, px["pixel_values"][0], None if ref_art is None else vpt_without_head(ref_art))
            got = torch.tensor(r.json()["data"][0]["embedding"])
            assert (got - torch.nn.functional.normalize(h, dim=0)).abs().max() <= 1e-5, model
        r = c.post("/v1/embeddings", json={"model": "base", "input": [[1, 2]]})
        assert r.status_code == 400 and "embeds images" in r.text


def vpt_without_head(art: PrefixArtifact) -> PrefixArtifact:
    return PrefixArtifact(**{**vars(art), "head": None})


def test_bad_images_and_wrong_inputs_are_400(redis_url):
    vit = tiny_vit()
    ok = b64(png(np.zeros((8, 8, 3), dtype=np.uint8)))
    huge = b64(png(np.zeros((4100, 4100), dtype=bool)))  # 1-bit: a small file of 16.8 M pixels
    cases = [
        ({"images": ["!!! not base64"]}, "images[0]: not valid base64"),
        ({"images": [ok, b64(b"GIF89a but not really")]}, "images[1]: not an image"),
        ({"images": [b64(png(np.zeros((32, 32, 3), dtype=np.uint8))[:60])]}, "images[0]: the image is damaged"),
        ({"images": [huge]}, "expected at most 4096 pixels a side"),
        ({"images": ["data:text/plain;base64," + ok]}, "images[0]: expected base64 or a data:image"),
        ({"text": "hello"}, "classifies 'images'"),
        ({"images": [ok], "text": "x"}, "exactly one of"),
    ]
    with client(redis_url, vit) as c:
        art = vpt(vit, "t", "vpt_deep", 2, 1)
        assert c.put("/v1/tasks/t", files={"artifact": ("a", encode(art))}).status_code == 201
        for body, needle in cases:
            r = c.post("/v1/classify", json={"task": "t", **body})
            assert r.status_code in (400, 422) and needle in r.text, (body.keys(), r.status_code, r.text[:300])

        # A VPT artifact of the wrong geometry, or a text method on an image backbone, is refused; nothing stored.
        def narrow(tensors):
            tensors["deep_prompt"] = torch.randn(art.fingerprint.num_layers, 2, 7)

        wrong = rewrite_blob(encode(art), tensor_edit=narrow, fix_checksum=True)
        r = c.put("/v1/tasks/t", files={"artifact": ("a", wrong)})
        assert r.status_code == 400 and "deep_prompt shape: expected (L, P, hidden)" in r.text, r.text
        soft = PrefixArtifact(
            task="t", method="prompt_tuning", fingerprint=art.fingerprint, soft_prompt=torch.ones(2, 32)
        )
        r = c.put("/v1/tasks/t", files={"artifact": ("a", encode(soft))})
        assert r.status_code == 409 and "is served on causal, encoder backbones" in r.text, r.text
        assert c.get("/v1/tasks/t").json()["versions"] == [1]


def test_images_on_a_text_backbone_are_400(redis_url):
    with client(redis_url, tiny_model("bert-cls").bert) as c:
        r = c.post("/v1/classify", json={"task": "x", "images": [b64(png(np.zeros((4, 4, 3), dtype=np.uint8)))]})
        assert r.status_code == 400 and "classifies text" in r.text


def test_a_vpt_reference_checkpoint_uploads_with_its_projection_folded_in(redis_url):
    """The reference code's layout (prompt_embeddings (1, P, hidden), deep_prompt_embeddings (L-1, P, hidden),
    prompt_proj, head.last_layer): served, it equals the reference forward of the projected prompts."""
    vit = tiny_vit()
    g = torch.Generator().manual_seed(3)
    L, P, H = 3, 4, 32
    ck = {
        "enc.transformer.prompt_embeddings": torch.randn(1, P, H, generator=g),
        "enc.transformer.deep_prompt_embeddings": torch.randn(L - 1, P, H, generator=g),
        "enc.transformer.prompt_proj.weight": torch.randn(H, H, generator=g) / H**0.5,
        "enc.transformer.prompt_proj.bias": torch.randn(H, generator=g),
        "head.last_layer.weight": torch.randn(3, H, generator=g),
        "head.last_layer.bias": torch.randn(3, generator=g),
    }
    proj = lambda x: x @ ck["enc.transformer.prompt_proj.weight"].T + ck["enc.transformer.prompt_proj.bias"]  # noqa: E731
    deep = torch.cat(
        [proj(ck["enc.transformer.prompt_embeddings"]), proj(ck["enc.transformer.deep_prompt_embeddings"])]
    )
    want_art = vpt(vit, "ref", "vpt_deep", P, 0)
    want_art.deep_prompt = deep
    want_art.head = type(want_art.head)(ck["head.last_layer.weight"], ck["head.last_layer.bias"], LABELS, "cls")
    img = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with client(redis_url, vit) as c:
        r = c.put("/v1/tasks/ref", files={"vpt_checkpoint": ("ck.safetensors", st_save(ck))}, data={"labels": "a,b,c"})
        assert r.status_code == 201 and r.json()["method"] == "vpt_deep", r.text
        r = c.post("/v1/classify", json={"task": "ref", "images": [b64(png(img))]})
        assert r.status_code == 200, r.text
        px = c.app.state.services.backbone.image_processor(images=[Image.fromarray(img)], return_tensors="pt")
        want = torch.softmax(reference(vit, px["pixel_values"][0], want_art), -1).tolist()
        assert [r.json()["results"][0]["scores"][x] for x in LABELS] == pytest.approx(want, abs=1e-5)
        bad = dict(ck, **{"enc.transformer.deep_prompt_embeddings": torch.zeros(5, P, H)})
        r = c.put("/v1/tasks/ref", files={"vpt_checkpoint": ("ck", st_save(bad))})
        assert r.status_code == 409 and "deep_prompt_embeddings" in r.text
