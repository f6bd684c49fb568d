"""The `make serve` path: settings from the environment, the bundled default backbone, the loopback rule."""

import pytest

from service.__main__ import is_loopback, main
from service.runtime import load_backbone
from service.settings import DEFAULT_BACKBONE, ServiceSettings


@pytest.mark.parametrize(
    "host, loop",
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host, loop):
    assert is_loopback(host) is loop


def test_refuses_open_service_off_loopback(monkeypatch, caplog):
    monkeypatch.delenv("PREFIXSERVE_API_KEYS", raising=False)
    monkeypatch.delenv("PREFIXSERVE_ADMIN_KEYS", raising=False)
    assert main(["--host", "0.0.0.0", "--port", "0"]) == 2
    assert "refusing to bind 0.0.0.0 without keys" in caplog.text


@pytest.mark.slow
def test_default_backbone_is_the_bundled_minilm_offline():
    assert ServiceSettings().backbone == DEFAULT_BACKBONE
    bb = load_backbone(DEFAULT_BACKBONE, local_files_only=True)
    assert bb.is_encoder and bb.fingerprint.model_type == "bert" and bb.fingerprint.num_layers == 6
    assert bb.fingerprint.hidden_size == 384 and bb.max_positions == 512
    assert bb.poolings == ("pooler", "cls", "mean", "mask")
    assert bb.mlm is not None and bb.mlm.transform is None, "MiniLM ships no MLM head: verbalizers use the embeddings"
    assert not any(p.requires_grad for p in bb.model.parameters()) and not bb.model.training
    assert bb.tokenizer("a great film")["input_ids"][0] == 101


def test_refuses_an_unsupported_backbone_family_at_start(tmp_path, monkeypatch, caplog):
    """`python -m service` with a backbone the engine is not proven on exits 2 with the model type, the reason and
    the supported families, before it opens Redis or loads any weights."""
    from transformers import BloomConfig

    BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64).save_pretrained(tmp_path)  # a config, no weights
    monkeypatch.setenv("PREFIXSERVE_BACKBONE", str(tmp_path))
    monkeypatch.setenv("PREFIXSERVE_ALLOW_UNVERIFIED_BACKBONE", "true")  # a family known not to work: refused anyway
    assert main(["--port", "0"]) == 2
    assert "backbone model type 'bloom'" in caplog.text and "BloomAttention" in caplog.text
    assert "Supported families" in caplog.text and "mistral" in caplog.text
