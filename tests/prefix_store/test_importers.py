"""One entry point for every upload format: the parts each takes, and what a wrong set of parts is told."""

from __future__ import annotations

import pytest
import torch

from prefix_store import ArtifactFormatError, PrefixArtifact, encode
from prefix_store.importers import FORMATS, ImportContext, import_adapter
from tests.prefix_store.test_artifact import TINY_LLAMA


def test_an_artifact_upload_is_renamed_to_its_task():
    art = PrefixArtifact(task="old", method="p_tuning_v2", fingerprint=TINY_LLAMA, kv=torch.ones(3, 2, 2, 4, 8))
    got = import_adapter("artifact", {"artifact": encode(art)}, ImportContext(task="new", backbone=TINY_LLAMA))
    assert got.task == "new" and torch.equal(got.kv, art.kv)


def test_wrong_parts_and_unknown_forms_are_named():
    ctx = ImportContext(task="t", backbone=TINY_LLAMA)
    with pytest.raises(ArtifactFormatError, match=r"a peft upload has the parts \['adapter_config.json', 'adapter"):
        import_adapter("peft", {"adapter_config.json": b"{}"}, ctx)
    with pytest.raises(ArtifactFormatError, match="adapter format 'lora': expected one of artifact, peft"):
        import_adapter("lora", {}, ctx)
    with pytest.raises(ArtifactFormatError, match="compared with the serving backbone"):
        import_adapter("state_dict", {"state_dict": b""}, ctx)
    assert set(FORMATS) == {"artifact", "peft", "state_dict", "vpt_checkpoint"}
