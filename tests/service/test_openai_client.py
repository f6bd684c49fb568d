"""The official `openai` client against a running server (tiny random Llama, a chat template written here): chat
(JSON and stream, n, logprobs with alternatives, penalties and vLLM's extras through extra_body), completions
(echo with prompt log-probabilities), models (listed and retrieved), tokenize/detokenize; rows of different tasks and
parameters mixed in one batch give what each gives alone; an invalid request (a wrong type, a missing or unknown
field) is a 400 in OpenAI's error shape naming the field, so the client raises BadRequestError; on an encoder
backbone, completions and chat name what it does instead. Uploads: a chat template as a file part or a field; no
local path of the uploader is stored."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from peft import PrefixTuningConfig, PromptTuningConfig

from tests.engine_harness import publish_peft, trained_peft
from tests.models import tiny_model, tiny_tokenizer
from tests.service.live import asgi_client, live_server
from tests.service.test_inference_api import make_app  # noqa: F401 (fixture)

pytestmark = pytest.mark.redis
# The tiny tokenizer knows only "w3".."w127": roles become words, so the rendering is checkable token by token.
TEMPLATE = (
    "{% for m in messages %}{{ {'system': 'w3', 'user': 'w4', 'assistant': 'w5'}[m['role']] }} {{ m['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}w6{% endif %}"
)
CHAT = [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": "w30 w31 w32"}]
RENDERED = [3, 20, 21, 4, 30, 31, 32, 6]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


async def publish(store, llama, tmp_path):
    a = trained_peft(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), seed=1)
    await publish_peft(store, a, "chatty", llama.config, tmp_path / "a")
    b = trained_peft(llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), seed=2)
    await publish_peft(store, b, "plain", llama.config, tmp_path / "b")


async def test_chat_completions_through_the_openai_client(store, make_app, llama, tmp_path):  # noqa: F811
    await publish(store, llama, tmp_path)
    with live_server(make_app(llama, tiny_tokenizer())) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:  # the task's chat template, set at upload
            files = {
                n: (n, (tmp_path / "a" / n).read_bytes()) for n in ("adapter_config.json", "adapter_model.safetensors")
            }
            parts = {
                "adapter_config": files["adapter_config.json"],
                "adapter_model": files["adapter_model.safetensors"],
            }
            r = await c.put("/v1/tasks/chatty", data={"chat_template": TEMPLATE}, files=parts)
            assert r.status_code == 201 and r.json()["chat_template"] == TEMPLATE, r.text
            tok = (await c.post("/tokenize", json={"model": "chatty", "messages": CHAT})).json()
            assert tok["tokens"] == RENDERED and tok["count"] == len(RENDERED)
            back = (await c.post("/detokenize", json={"model": "chatty", "tokens": RENDERED})).json()
            assert back["prompt"] == "w3 w20 w21 w4 w30 w31 w32 w6"
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
        greedy = await client.chat.completions.create(model="chatty", messages=CHAT, temperature=0, max_tokens=6)
        alone = await _generate(url, "chatty", RENDERED, max_new_tokens=6)
        assert greedy.choices[0].message.content == alone["text"] and greedy.choices[0].message.role == "assistant"
        assert greedy.usage.prompt_tokens == len(RENDERED) and greedy.object == "chat.completion"
        stream = await client.chat.completions.create(
            model="chatty",
            messages=CHAT,
            temperature=0,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [ch async for ch in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == alone["text"]
        assert chunks[-1].usage.completion_tokens == len(alone["token_ids"]) and chunks[-1].choices == []
        many = await client.chat.completions.create(
            model="chatty", messages=CHAT, temperature=1.0, seed=11, n=3, max_tokens=5, logprobs=True, top_logprobs=4
        )
        assert [ch.index for ch in many.choices] == [0, 1, 2]
        for i, ch in enumerate(many.choices):  # choice i is the seed + i draw, as /v1/generate draws it alone
            solo = await _generate(url, "chatty", RENDERED, max_new_tokens=5, temperature=1.0, seed=11 + i)
            assert ch.message.content == solo["text"]
            assert all(len(e.top_logprobs) == 4 for e in ch.logprobs.content)
        streamed = await client.chat.completions.create(
            model="chatty", messages=CHAT, temperature=1.0, seed=11, n=3, max_tokens=5, stream=True
        )
        texts = ["", "", ""]
        async for ch in streamed:
            for c in ch.choices:
                texts[c.index] += c.delta.content or ""
        assert texts == [ch.message.content for ch in many.choices]
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            await client.chat.completions.create(model="plain", messages=CHAT)
        with pytest.raises(openai.BadRequestError, match="logit_bias"):
            await client.chat.completions.create(model="chatty", messages=CHAT, logit_bias={"5": 1})


async def test_parameters_mixed_across_tasks_equal_their_runs_alone(store, make_app, llama, tmp_path):  # noqa: F811
    await publish(store, llama, tmp_path)
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE  # the backbone's own template serves every task without one
    requests = [
        ("chatty", dict(temperature=0, presence_penalty=1.5, frequency_penalty=0.5)),
        ("plain", dict(temperature=0.9, seed=3, extra_body={"top_k": 6, "repetition_penalty": 1.4})),
        ("base", dict(temperature=0.8, seed=4, top_p=0.8, extra_body={"min_p": 0.05, "min_tokens": 6})),
        ("chatty", dict(temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})),
    ]
    with live_server(make_app(llama, tok)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")

        async def ask(task, kw):
            out = await client.chat.completions.create(model=task, messages=CHAT, max_tokens=8, **kw)
            return out.choices[0].message.content, out.choices[0].logprobs

        alone = [await ask(t, kw) for t, kw in requests]
        together = await asyncio.gather(*(ask(t, kw) for t, kw in requests))
        assert [a[0] for a in alone] == [b[0] for b in together]
        lp_alone, lp_mixed = alone[3][1].content, together[3][1].content
        assert [e.token for e in lp_alone] == [e.token for e in lp_mixed]
        assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(lp_alone, lp_mixed, strict=True))
        assert len(alone[2][0].split()) >= 6  # min_tokens
        comp = await client.completions.create(
            model="chatty", prompt="w5 w6 w7", max_tokens=3, temperature=0, logprobs=2, echo=True
        )
        lp = comp.choices[0].logprobs
        assert comp.choices[0].text.startswith("w5 w6 w7") and lp.token_logprobs[0] is None
        assert len(lp.tokens) == 3 + 3 and all(len(t) == 2 for t in lp.top_logprobs[1:])
        models = await client.models.list()
        assert [m.id for m in models.data] == ["base", "chatty", "plain"]
        with pytest.raises(openai.BadRequestError, match="best_of"):
            await client.completions.create(model="chatty", prompt="w5", best_of=2)


async def _generate(url: str, task: str, ids: list[int], **kw) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        r = await c.post("/v1/generate", json={"task": task, "input_ids": ids, **kw})
        assert r.status_code == 200, r.text
        return r.json()


async def test_response_format_through_the_openai_client(make_app):  # noqa: F811
    from tests.models import byte_tokenizer
    from tests.service.runtime.test_structured_output import SCHEMA, valid

    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
    with live_server(make_app(tiny_model("llama-bytes"), tok, name="tiny-bytes")) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
        messages = [{"role": "user", "content": "Reply in JSON."}]
        outs = await asyncio.gather(
            client.chat.completions.create(model="base", messages=messages, response_format=fmt, max_tokens=80, n=2),
            client.chat.completions.create(model="base", messages=messages, max_tokens=10),  # a free row beside
        )
        for choice in outs[0].choices:
            assert choice.finish_reason == "stop" and valid(json.loads(choice.message.content)), choice
        obj = await client.chat.completions.create(
            model="base", messages=messages, response_format={"type": "json_object"}, max_tokens=120, temperature=0
        )
        content = obj.choices[0].message.content  # this random model writes a long key: cut by max_tokens here
        assert content.startswith('{"') and obj.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="response_format"):
            bad = {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "x"}},
            }
            await client.chat.completions.create(model="base", messages=messages, response_format=bad)
        with pytest.raises(openai.BadRequestError, match="ignore_eos"):
            await client.chat.completions.create(
                model="base", messages=messages, response_format=fmt, extra_body={"ignore_eos": True}
            )


async def test_models_retrieve_and_validation_errors_in_openais_shape(store, make_app, llama, tmp_path):  # noqa: F811
    await publish(store, llama, tmp_path)
    with live_server(make_app(llama, tiny_tokenizer())) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        card = await client.models.retrieve("chatty")
        assert card.id == "chatty" and card.object == "model" and card.owned_by == "prefix-serve" and card.created > 0
        assert (await client.models.retrieve("base")).id == "base"
        assert (await client.models.retrieve("chatty@1")).id == "chatty@1"
        with pytest.raises(openai.NotFoundError, match="'nope' not found"):
            await client.models.retrieve("nope")
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("chatty@7")
        cases = {  # what the client sends -> the field the error names
            "max_tokens": dict(model="plain", prompt="w5", max_tokens="many"),  # a wrong type
            "prompt": dict(model="plain", prompt=None),  # a missing one, as null
            "frobnicate": dict(model="plain", prompt="w5", extra_body={"frobnicate": 1}),  # an unknown field
        }
        for param, kw in cases.items():
            with pytest.raises(openai.BadRequestError) as info:
                await client.completions.create(**kw)
            err = info.value.body
            assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == 400, err
            assert param in err["message"], err
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            r = await c.post("/v1/chat/completions", json={"model": "chatty"})  # no messages at all
            assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type", "param", "code"}, r.text
            assert r.json()["error"]["param"] == "messages"
            r = await c.post("/v1/generate", json={"task": "plain", "prompt": "w5", "frobnicate": 1})
            assert r.status_code == 422 and r.json()["error"]["type"] == "RequestValidationError", r.text
        # the fields the client itself adds still pass
        stream = await client.completions.create(
            model="plain", prompt="w5", max_tokens=2, n=2, user="u", stream=True, stream_options={"include_usage": True}
        )
        assert [ch async for ch in stream][-1].usage.completion_tokens >= 2


def _peft_parts(llama, tmp_path) -> dict[str, bytes]:
    pm = trained_peft(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), seed=1)
    pm.save_pretrained(tmp_path / "a")
    return {
        "adapter_config": (tmp_path / "a" / "adapter_config.json").read_bytes(),
        "adapter_model": (tmp_path / "a" / "adapter_model.safetensors").read_bytes(),
    }


async def test_chat_template_upload_as_a_file_part_or_a_field(make_app, llama, tmp_path):  # noqa: F811
    parts = _peft_parts(llama, tmp_path)
    async with asgi_client(make_app(llama, tiny_tokenizer()), timeout=30) as c:
        # curl -F chat_template=@file sends a file part; curl -F "chat_template=<file" a plain field
        r = await c.put("/v1/tasks/t1", files={**parts, "chat_template": ("t.jinja", TEMPLATE.encode())})
        assert r.status_code == 201 and r.json()["chat_template"] == TEMPLATE, r.text
        r = await c.put("/v1/tasks/t2", data={"chat_template": TEMPLATE}, files=parts)
        assert r.status_code == 201 and r.json()["chat_template"] == TEMPLATE, r.text
        r = await c.put("/v1/tasks/t3", files={**parts, "chat_template": ("t.jinja", b"\xff\xfe{{")})
        assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"], r.text
        r = await c.put("/v1/tasks/t3", files={**parts, "chat_template": ("t.jinja", b"x" * 300_000)})
        assert r.status_code == 400 and "at most 65536 characters" in r.json()["error"]["message"], r.text
        r = await c.put("/v1/tasks/t3", data={"chat_template": "x" * 70_000}, files=parts)
        assert r.status_code == 400 and "at most 65536 characters" in r.json()["error"]["message"], r.text


async def test_uploads_keep_no_local_paths_of_the_uploader(make_app, llama, tmp_path):  # noqa: F811
    parts = _peft_parts(llama, tmp_path)
    config = json.loads(parts["adapter_config"])
    config["base_model_name_or_path"] = "/home/alice/models/tiny-llama"
    async with asgi_client(make_app(llama, tiny_tokenizer()), timeout=30) as c:
        r = await c.put("/v1/tasks/t1", files={**parts, "adapter_config": json.dumps(config).encode()})
        assert r.status_code == 201, r.text
        assert r.json()["training"]["source"]["base_model_name_or_path"] == "tiny-llama"
        shown = (await c.get("/v1/tasks/t1")).text + (await c.get("/v1/tasks")).text
        assert "/home/alice" not in shown and "tiny-llama" in shown
        config["base_model_name_or_path"] = "org/tiny-llama"  # a hub id is not a path: kept as it is
        r = await c.put("/v1/tasks/t1", files={**parts, "adapter_config": json.dumps(config).encode()})
        assert r.json()["training"]["source"]["base_model_name_or_path"] == "org/tiny-llama", r.text


def test_local_paths_are_cut_at_any_depth_of_the_training_metadata():
    import dataclasses

    from service.routes.tasks import _without_local_paths
    from tests.factories import make_artifact

    art = make_artifact("t", "p_tuning_v2", P=2)
    nested = {"data": ["/home/alice/train.tsv", {"dev": "C:\\Users\\bob\\dev.tsv"}], "base": "org/model"}
    art = dataclasses.replace(art, training={"a": {"b": {"c": {"d": {"e": nested}}}}})
    cleaned = json.dumps(_without_local_paths(art).training)
    assert "alice" not in cleaned and "bob" not in cleaned, cleaned
    assert "train.tsv" in cleaned and "dev.tsv" in cleaned and "org/model" in cleaned


async def test_an_encoder_backbone_names_what_it_can_do(make_app):  # noqa: F811
    bert = tiny_model("bert-cls")
    with live_server(make_app(bert.bert, tiny_tokenizer(), name="tiny-bert")) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for call in (
            client.completions.create(model="base", prompt="w5", max_tokens=2),
            client.chat.completions.create(model="base", messages=[{"role": "user", "content": "w5"}]),
        ):
            with pytest.raises(openai.BadRequestError) as info:
                await call
            message = info.value.body["message"]
            assert "tiny-bert is an encoder" in message and "/v1/classify" in message and "/v1/embeddings" in message
        assert len((await client.embeddings.create(model="base", input="w5 w6")).data) == 1
