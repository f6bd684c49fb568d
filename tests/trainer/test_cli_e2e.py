"""The command line path on real E2E data: `python -m trainer train` trains prefix_tuning on a tiny random GPT-2
(with MiniLM's WordPiece tokenizer, since no pretrained causal LM is offline), publishes to the embedded Redis,
exports a PEFT adapter, and the service serves the new version."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from prefix_store import EmbeddedRedis
from service.app import create_app
from service.runtime import load_backbone, resolve_source
from service.settings import DEFAULT_BACKBONE, ServiceSettings
from tests.service.live import live_server

pytestmark = [pytest.mark.redis, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
E2E = ROOT.parent / "shared" / "data" / "e2e"


def tiny_gpt2_dir(path: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(resolve_source(DEFAULT_BACKBONE))
    tok.eos_token = "[SEP]"
    cfg = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=len(tok),
        n_positions=256,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.skipif(not E2E.is_dir(), reason="shared/data is not beside the checkout")
def test_cli_trains_on_e2e_publishes_and_the_service_serves_it(tmp_path):
    model_dir = tiny_gpt2_dir(tmp_path / "gpt2")
    data_dir = Path("/tmp") / f"ps-cli-{os.getpid()}"  # short: the embedded server's socket lives there
    env = {
        **os.environ,
        "PREFIXSERVE_BACKBONE": str(model_dir),
        "PREFIXSERVE_DATA_DIR": str(data_dir),
        "PREFIXSERVE_WORK_DIR": str(tmp_path / "work"),
        "PREFIXSERVE_LOCAL_FILES_ONLY": "true",
    }
    env.pop("PREFIXSERVE_REDIS_URL", None)
    cmd = [
        sys.executable,
        "-m",
        "trainer",
        "train",
        "--task",
        "e2e",
        "--method",
        "prefix_tuning",
        "--data",
        str(E2E / "trainset.csv"),
        "--dev-data",
        str(E2E / "devset.csv"),
        "--limit",
        "400",
        "--dev-limit",
        "40",
        "--steps",
        "40",
        "--eval-every",
        "20",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--num-virtual-tokens",
        "5",
        "--max-new-tokens",
        "12",
        "--export-peft",
        str(tmp_path / "peft"),
        # 40 steps on a random 2-layer GPT-2 barely move the loss: the run is reported degenerate, and this test,
        # about the path from CLI to serving, publishes it anyway.
        "--publish-degenerate",
        "true",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["published"] and result["version"] == 1 and result["steps"] == 40
    assert "training loss did not fall" in result["degenerate"]
    assert {"bleu", "rougeL"} <= set(result["metrics"])
    assert (tmp_path / "peft" / "adapter_config.json").exists()

    server = EmbeddedRedis(data_dir)  # the CLI's embedded Redis persisted to its append-only file
    url = server.start()
    try:
        app = create_app(ServiceSettings(redis_url=url), backbone=load_backbone(str(model_dir), local_files_only=True))
        with live_server(app) as base:

            async def ask():
                async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                    return await c.post(
                        "/v1/generate",
                        json={"task": "e2e", "max_new_tokens": 8, "prompt": "name[The Vaults], eatType[pub]"},
                    )

            r = asyncio.run(ask())
        assert r.status_code == 200 and r.json()["version"] == 1
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)
