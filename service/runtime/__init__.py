"""The torch runtime: one frozen backbone serving many tasks' prefixes in mixed batches, with no web framework.

Layers, bottom up: prefix_kv (pure tensor math of the mixed layout) -> backbone (load and freeze) -> batch and
runner (prefill, decode, classification on tensors) -> sampling and output (tokens, text, labels) -> engine (one
step as a value: StepPlan in, StepOutput out; the device tier of prefixes) -> host_cache (host tier in front of the
Redis store) and scheduler (queues, admission, the asyncio loop). The service's HTTP layer and the trainer both build
on this package; it imports torch, transformers and prefix_store, nothing else of this project.
"""

from .backbone import Backbone, check_backbone, load_backbone, resolve_source, wrap_model
from .engine import DeviceCache, Engine
from .errors import EngineFailure, InputTooLong, QueueFull, RequestTimeout, ServingError, Unsupported
from .families import UnsupportedBackbone
from .host_cache import HostCache
from .output import ClassificationResult, EmbeddingResult, GenerationResult, TextStream
from .sampling import SamplingParams
from .scheduler import RequestHandle, Scheduler, build_serving
from .settings import DEFAULT_BACKBONE, RuntimeSettings
from .step import EngineRequest, FinishReason, Kind, RowOutput, StepOutput, StepPlan, Submission

__all__ = [
    "DEFAULT_BACKBONE",
    "Backbone",
    "ClassificationResult",
    "EmbeddingResult",
    "DeviceCache",
    "Engine",
    "EngineFailure",
    "EngineRequest",
    "FinishReason",
    "GenerationResult",
    "HostCache",
    "InputTooLong",
    "Kind",
    "QueueFull",
    "RequestHandle",
    "RequestTimeout",
    "RowOutput",
    "RuntimeSettings",
    "SamplingParams",
    "Scheduler",
    "ServingError",
    "StepOutput",
    "StepPlan",
    "Submission",
    "TextStream",
    "UnsupportedBackbone",
    "Unsupported",
    "build_serving",
    "check_backbone",
    "load_backbone",
    "resolve_source",
    "wrap_model",
]
