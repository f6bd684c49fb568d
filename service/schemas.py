"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from prefix_store.methods import described
from prefix_store.store import MAX_TRAFFIC_ENTRIES, MAX_TRAFFIC_WEIGHT


class HeadInfo(BaseModel):
    labels: list[str]
    pooling: str = Field(description="pooler | cls | mean | last_token | mask (a verbalizer reads [MASK])")
    bias: bool
    token_ids: list[int] | None = Field(default=None, description="a verbalizer's token per label")


class VersionSummary(BaseModel):
    """One stored version, without its tensors."""

    task: str
    version: int
    method: str = Field(description=described())
    backbone: dict[str, Any] = Field(description="fingerprint of the backbone the prefix was made for")
    num_virtual_tokens: int
    dtype: str
    bytes: int = Field(description="size of the prefix and head tensors")
    head: HeadInfo | None = None
    training: dict[str, Any] = Field(default_factory=dict, description="dataset, metrics, source, ...")
    created_at: str
    bias_modules: list[str] | None = Field(default=None, description="bias methods: the modules whose biases it shifts")
    lora_modules: dict[str, dict[str, int | float]] | None = Field(
        default=None, description="low-rank methods: per adapted module, its rank and scale"
    )
    scaled_modules: dict[str, str] | None = Field(
        default=None, description="scaling methods: per adapted module, the side it scales ('input' or 'output')"
    )
    template: str | None = Field(default=None, description='how the task writes its input, e.g. "{text} [MASK]"')
    chat_template: str | None = Field(default=None, description="the task's own chat template (Jinja)")

    model_config = {
        "json_schema_extra": {
            "example": {
                "task": "sst2",
                "version": 3,
                "method": "p_tuning_v2",
                "backbone": {
                    "model_type": "bert",
                    "num_layers": 6,
                    "hidden_size": 384,
                    "num_attention_heads": 12,
                    "num_kv_heads": 12,
                    "head_dim": 32,
                    "vocab_size": 30522,
                    "digest": "7e2a41edb43fa8d7",
                },
                "num_virtual_tokens": 16,
                "dtype": "float32",
                "bytes": 1181448,
                "head": {"labels": ["negative", "positive"], "pooling": "pooler", "bias": True},
                "training": {"dataset": "sst2/train.tsv", "metrics": {"accuracy": 0.88}},
                "created_at": "2026-11-23T22:00:00+00:00",
            }
        }
    }


class TaskInfo(BaseModel):
    task: str
    current_version: int
    versions: list[int]
    resident: bool = Field(description="the current version is in this replica's device prefix cache")
    current: VersionSummary


class TaskDetail(TaskInfo):
    history: list[VersionSummary] = Field(description="every stored version, oldest first")
    traffic: dict[str, int] | None = Field(
        None,
        description="the split of unpinned requests between versions ({version: weight}); None: every unpinned "
        "request runs the current version",
    )
    pinned: bool = Field(
        False,
        description="pinned in the store: kept resident in every replica's device prefix cache (its current version)",
    )
    pinned_here: bool = Field(
        False,
        description="this replica holds the current version pinned resident now (false while a pin waits for room "
        "here, past this replica's pin budget, or not pinned at all)",
    )

    model_config = {
        "json_schema_extra": {
            "example": {
                "task": "sst2",
                "current_version": 1,
                "versions": [1],
                "resident": False,
                "current": VersionSummary.model_config["json_schema_extra"]["example"],
                "history": [VersionSummary.model_config["json_schema_extra"]["example"]],
                "traffic": None,
                "pinned": False,
                "pinned_here": False,
            }
        }
    }


class TrafficRequest(BaseModel):
    """PUT /v1/tasks/{task}/traffic: how unpinned requests split between stored versions."""

    model_config = {"extra": "forbid", "json_schema_extra": {"example": {"weights": {"1": 90, "2": 10}}}}
    weights: dict[
        Annotated[str, Field(pattern=r"^[1-9][0-9]{0,9}$")], Annotated[int, Field(ge=0, le=MAX_TRAFFIC_WEIGHT)]
    ] = Field(
        min_length=1,
        max_length=MAX_TRAFFIC_ENTRIES,
        description=f"version -> weight (0 to {MAX_TRAFFIC_WEIGHT}, summing above 0), at most "
        f"{MAX_TRAFFIC_ENTRIES} versions, each stored; a request falls on a version by a hash of its X-Request-ID",
    )

    @model_validator(mode="after")
    def _some_weight(self) -> TrafficRequest:
        if not sum(self.weights.values()):
            raise ValueError("the weights sum to 0: at least one version needs a positive weight")
        return self


class PinResponse(BaseModel):
    model_config = {"json_schema_extra": {"example": {"task": "sst2", "version": 3, "pinned": True, "bytes": 393216}}}
    task: str
    version: int = Field(description="the version pinned resident here: the current one (a pin follows it)")
    pinned: bool = True
    bytes: int = Field(description="bytes of the device prefix cache it holds on this replica")


class TaskList(BaseModel):
    tasks: list[TaskInfo]

    model_config = {
        "json_schema_extra": {
            "example": {
                "tasks": [
                    {
                        "task": "sst2",
                        "current_version": 3,
                        "versions": [1, 2, 3],
                        "resident": True,
                        "current": VersionSummary.model_config["json_schema_extra"]["example"],
                    }
                ]
            }
        }
    }


class RollbackRequest(BaseModel):
    model_config = {"extra": "forbid", "json_schema_extra": {"example": {"version": 2}}}
    version: int = Field(ge=1, description="an existing version to make current", examples=[2])


class Health(BaseModel):
    model_config = {"json_schema_extra": {"example": {"status": "ok"}}}
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool | str]
    backbone: dict[str, Any] | None = None

    model_config = {
        "json_schema_extra": {
            "example": {
                "ready": True,
                "checks": {"backbone": True, "engine": True, "prefix_events": True, "warm": True, "redis": True},
                "backbone": {"name": "sentence-transformers/all-MiniLM-L6-v2", "kind": "encoder"},
            }
        }
    }


# -- inference ------------------------------------------------------------------------------------------------------
BASE_TASK = "base"  # the reserved task name of the bare backbone (no prefix)

# Bounds of every list and string a request may carry (the body limit, PREFIXSERVE_MAX_BODY_BYTES, caps the whole).
MAX_TASK_CHARS = 64
MAX_PROMPT_CHARS = 200_000  # one prompt or text
MAX_PROMPT_TOKENS = 32_768  # one prompt given as token ids
MAX_PROMPTS = 64  # prompts in one completions request
MAX_TEXTS = 256  # texts in one classification request
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 256  # characters of one stop string
MAX_STOP_TOKENS = 64
MAX_TOP_LOGPROBS = 20  # alternatives per token
MAX_N = 128  # outputs per prompt in a schema; PREFIXSERVE_MAX_N is the operator's cap
MAX_MESSAGES = 256  # messages of one chat

# Room for a version pin, "task@N" (N at most 10 digits: dispatch.task_ref).
TaskName = Annotated[str, Field(min_length=1, max_length=MAX_TASK_CHARS + 11)]
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
TokenIds = Annotated[list[int], Field(max_length=MAX_PROMPT_TOKENS)]
StopText = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int
    request_id: str | None = Field(None, description="the request's id (X-Request-ID), as in the server's logs")


class ErrorBody(BaseModel):
    error: ErrorDetail

    model_config = {
        "json_schema_extra": {
            "example": {"error": {"message": "task 'sst3' not found", "type": "TaskNotFound", "code": 404}}
        }
    }


class JsonSchemaFormat(BaseModel):
    model_config = {"extra": "forbid", "populate_by_name": True}
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=1000)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="a JSON Schema")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(BaseModel):
    model_config = {"extra": "forbid"}
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingExtras(BaseModel):
    """Sampling parameters beyond OpenAI's own (vLLM's names and meanings), accepted by every generation route and
    applied per row inside the mixed batch."""

    model_config = {"extra": "forbid"}  # a field this server does not know is refused, never silently ignored
    top_k: int = Field(0, ge=0, le=100000, description="0: no top-k cut")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens less likely than min_p x the most likely")
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, description="transformers' definition, over prompt and output; 1: none"
    )
    min_tokens: int = Field(0, ge=0, le=4096, description="no end-of-sequence or stop token before this many tokens")
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token")
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_STOP_TOKENS)
    response_format: ResponseFormat | None = Field(
        None, description='structured output: {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}'
    )


class SamplingFields(SamplingExtras):
    max_new_tokens: int = Field(16, ge=1, le=4096, description="most tokens to generate")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Annotated[list[StopText], Field(max_length=MAX_STOP)] | StopText | None = Field(
        None, description=f"up to {MAX_STOP} stop strings (the text ends before the first match)"
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same tokens, whatever the batch")
    logprobs: bool = Field(False, description="return the log-probability of each generated token")
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description="and this many most likely alternatives")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's definition")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's definition")
    n: int = Field(1, ge=1, le=MAX_N, description="outputs per prompt (the server's PREFIXSERVE_MAX_N caps it)")


class GenerateRequest(SamplingFields):
    task: TaskName = Field(description=f"task name; {BASE_TASK!r} is the bare backbone", examples=["e2e"])
    prompt: PromptText | None = None
    input_ids: TokenIds | None = None
    stream: bool = Field(False, description="Server-Sent Events: one event per token, then a final event")

    model_config = {
        "json_schema_extra": {
            "examples": [{"task": "e2e", "prompt": "name[The Vaults], eatType[pub]", "max_new_tokens": 32}]
        }
    }


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class GeneratedText(BaseModel):
    text: str
    token_ids: list[int] = Field(description="generated tokens only")
    finish_reason: str = Field(description="length | stop")
    logprobs: list[float] | None = None
    top_logprobs: list[list[TopLogprob]] | None = Field(None, description="per token, most likely first")


class GenerateResponse(GeneratedText):
    task: str
    version: int | None = Field(description="the task version that served the request (None for the base task)")
    choices: list[GeneratedText] | None = Field(None, description="with n > 1: every output (the first is also above)")
    usage: Usage

    model_config = {
        "json_schema_extra": {
            "example": {
                "task": "e2e",
                "version": 3,
                "text": " The Vaults is a pub.",
                "token_ids": [383, 569, 2518],
                "finish_reason": "stop",
                "logprobs": None,
                "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
            }
        }
    }


class ClassifyRequest(BaseModel):
    task: TaskName = Field(examples=["sst2"])
    text: PromptText | None = None
    texts: list[PromptText] | None = Field(None, min_length=1, max_length=MAX_TEXTS)
    input_ids: TokenIds | None = None
    text_pair: PromptText | None = Field(None, description="second segment, with `text`")
    images: list[Annotated[str, Field(max_length=1_400_000)]] | None = Field(
        None,
        min_length=1,
        max_length=16,
        description="image backbones: base64 images or data:image/...;base64, URLs (PNG, JPEG, ...)",
    )

    model_config = {
        "extra": "forbid",
        "json_schema_extra": {
            "examples": [
                {"task": "sst2", "texts": ["a gripping film", "dull"]},
                {"task": "digits", "images": ["data:image/png;base64,iVBORw0KGgo..."]},
            ]
        },
    }


class Classification(BaseModel):
    label: str
    scores: dict[str, float] = Field(description="probability of every label")


class ClassifyResponse(BaseModel):
    task: str
    version: int
    results: list[Classification]

    model_config = {
        "json_schema_extra": {
            "example": {
                "task": "sst2",
                "version": 2,
                "results": [{"label": "positive", "scores": {"negative": 0.08, "positive": 0.92}}],
            }
        }
    }


# -- OpenAI-compatible ----------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = {"extra": "forbid"}
    include_usage: bool = Field(False, description="a last chunk with the usage and no choices")


class OpenAISampling(SamplingExtras):
    """OpenAI's sampling fields, shared by completions and chat completions (plus SamplingExtras). OpenAI fields this
    server does not implement (best_of, logit_bias, ...) are refused by name rather than dropped: the client must not
    believe it got what it asked for."""

    model: TaskName = Field(description=f"the task name; {BASE_TASK!r}: the bare backbone", examples=["e2e"])
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt (the server's PREFIXSERVE_MAX_N caps it)")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="choice i is drawn with seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=256)


class CompletionRequest(OpenAISampling):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(
        description=f"a string, up to {MAX_PROMPTS} strings, token ids, or up to {MAX_PROMPTS} lists of token ids",
        examples=["name[The Vaults], eatType[pub]"],
    )
    max_tokens: int = Field(16, ge=1, le=4096)
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="the chosen token's log-probability and this many alternatives"
    )
    echo: bool = Field(False, description="the prompt in front of the completion (with its log-probabilities)")

    model_config = {
        "json_schema_extra": {
            "examples": [
                {"model": "e2e", "prompt": "name[The Vaults], eatType[pub]", "max_tokens": 32, "temperature": 0},
                {"model": "base", "prompt": ["The weather today", "Once upon a time"], "max_tokens": 16, "n": 2},
            ]
        }
    }


class ChatContentPart(BaseModel):
    model_config = {"extra": "forbid"}
    type: Literal["text"] = Field(description="text parts only (images go to /v1/classify on an image backbone)")
    text: PromptText


class ChatMessage(BaseModel):
    model_config = {"extra": "forbid"}
    role: Literal["system", "developer", "user", "assistant"]
    content: PromptText | Annotated[list[ChatContentPart], Field(max_length=64)]
    name: str | None = Field(None, max_length=64)


class ChatCompletionRequest(OpenAISampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: int | None = Field(None, ge=1, le=4096, description="deprecated by OpenAI: max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, le=4096, description="default 256")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: alternatives")

    model_config = {
        "json_schema_extra": {
            "examples": [{"model": "support-bot", "messages": [{"role": "user", "content": "Where is my order?"}]}]
        }
    }


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[ChatLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprob] | None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage

    model_config = {
        "json_schema_extra": {
            "example": {
                "id": "chatcmpl-8d1e",
                "object": "chat.completion",
                "created": 1795478400,
                "model": "support-bot",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Your order ships tomorrow."},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 21, "completion_tokens": 6, "total_tokens": 27},
            }
        }
    }


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None

    model_config = {
        "json_schema_extra": {
            "example": {
                "id": "cmpl-3f2a",
                "object": "text_completion",
                "created": 1795478400,
                "model": "e2e",
                "choices": [{"text": " The Vaults is a pub.", "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
            }
        }
    }


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the task's chat template (the tokens the chat route
    would feed)."""

    model_config = {
        "extra": "forbid",
        "json_schema_extra": {
            "examples": [
                {"model": "base", "prompt": "The weather today"},
                {"model": "support-bot", "messages": [{"role": "user", "content": "Where is my order?"}]},
            ]
        },
    }
    model: TaskName = Field(description=f"the task (its chat template matters for messages); {BASE_TASK!r}: none")
    prompt: PromptText | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool = Field(True, description="with prompt: the tokenizer's special tokens")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int] | None = Field(
        None, description="null for `messages` rendered by a task's own chat template unless the key is an admin key"
    )
    token_strs: list[str] | None = None

    model_config = {
        "json_schema_extra": {
            "example": {
                "count": 3,
                "max_model_len": 1024,
                "tokens": [464, 6193, 1909],
                "token_strs": ["The", "Ġweather", "Ġtoday"],
            }
        }
    }


class DetokenizeRequest(BaseModel):
    model_config = {"extra": "forbid", "json_schema_extra": {"example": {"model": "base", "tokens": [464, 6193, 1909]}}}
    model: TaskName
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    model_config = {"json_schema_extra": {"example": {"prompt": "The weather today"}}}
    prompt: str


class ModelCard(BaseModel):
    model_config = {
        "json_schema_extra": {
            "example": {"id": "sentiment", "object": "model", "created": 1795478400, "owned_by": "prefix-serve"}
        }
    }
    id: str
    object: str = "model"
    created: int
    owned_by: str = "prefix-serve"


class EmbeddingRequest(BaseModel):
    model_config = {
        "extra": "forbid",
        "json_schema_extra": {
            "examples": [
                {"model": "base", "input": ["a gripping film", "dull"]},
                {"model": "digits", "input": ["data:image/png;base64,iVBORw0KGgo..."]},
            ]
        },
    }

    model: TaskName = Field(description=f"the task whose prefix shapes the embedding; {BASE_TASK!r}: the bare backbone")
    input: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_TEXTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(
        description=f"text backbones: a string, up to {MAX_TEXTS} strings, token ids or up to {MAX_PROMPTS} lists of "
        "them; image backbones: up to 16 base64 images or data:image/...;base64, URLs",
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: the little-endian float32 bytes of each vector, base64-encoded"
    )
    dimensions: int | None = Field(None, ge=1, description="must equal the backbone's hidden size if given")
    user: str | None = Field(None, max_length=256)


class EmbeddingData(BaseModel):
    object: str = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: str = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage

    model_config = {
        "json_schema_extra": {
            "example": {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0213, -0.0872, 0.0451]}],
                "model": "base",
                "usage": {"prompt_tokens": 5, "total_tokens": 5},
            }
        }
    }


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]

    model_config = {
        "json_schema_extra": {
            "example": {
                "object": "list",
                "data": [
                    {"id": "base", "object": "model", "created": 1795478400, "owned_by": "prefix-serve"},
                    {"id": "e2e", "object": "model", "created": 1795478400, "owned_by": "prefix-serve"},
                ],
            }
        }
    }
