"""The mixed-batch equivalence cases: each row's adapter, input and reference output. Built live through PEFT (the
equivalence tests) or loaded from the golden files that `python -m tests.golden.record` wrote from PEFT under the
locked versions (the golden tests), so the engine is checked even where PEFT does not work.

A case's adapters travel the real path when built: PEFT save_pretrained -> import -> artifact. PEFT is imported
only to build a case, never to load one. `run` drives the engine directly (the engine tier, no Redis), with the
artifacts as the store hands them back; `serve` runs the same rows through Redis, the host cache and the scheduler.
"""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prefix_store import BackboneFingerprint, ClassificationHead, PrefixArtifact, import_peft_dir
from prefix_store.artifact import ChannelScale, LowRank
from service.runtime import EngineRequest, Kind, SamplingParams
from tests.engine_harness import engine_for, run_engine, serving_stack, stored, trained_peft
from tests.families import ENCODERS, FAMILIES, encoder_model, family_model
from tests.models import tiny_model
from tests.references import random_deltas, reference_encode, reference_generate

DATA = Path(__file__).parent / "data"
STEPS = 6  # greedy tokens generated per row
LABELS = ["x", "y", "z"]

# (task, PEFT config class name, kwargs): the four methods with different prefix lengths, and the bare backbone (None).
GEN_TASKS = [
    ("prefix", "PrefixTuningConfig", dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)),
    ("ptv2", "PrefixTuningConfig", dict(num_virtual_tokens=7)),
    ("soft", "PromptTuningConfig", dict(num_virtual_tokens=4)),
    ("ptune", "PromptEncoderConfig", dict(num_virtual_tokens=5, encoder_hidden_size=16)),
    (None, None, None),
]
PROMPT_LENGTHS = [5, 9, 3, 7, 6]
BERT_TASKS = [
    ("prefix", "PrefixTuningConfig", dict(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16)),
    ("ptv2", "PrefixTuningConfig", dict(num_virtual_tokens=6)),
    ("soft", "PromptTuningConfig", dict(num_virtual_tokens=3)),
    ("ptune", "PromptEncoderConfig", dict(num_virtual_tokens=2, encoder_hidden_size=16)),
]
BERT_LENGTHS = [7, 4, 9, 5]
BERT_TYPES = [None, None, None, [0, 0, 1, 1, 1]]  # one sentence pair


@dataclass
class Case:
    """Args:
    kind: the tiny backbone (tests.models); generation cases serve its causal LM, "bert-cls" its encoder.
    tasks: per row, the task it runs (None: the bare backbone).
    artifacts: per task, its artifact (not yet published).
    inputs: per row, token ids; types: per row, token type ids or None.
    generate: per row, True for a generation row (STEPS greedy tokens), False for a classification row.
    ref_tokens: per generation row, the reference's greedy tokens; [] for classification rows.
    ref_logits: per row, (STEPS, V) next-token logits of each step, or (C,) head logits.
    """

    kind: str
    tasks: list[str | None]
    artifacts: dict[str, PrefixArtifact]
    inputs: list[list[int]]
    generate: list[bool]
    ref_tokens: list[list[int]]
    ref_logits: list[torch.Tensor]
    types: list[list[int] | None] = field(default_factory=list)
    tokenizer: Any = None

    def __post_init__(self) -> None:
        self.types = self.types or [None] * len(self.tasks)


def backbone_of(kind: str) -> torch.nn.Module:
    """A fresh copy of the backbone a case runs on, as the engine serves it (the encoder alone for BERT)."""
    if kind.startswith("family-"):  # the family matrix (tests/families.py)
        return family_model(kind.removeprefix("family-"))
    if kind.startswith("encoder-"):
        return encoder_model(kind.removeprefix("encoder-"))
    model = tiny_model(kind)
    return model.bert if kind == "bert-cls" else model


# -- built live through PEFT -------------------------------------------------------------------------------------
def peft_generate(model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and per-step logits (STEPS, V) of one row run alone through PEFT's (or the bare model's)
    generate."""
    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=STEPS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out.sequences[0, len(ids) :].tolist(), torch.stack(out.logits)[:, 0]


def _peft_config(name: str, **kwargs):
    import peft

    return getattr(peft, name)(**kwargs)


def _import(pm, task: str, config, out_dir: Path, labels: list[str] | None = None) -> PrefixArtifact:
    pm.save_pretrained(out_dir)
    return import_peft_dir(out_dir, task=task, backbone=BackboneFingerprint.from_config(config), labels=labels)


def generation_case(kind: str, tmp_path: Path) -> Case:
    """GPT-2 / Llama / Qwen2: the four methods and a bare row, each referenced by PEFT's generate alone."""
    base = tiny_model(kind)
    torch.manual_seed(0)
    prompts = [torch.randint(3, 120, (n,)).tolist() for n in PROMPT_LENGTHS]
    artifacts, tokens, logits = {}, [], []
    for i, (task, cls, kw) in enumerate(GEN_TASKS):
        model = base
        if cls is not None:
            model = trained_peft(base, _peft_config(cls, task_type="CAUSAL_LM", **kw), seed=10 + i)
            artifacts[task] = _import(model, task, base.config, tmp_path / task)
        t, lg = peft_generate(model, prompts[i])
        tokens.append(t)
        logits.append(lg)
    tasks = [t for t, _, _ in GEN_TASKS]
    return Case(kind, tasks, artifacts, prompts, [True] * len(tasks), tokens, logits)


def causal_classification_case(tmp_path: Path) -> Case:
    """A SEQ_CLS adapter (LlamaForSequenceClassification + PEFT) served on the causal LM backbone beside a generation
    row: its head reads the last real token, as transformers' score head does."""
    base = tiny_model("llama")
    cls_base = tiny_model("llama-cls")
    cls_base.model.load_state_dict(base.model.state_dict())
    pm = trained_peft(cls_base, _peft_config("PrefixTuningConfig", task_type="SEQ_CLS", num_virtual_tokens=4), seed=3)
    gen = trained_peft(base, _peft_config("PrefixTuningConfig", task_type="CAUSAL_LM", num_virtual_tokens=6), seed=4)
    artifacts = {
        "intent": _import(pm, "intent", base.config, tmp_path / "intent", labels=LABELS),
        "gen": _import(gen, "gen", base.config, tmp_path / "gen"),
    }
    gen_ids, cls_ids = [4, 5, 6], [5, 17, 33, 9, 41, 7]
    gen_tokens, gen_logits = peft_generate(gen, gen_ids)
    with torch.no_grad():
        cls_logits = pm(input_ids=torch.tensor([cls_ids]), attention_mask=torch.ones(1, 6, dtype=torch.long)).logits
    return Case(
        "llama",
        ["gen", "intent"],
        artifacts,
        [gen_ids, cls_ids],
        [True, False],
        [gen_tokens, []],
        [gen_logits, cls_logits[0]],
    )


def bert_case(tmp_path: Path) -> Case:
    """A BERT classifier: both key/value methods and both soft-prompt methods, one row a sentence pair."""
    base = tiny_model("bert-cls")
    torch.manual_seed(1)
    inputs = [torch.randint(3, 120, (n,)).tolist() for n in BERT_LENGTHS]
    artifacts, logits = {}, []
    for i, (task, cls, kw) in enumerate(BERT_TASKS):
        pm = trained_peft(base, _peft_config(cls, task_type="SEQ_CLS", **kw), seed=20 + i)
        artifacts[task] = _import(pm, task, base.config, tmp_path / task, labels=LABELS)
        ids = torch.tensor([inputs[i]])
        extra = {} if BERT_TYPES[i] is None else {"token_type_ids": torch.tensor([BERT_TYPES[i]])}
        with torch.no_grad():
            logits.append(pm(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0])
    tasks = [t for t, _, _ in BERT_TASKS]
    return Case("bert-cls", tasks, artifacts, inputs, [False] * 4, [[]] * 4, logits, list(BERT_TYPES))


# -- the family matrix: every supported family with its features switched on (tests/families.py) -----------------
FAMILY_PROMPTS = [12, 5, 9, 7, 10]  # with P + 6 new tokens, every row outgrows a window of tests.families.WINDOW


def family_case(name: str, tmp_path: Path) -> Case:
    """A causal family: a PEFT Prefix-Tuning task (P 3), a PEFT prompt-tuning task (P 4), the bare backbone, a PEFT
    P-Tuning v2 task (P 5), and where the family has biases a bias task carrying a key/value prefix too; prefixes and
    soft prompts referenced by PEFT's generate alone, the bias task by transformers' forward on a biased copy."""
    base = family_model(name)
    torch.manual_seed(2)
    prompts = [torch.randint(3, 120, (n,)).tolist() for n in FAMILY_PROMPTS]
    specs: list[tuple[str | None, str | None, dict]] = [
        ("prefix", "PrefixTuningConfig", dict(num_virtual_tokens=3)),
        ("soft", "PromptTuningConfig", dict(num_virtual_tokens=4)),
        (None, None, {}),
        ("ptv2", "PrefixTuningConfig", dict(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16)),
    ]
    artifacts, tokens, logits, tasks = {}, [], [], []
    for i, (task, cls, kw) in enumerate(specs):
        model = base
        if cls is not None:
            model = trained_peft(base, _peft_config(cls, task_type="CAUSAL_LM", **kw), seed=30 + i)
            artifacts[task] = _import(model, task, base.config, tmp_path / task)
        t, lg = peft_generate(model, prompts[i])
        tokens.append(t)
        logits.append(lg)
        tasks.append(task)
    if FAMILIES[name].biases:
        fp = BackboneFingerprint.from_config(base.config)
        g = torch.Generator().manual_seed(7)
        kv = torch.randn(fp.num_layers, 2, fp.num_kv_heads, 2, fp.head_dim, generator=g)
        art = PrefixArtifact("bias", "bitfit", fp, kv=kv, biases=random_deltas(base, 7))
        t, lg = reference_generate(base, prompts[4], art, STEPS)
        artifacts["bias"] = art
        tokens.append(t)
        logits.append(lg)
        tasks.append("bias")
    n = len(tasks)
    return Case(f"family-{name}", tasks, artifacts, prompts[:n], [True] * n, tokens, logits)


def encoder_case(name: str, tmp_path: Path) -> Case:
    """An encoder family, bare (its pooler where it has one): a PEFT Prefix-Tuning task (P 4) and a PEFT prompt-tuning
    task (P 3), each with a linear head of ours, a bias task and a bias + key/value prefix task; referenced by PEFT's
    forward alone (feature extraction) or transformers' forward on a biased copy, then the same head."""
    base = encoder_model(name)
    fp = BackboneFingerprint.from_config(base.config)
    torch.manual_seed(3)
    inputs = [torch.randint(3, 120, (n,)).tolist() for n in (7, 4, 9, 5)]
    g = torch.Generator().manual_seed(11)

    def head(pooling: str) -> ClassificationHead:
        return ClassificationHead(
            torch.randn(3, fp.hidden_size, generator=g), torch.randn(3, generator=g), LABELS, pooling
        )

    artifacts: dict[str, PrefixArtifact] = {}
    logits = []
    for i, (task, cls, kw, pooling) in enumerate(
        [
            ("prefix", "PrefixTuningConfig", dict(num_virtual_tokens=4), "cls"),
            ("soft", "PromptTuningConfig", dict(num_virtual_tokens=3), "mean"),
        ]
    ):
        pm = trained_peft(base, _peft_config(cls, task_type="FEATURE_EXTRACTION", **kw), seed=40 + i)
        art = _import(pm, task, base.config, tmp_path / task)
        art.head = head(pooling)
        ids = torch.tensor([inputs[i]])
        with torch.no_grad():
            h = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]  # (P_soft + T, hidden)
        artifacts[task] = art
        logits.append(_head_reference(art, h))
    kv = torch.randn(fp.num_layers, 2, fp.num_kv_heads, 3, fp.head_dim, generator=g)
    for task, seed, prefix, pooling in (("bias", 8, None, "cls"), ("biasp", 9, kv, "mean")):
        art = PrefixArtifact(task, "bitfit", fp, kv=prefix, biases=random_deltas(base, seed), head=head(pooling))
        artifacts[task] = art
        logits.append(_head_reference(art, reference_encode(base, inputs[len(logits)], art)))
    tasks = list(artifacts)
    return Case(f"encoder-{name}", tasks, artifacts, inputs, [False] * 4, [[]] * 4, logits)


def _head_reference(art: PrefixArtifact, h: torch.Tensor) -> torch.Tensor:
    """A linear head's logits (C,) over one row's final states h (T, hidden; a soft prompt's states first)."""
    head = art.head
    assert head is not None
    n_soft = 0 if art.soft_prompt is None else art.soft_prompt.shape[0]
    x = h[0] if head.pooling == "cls" else h[n_soft:].mean(0)
    return x @ head.weight.T + head.bias


# -- every adapter kind in one batch: LoRA and IA3 beside prefixes, soft prompts, bias deltas and the bare backbone -
# Per backbone, LoRA tasks of three ranks and target sets (rsLoRA, per-module rank and alpha patterns, GPT-2's fused
# c_attn) and an IA3 task (output-scaled keys/values, input-scaled feed-forward); the fourth row kind per backbone is
# a bias task where the backbone has biases, a third LoRA task where it has none.
ADAPTER_PROMPTS = [5, 9, 3, 7, 6, 4, 8, 10]
_QV = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"]}
_PATTERNS = {  # (rank_pattern, alpha_pattern) of the all-linear task
    "gpt2": ({"c_proj": 3}, {"c_fc": 4}),
    "llama": ({"down_proj": 5}, {"gate_proj": 3}),
    "qwen2": ({"down_proj": 5}, {"gate_proj": 3}),
}


def random_weights(pm, seed: int):
    """A PEFT model with random, non-trivial trainable weights at sizes that keep logits O(1): LoRA factors A of unit
    variance per input (N(0, 1) / sqrt(in)) and B a quarter of that (the update `x A^T B^T * scale` then about the
    frozen weight's size, as a trained one is, rather than several times it), a head's weight as A, IA3 vectors
    around 1, anything else (head biases, prompts) N(0, 1)."""
    torch.manual_seed(seed)
    for name, p in pm.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_A" in name or "lora_B" in name or ("score" in name or "classifier" in name) and p.ndim == 2:
            p.data.normal_().div_(p.shape[1] ** 0.5 * (4 if "lora_B" in name else 1))
        elif "ia3_l" in name:
            p.data.normal_().mul_(0.3).add_(1)
        else:
            p.data.normal_()
    return pm.eval()


def _peft_model(base, name: str, seed: int, **kw):
    """A PEFT model of config class `name` around a copy of `base`, its weights random (random_weights)."""
    from peft import get_peft_model  # here, so the golden tests run where PEFT does not import

    return random_weights(get_peft_model(copy.deepcopy(base), _peft_config(name, **kw)), seed)


def adapters_case(kind: str, tmp_path: Path) -> Case:
    """GPT-2 / Llama / Qwen2: every adapter kind in one mixed batch, each row referenced by PEFT's generate alone
    (the bias task by transformers' forward on a biased copy)."""
    base = tiny_model(kind)
    torch.manual_seed(5)
    prompts = [torch.randint(3, 120, (n,)).tolist() for n in ADAPTER_PROMPTS]
    ranks, alphas = _PATTERNS[kind]
    lora = dict(init_lora_weights=False)
    specs: list[tuple[str | None, str | None, dict]] = [
        (None, None, {}),
        ("lora-qv", "LoraConfig", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=_QV[kind], **lora)),
        ("ia3", "IA3Config", {}),
        ("prefix", "PrefixTuningConfig", dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)),
        (
            "lora-all",
            "LoraConfig",
            dict(r=2, lora_alpha=6, target_modules="all-linear", rank_pattern=ranks, alpha_pattern=alphas, **lora),
        ),
        ("soft", "PromptTuningConfig", dict(num_virtual_tokens=4)),
        ("ptv2", "PrefixTuningConfig", dict(num_virtual_tokens=5)),
    ]
    if kind == "llama":  # bias-free: a third LoRA task instead of a bias task
        specs.append(("lora-ku", "LoraConfig", dict(r=8, lora_alpha=16, target_modules=["k_proj", "up_proj"], **lora)))
    artifacts, tokens, logits, tasks = {}, [], [], []
    for i, (task, cls, kw) in enumerate(specs):
        model = base
        if cls is not None:
            model = _peft_model(base, cls, 50 + i, task_type="CAUSAL_LM", **kw)
            artifacts[task] = _import(model, task, base.config, tmp_path / task)
        t, lg = peft_generate(model, prompts[i])
        tokens.append(t)
        logits.append(lg)
        tasks.append(task)
    if kind != "llama":
        art = PrefixArtifact(
            "bias", "bitfit", BackboneFingerprint.from_config(base.config), biases=random_deltas(base, 57)
        )
        t, lg = reference_generate(base, prompts[7], art, STEPS)
        artifacts["bias"] = art
        tokens.append(t)
        logits.append(lg)
        tasks.append("bias")
    return Case(kind, tasks, artifacts, prompts, [True] * len(tasks), tokens, logits)


def _seq_cls_logits(pm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return pm(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]


def adapters_classification_case(tmp_path: Path) -> Case:
    """SEQ_CLS LoRA and IA3 adapters (LlamaForSequenceClassification + PEFT, the score head over the last token)
    served on the causal LM in one prefill with a LoRA generation row and a bare row."""
    base = tiny_model("llama")
    cls_base = tiny_model("llama-cls")
    cls_base.model.load_state_dict(base.model.state_dict())
    lora = dict(init_lora_weights=False)
    models = {
        "lora-cls": _peft_model(cls_base, "LoraConfig", 60, task_type="SEQ_CLS", r=4, lora_alpha=8, **lora),
        "ia3-cls": _peft_model(cls_base, "IA3Config", 61, task_type="SEQ_CLS"),
        "lora-gen": _peft_model(
            base, "LoraConfig", 62, task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules="all-linear", **lora
        ),
    }
    artifacts = {
        task: _import(pm, task, base.config, tmp_path / task, labels=LABELS if task.endswith("-cls") else None)
        for task, pm in models.items()
    }
    ids = [[5, 17, 33, 9, 41, 7], [8, 3, 21, 60], [4, 5, 6], [11, 12, 13, 14]]
    refs = [_seq_cls_logits(models["lora-cls"], ids[0]), _seq_cls_logits(models["ia3-cls"], ids[1])]
    gen_tokens = []
    for model, x in ((models["lora-gen"], ids[2]), (base, ids[3])):
        t, lg = peft_generate(model, x)
        gen_tokens.append(t)
        refs.append(lg)
    tasks = ["lora-cls", "ia3-cls", "lora-gen", None]
    return Case("llama", tasks, artifacts, ids, [False, False, True, True], [[], [], *gen_tokens], refs)


def adapters_bert_case(tmp_path: Path) -> Case:
    """A BERT classifier: SEQ_CLS LoRA (query/value; all-linear with rsLoRA, the pooler included), IA3 and P-Tuning
    v2 rows in one forward, each referenced by PEFT's forward alone."""
    base = tiny_model("bert-cls")
    torch.manual_seed(6)
    inputs = [torch.randint(3, 120, (n,)).tolist() for n in (7, 4, 9, 5)]
    lora = dict(init_lora_weights=False)
    specs = {
        "lora-qv": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=["query", "value"], **lora)),
        "ia3": ("IA3Config", {}),
        "lora-all": ("LoraConfig", dict(r=2, lora_alpha=6, use_rslora=True, target_modules="all-linear", **lora)),
        "ptv2": ("PrefixTuningConfig", dict(num_virtual_tokens=4)),
    }
    artifacts, logits = {}, []
    for i, ((task, (cls, kw)), x) in enumerate(zip(specs.items(), inputs, strict=True)):
        pm = _peft_model(base, cls, 70 + i, task_type="SEQ_CLS", **kw)
        artifacts[task] = _import(pm, task, base.config, tmp_path / task, labels=LABELS)
        logits.append(_seq_cls_logits(pm, x))
    return Case("bert-cls", list(specs), artifacts, inputs, [False] * 4, [[]] * 4, logits)


ADAPTER_CASES = {
    "adapters-gpt2": lambda tmp: adapters_case("gpt2", tmp),
    "adapters-llama": lambda tmp: adapters_case("llama", tmp),
    "adapters-qwen2": lambda tmp: adapters_case("qwen2", tmp),
    "adapters-llama-cls": adapters_classification_case,
    "adapters-bert": adapters_bert_case,
}


def build(name: str, tmp_path: Path) -> Case:
    if name in ADAPTER_CASES:
        return ADAPTER_CASES[name](tmp_path)
    if name in ("gpt2", "llama", "qwen2"):
        return generation_case(name, tmp_path)
    if name.startswith("family-"):
        return family_case(name.removeprefix("family-"), tmp_path)
    if name.startswith("encoder-"):
        return encoder_case(name.removeprefix("encoder-"), tmp_path)
    return {"llama-cls": causal_classification_case, "bert-cls": bert_case}[name](tmp_path)


CASES = [
    "gpt2",
    "llama",
    "qwen2",
    "llama-cls",
    "bert-cls",
    *(f"family-{name}" for name in FAMILIES),
    *(f"encoder-{name}" for name in ENCODERS),
    *ADAPTER_CASES,
]


# -- golden files ------------------------------------------------------------------------------------------------
def save(case: Case, path: Path, versions: dict[str, str]) -> None:
    """One safetensors file: every artifact's tensors and every row's reference; the rest in its metadata."""
    tensors: dict[str, torch.Tensor] = {}
    arts = {}
    for task, art in case.artifacts.items():
        if art.prefix_tensor is not None:
            tensors[f"art.{task}.prefix"] = art.prefix_tensor.contiguous()
        for module, delta in (art.biases or {}).items():
            tensors[f"art.{task}.bias.{module}"] = delta.contiguous()
        for module, f in (art.low_rank or {}).items():
            tensors[f"art.{task}.lora.{module}.A"] = f.a.contiguous()
            tensors[f"art.{task}.lora.{module}.B"] = f.b.contiguous()
        for module, sc in (art.scales or {}).items():
            tensors[f"art.{task}.scale.{module}"] = sc.vector.contiguous()
        if art.head is not None:
            tensors[f"art.{task}.head.weight"] = art.head.weight.contiguous()
            if art.head.bias is not None:
                tensors[f"art.{task}.head.bias"] = art.head.bias.contiguous()
        arts[task] = {"method": art.method, "labels": art.head.labels if art.head else None}
        arts[task]["pooling"] = art.head.pooling if art.head else None
        if art.biases:
            arts[task]["biases"] = sorted(art.biases)
        if art.low_rank:
            arts[task]["lora"] = {module: f.scale for module, f in art.low_rank.items()}
        if art.scales:
            arts[task]["scales"] = {module: sc.on_input for module, sc in art.scales.items()}
    for i, (tokens, logits) in enumerate(zip(case.ref_tokens, case.ref_logits, strict=True)):
        tensors[f"ref.{i}.logits"] = logits.float().contiguous()
        tensors[f"ref.{i}.tokens"] = torch.tensor(tokens, dtype=torch.long)
    meta = {
        "kind": case.kind,
        "tasks": case.tasks,
        "inputs": case.inputs,
        "types": case.types,
        "generate": case.generate,
        "artifacts": arts,
        "recorded_with": versions,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"case": json.dumps(meta)})


def load(name: str) -> Case:
    path = DATA / f"{name}.safetensors"
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["case"])
    tensors = load_file(path)
    fp = BackboneFingerprint.from_config(backbone_of(meta["kind"]).config)
    artifacts = {}
    for task, info in meta["artifacts"].items():
        prefix = tensors.get(f"art.{task}.prefix")
        biases = {module: tensors[f"art.{task}.bias.{module}"] for module in info.get("biases", ())} or None
        head = None
        if info["labels"]:
            head = ClassificationHead(
                tensors[f"art.{task}.head.weight"],
                tensors.get(f"art.{task}.head.bias"),
                info["labels"],
                info["pooling"],
            )
        kv = prefix if prefix is not None and prefix.ndim == 5 else None
        soft = None if kv is not None else prefix
        low_rank = {
            m: LowRank(tensors[f"art.{task}.lora.{m}.A"], tensors[f"art.{task}.lora.{m}.B"], scale)
            for m, scale in info.get("lora", {}).items()
        } or None
        scales = {m: ChannelScale(tensors[f"art.{task}.scale.{m}"], inp) for m, inp in info.get("scales", {}).items()}
        artifacts[task] = PrefixArtifact(
            task,
            info["method"],
            fp,
            kv=kv,
            soft_prompt=soft,
            head=head,
            biases=biases,
            low_rank=low_rank,
            scales=scales or None,
        )
    n = len(meta["tasks"])
    return Case(
        meta["kind"],
        meta["tasks"],
        artifacts,
        meta["inputs"],
        meta["generate"],
        [tensors[f"ref.{i}.tokens"].tolist() for i in range(n)],
        [tensors[f"ref.{i}.logits"] for i in range(n)],
        meta["types"],
    )


# -- running a case through the engine (no Redis) ---------------------------------------------------------------
def run(case: Case, first_group: int = 3, model: torch.nn.Module | None = None, **engine_kw) -> list[list]:
    """Runs every row of the case through one engine (driven directly, its artifacts as the store hands them back) in
    the mixed batches of `serve`; returns each row's outputs. All-generation cases: the first `first_group` rows
    decode two tokens before the rest join, so rows join mid-decode, loading their prefixes cold. A case with
    classification rows first runs each row once, so every prefix is resident, then admits all rows together: they
    share one forward."""
    engine = engine_for(model or backbone_of(case.kind), case.tokenizer, name=case.kind, max_rows=8, **engine_kw)
    arts = {task: stored(art) for task, art in case.artifacts.items()}
    params = SamplingParams(max_new_tokens=STEPS, return_logits=True, ignore_eos=True)
    n = len(case.tasks)

    def request(i: int, rid: str) -> EngineRequest:
        art = arts[case.tasks[i]] if case.tasks[i] is not None else None
        if case.generate[i]:
            return EngineRequest(rid, Kind.GENERATE, case.inputs[i], art, params)
        return EngineRequest.classify(rid, case.inputs[i], art, case.types[i])

    if not all(case.generate):
        for i in range(n):
            run_engine(engine, [request(i, f"warm{i}")])
        outs = run_engine(engine, [request(i, f"r{i}") for i in range(n)])
    else:
        k = min(first_group, n)
        outs = run_engine(
            engine, {0: [request(i, f"r{i}") for i in range(k)], 2: [request(i, f"r{i}") for i in range(k, n)]}
        )
    return [outs[f"r{i}"] for i in range(n)]


# -- running a case through the serving stack --------------------------------------------------------------------
async def _collect(handle, n: int | None = None) -> list:
    events = []
    async for ev in handle.events():
        events.append(ev)
        if n is not None and len(events) == n:
            break
    return events


async def serve(store, case: Case, first_group: int = 3) -> list[list]:
    """Publishes the case's artifacts and runs every row through the real stack in mixed batches; returns each
    row's events. All-generation cases: the first `first_group` rows decode two tokens before the rest join, so rows
    join mid-decode, loading their prefixes cold. A case with classification rows first runs each row once, so every
    prefix is resident, then submits all rows together: they share one forward."""
    for art in case.artifacts.values():
        await store.put(art)
    params = SamplingParams(max_new_tokens=STEPS, return_logits=True, ignore_eos=True)
    n = len(case.tasks)
    async with serving_stack(store, backbone_of(case.kind), case.tokenizer, max_batch_size=8) as stack:

        def start(i: int):
            p = params if case.generate[i] else None
            return stack.scheduler.submit(case.tasks[i], case.inputs[i], p, token_type_ids=case.types[i])

        if not all(case.generate):
            await asyncio.gather(*(start(i).result() for i in range(n)))
        n_first = min(first_group, n) if all(case.generate) else n
        handles = [start(i) for i in range(n_first)]
        head = await asyncio.gather(*(_collect(h, 2 if case.generate[i] else None) for i, h in enumerate(handles)))
        handles += [start(i) for i in range(n_first, n)]

        async def rest(i: int, handle) -> list:
            return [] if i < n_first and not case.generate[i] else await _collect(handle)

        tails = await asyncio.gather(*(rest(i, h) for i, h in enumerate(handles)))
    return [(head[i] if i < n_first else []) + tails[i] for i in range(n)]


def differences(case: Case, rows: list[list]) -> dict[str | None, float]:
    """Per row (keyed by task), the largest |logit difference| from the reference over every step."""
    diffs = {}
    for i, events in enumerate(rows):
        ref = case.ref_logits[i] if case.generate[i] else case.ref_logits[i][None]
        diffs[case.tasks[i]] = max((ev.logits - ref[k]).abs().max().item() for k, ev in enumerate(events))
    return diffs


def assert_matches(case: Case, rows: list[list], tol: float = 1e-5) -> None:
    """Every row equals its reference: the same greedy tokens, generation ended by length, and logits within tol
    at every step."""
    for i, events in enumerate(rows):
        if case.generate[i]:
            assert [ev.token_id for ev in events] == case.ref_tokens[i], f"row {i} ({case.tasks[i]}): tokens differ"
            assert [ev.finish_reason for ev in events] == [None] * (STEPS - 1) + ["length"]
        else:
            assert len(events) == 1 and events[0].finish_reason == "stop"
    diffs = differences(case, rows)
    worst = max(diffs.values())
    assert worst <= tol, f"{case.kind}: max |dlogit| per task {diffs}"
