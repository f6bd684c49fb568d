"""VPT end to end: trained by the trainer on an image folder, published, classified through the REST API; the
trainer's own forward (prompts as tokens, layer by layer) equals what the server serves (prompts as keys/values)."""

from __future__ import annotations

import base64
import copy
import uuid

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from prefix_store import encode
from prefix_store.jobs import PathNotAllowed, TrainSpec
from service.app import create_app
from service.runtime import wrap_model
from service.settings import ServiceSettings
from tests.service.runtime.test_vpt import reference, tiny_vit
from trainer.train import train

pytestmark = pytest.mark.redis


def image_folder(root, per_class: int = 16):
    """Two classes of 16x16 noise: mostly red, mostly blue."""
    rng = np.random.default_rng(0)
    for label, channel in (("red", 0), ("blue", 2)):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 100, (16, 16, 3), dtype=np.uint8)
            img[..., channel] = rng.integers(150, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(img).save(root / label / f"{i}.png")
    return root


@pytest.mark.parametrize("method", ["vpt_deep", "vpt_shallow"])
def test_vpt_trained_on_a_folder_is_served_through_the_api(method, tmp_path, redis_url):
    vit = tiny_vit()
    folder = image_folder(tmp_path / "images")
    spec = TrainSpec(
        task="colors",
        method=method,
        data=str(folder),
        steps=40,
        eval_every=20,
        batch_size=8,
        num_virtual_tokens=3,
        lr=5e-2,
        dev_fraction=0.25,
    )
    result = train(wrap_model(copy.deepcopy(vit), None, name="vit"), spec)
    art = result.artifact
    assert art.method == method and art.head.labels == ["blue", "red"] and art.head.pooling == "cls"
    assert result.metrics["accuracy"] >= 0.75, result.history

    s = ServiceSettings(redis_url=redis_url, namespace=f"vpt-e2e-{uuid.uuid4().hex[:8]}")
    with TestClient(create_app(s, backbone=wrap_model(copy.deepcopy(vit), None, name="vit"))) as client:
        assert client.put("/v1/tasks/colors", files={"artifact": ("a", encode(art))}).status_code == 201
        path = folder / "red" / "0.png"
        r = client.post(
            "/v1/classify", json={"task": "colors", "images": [base64.b64encode(path.read_bytes()).decode()]}
        )
        assert r.status_code == 200, r.text
        scores = r.json()["results"][0]["scores"]
        processor = client.app.state.services.backbone.image_processor
        px = processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")["pixel_values"][0]
        want = torch.softmax(reference(vit, px, art), -1).tolist()
        assert [scores["blue"], scores["red"]] == pytest.approx(want, abs=1e-5)


def test_a_queued_jobs_images_must_lie_inside_the_data_folders(tmp_path):
    """With data_dirs (a worker's PREFIXSERVE_TRAIN_DATA_DIRS) every image is checked before one is opened: a
    symbolic link out of the folder, or a CSV row naming a file outside, fails the job, and the error counts them
    but never names them (a path from a CSV is file content)."""
    vit = wrap_model(tiny_vit(), None, name="vit")
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    folder = image_folder(allowed / "images")
    image_folder(outside)
    (folder / "red" / "99.png").symlink_to(outside / "red" / "0.png")
    spec = TrainSpec(task="colors", method="vpt_shallow", data=str(folder), steps=2, num_virtual_tokens=2)
    with pytest.raises(PathNotAllowed, match="1 of its 33 images lie outside") as e:
        train(vit, spec, data_dirs=[str(allowed)])
    assert "outside/" not in str(e.value) and "99.png" not in str(e.value)
    (allowed / "rows.csv").write_text(f"path,label\nimages/red/0.png,red\n{outside}/blue/0.png,blue\n")
    csv_spec = spec.model_copy(update={"data": str(allowed / "rows.csv")})
    with pytest.raises(PathNotAllowed, match="1 of its 2 images lie outside") as e:
        train(vit, csv_spec, data_dirs=[str(allowed)])
    assert str(outside) not in str(e.value)
    with pytest.raises(PathNotAllowed, match="data '/etc/passwd' is outside"):
        train(vit, spec.model_copy(update={"data": "/etc/passwd"}), data_dirs=[str(allowed)])
    (folder / "red" / "99.png").unlink()
    assert train(vit, spec, data_dirs=[str(allowed)]).steps == 2  # inside: trains
