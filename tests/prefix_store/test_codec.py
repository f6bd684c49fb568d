import io
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from prefix_store import (
    ArtifactFormatError,
    ArtifactShapeError,
    ArtifactTooLarge,
    ChecksumMismatch,
    NonFiniteTensorError,
    decode,
    encode,
)
from tests.factories import make_artifact, rewrite_blob

METHODS = ["prefix_tuning", "p_tuning_v2", "prompt_tuning", "p_tuning"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_same(a, b):
    assert (a.task, a.method, a.version, a.fingerprint, a.training, a.created_at) == (
        b.task,
        b.method,
        b.version,
        b.fingerprint,
        b.training,
        b.created_at,
    )
    assert a.dtype == b.dtype and a.template == b.template
    assert len(a.tensors()) == len(b.tensors())
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
    assert (a.biases is None) == (b.biases is None)
    if a.biases is not None:
        assert a.biases.keys() == b.biases.keys()
        assert all(torch.equal(a.biases[k], b.biases[k]) for k in a.biases)
    for key in ("lora_modules", "scaled_modules"):  # LoRA ranks and scales, IA3 sides
        assert a.summary().get(key) == b.summary().get(key)
    assert (a.head is None) == (b.head is None)
    if a.head is not None:
        assert a.head.labels == b.head.labels and a.head.pooling == b.head.pooling
        assert a.head.token_ids == b.head.token_ids


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("labels", [None, ["neg", "pos"]])
def test_round_trip(method, dtype, labels):
    art = make_artifact(method=method, dtype=dtype, labels=labels)
    assert_same(decode(encode(art)), art)


def test_corrupted_tensor_bytes_fail_the_checksum():
    blob = bytearray(encode(make_artifact()))
    blob[-3] ^= 0xFF
    with pytest.raises(ChecksumMismatch, match="tensor checksum: metadata says sha256:"):
        decode(bytes(blob))


def test_wrong_checksum():
    blob = rewrite_blob(encode(make_artifact()), meta_edit=lambda m: m.update(checksum="sha256:" + "0" * 64))
    with pytest.raises(ChecksumMismatch):
        decode(blob)


@pytest.mark.parametrize("cut", [0, 5, 8, 100, -1])
def test_truncated_or_garbage_bytes(cut):
    blob = encode(make_artifact())
    with pytest.raises(ArtifactFormatError):
        decode(blob[:cut] if cut else b"not a tensor file at all")


def test_header_length_larger_than_file():
    with pytest.raises(ArtifactFormatError, match="header length"):
        decode(struct.pack("<Q", 10**9) + b"{}")


def test_pickle_and_torch_save_are_refused():
    with pytest.raises(ArtifactFormatError, match="got a pickle"):
        decode(pickle.dumps({"kv": torch.zeros(2)}))
    buf = io.BytesIO()
    torch.save({"kv": torch.zeros(2)}, buf)
    with pytest.raises(ArtifactFormatError, match="zip archive"):
        decode(buf.getvalue())


def test_non_finite_values_in_bytes():
    def poison(t):
        t["kv"][0, 0, 0, 0, 0] = float("nan")

    blob = rewrite_blob(encode(make_artifact()), tensor_edit=poison, fix_checksum=True)
    with pytest.raises(NonFiniteTensorError):
        decode(blob)


def test_shape_disagreeing_with_backbone():
    def widen(t):
        t["kv"] = torch.randn(3, 2, 4, 5, 8)  # H_kv = 4, the fingerprint says 2

    blob = rewrite_blob(encode(make_artifact()), tensor_edit=widen, fix_checksum=True)
    with pytest.raises(ArtifactShapeError, match="H_kv"):
        decode(blob)


def test_metadata_disagreeing_with_tensors():
    blob = rewrite_blob(encode(make_artifact()), meta_edit=lambda m: m.update(num_virtual_tokens=7))
    with pytest.raises(ArtifactFormatError, match="num_virtual_tokens: says 7, tensors have 5"):
        decode(blob)


def test_unexpected_tensor_and_dtype():
    def extra(t):
        t["evil"] = torch.zeros(1)

    with pytest.raises(ArtifactFormatError, match="tensors: expected"):
        decode(rewrite_blob(encode(make_artifact()), tensor_edit=extra, fix_checksum=True))

    def ints(t):
        t["kv"] = t["kv"].to(torch.int64)

    with pytest.raises(ArtifactFormatError, match="dtype"):
        decode(rewrite_blob(encode(make_artifact()), tensor_edit=ints, fix_checksum=True))


def test_oversized_blob():
    blob = encode(make_artifact(P=50))
    with pytest.raises(ArtifactTooLarge, match=f"artifact is {len(blob)} bytes: the limit is 1000"):
        decode(blob, max_bytes=1000)


def test_plain_safetensors_without_metadata_names_the_peft_route():
    with pytest.raises(ArtifactFormatError, match="adapter_config"):
        decode(st_save({"prompt_embeddings": torch.zeros(2, 3)}))


def test_header_lengths_whose_low_byte_is_a_pickle_opcode_decode():
    """Issue 10, finding 1: a safetensors file starts with its header length, and one length in 32 has the low byte
    0x80 (a pickle's first byte). Those valid artifacts were refused as pickles; 512 note lengths cover every low
    byte of the header length twice."""
    refused = []
    for n in range(512):
        art = make_artifact(training={"note": "x" * n})
        blob = encode(art)
        try:
            assert_same(decode(blob), art)
        except ArtifactFormatError:
            refused.append((n, blob[0]))
    assert not refused, refused
    assert any(encode(make_artifact(training={"note": "x" * n}))[0] == 0x80 for n in range(512))


@pytest.mark.parametrize("where", ["header", "metadata"])
def test_deeply_nested_json_is_a_format_error(where):
    """Issue 10, finding 8: nesting deeper than the JSON parser's recursion limit is refused like any bad JSON."""
    deep = "[" * 100_000 + "]" * 100_000
    if where == "header":
        blob = struct.pack("<Q", len(deep)) + deep.encode()
    else:
        blob = st_save({"kv": torch.zeros(1)}, metadata={"prefix_serve": deep})
    with pytest.raises(ArtifactFormatError, match="nested too deeply"):
        decode(blob)
