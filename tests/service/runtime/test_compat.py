"""The engine and the trainer pass the key/value cache under the name the installed transformers expects (`cache=`
from 5.24, `past_key_values=` before), so none of their forwards raises a deprecation warning."""

import inspect
import warnings

import pytest

from prefix_store import BackboneFingerprint
from prefix_store.jobs import TrainSpec
from service.runtime import Engine, EngineRequest, SamplingParams, StepPlan, wrap_model
from tests.factories import make_artifact
from tests.models import tiny_model, tiny_tokenizer
from trainer.train import Trainer


def _no_deprecations(run) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    ours = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not ours, [f"{w.category.__name__}: {w.message}" for w in ours]


def test_cache_keyword_follows_the_installed_transformers():
    bb = wrap_model(tiny_model("llama"), None, name="t")
    assert bb.cache_arg == ("cache" if "cache" in inspect.signature(bb.model.forward).parameters else "past_key_values")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert-cls"])
def test_engine_forwards_warn_nothing(kind):
    model = tiny_model(kind)
    bb = wrap_model(model.bert if kind == "bert-cls" else model, None, name=kind)
    fp = BackboneFingerprint.from_config(bb.model.config)
    labels = ["a", "b"] if kind == "bert-cls" else None
    arts = [
        make_artifact(f"t{i}", method, P=3, fp=fp, labels=labels)
        for i, method in enumerate(["p_tuning_v2", "prompt_tuning"])
    ]
    for art in arts:
        art.version = 1
        if art.head is not None and kind != "bert-cls":
            art.head.pooling = "last_token"
    engine = Engine(bb)
    params = None if kind == "bert-cls" else SamplingParams(max_new_tokens=3)
    if params is None:
        reqs = [EngineRequest.classify(f"r{i}", [5, 6, 7], art) for i, art in enumerate(arts)]
    else:
        reqs = [EngineRequest.generate(f"r{i}", [5, 6, 7], art, params) for i, art in enumerate(arts)]

    def run():
        outputs = engine.step(StepPlan(tuple(reqs))).rows  # materialises both prefixes and prefills
        while engine.running:
            outputs += engine.step(StepPlan()).rows  # decodes
        assert not [out for out in outputs if out.error is not None]

    _no_deprecations(run)


@pytest.mark.parametrize("method", ["p_tuning_v2", "prompt_tuning"])
def test_training_forward_warns_nothing(method):
    bb = wrap_model(tiny_model("llama"), tiny_tokenizer(), name="t")
    examples = [{"input": "w5 w6", "output": "w7 w8"}] * 8
    trainer = Trainer(bb, TrainSpec(task="t", method=method, examples=examples, num_virtual_tokens=3, batch_size=4))
    batch = trainer._batch(trainer.data.train[:4])
    _no_deprecations(lambda: trainer.model.loss(batch).backward())
