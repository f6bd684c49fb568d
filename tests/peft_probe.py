"""Is PEFT a sound reference on the installed transformers? Several tests take their expected values from PEFT, and a
PEFT release can break under a new transformers (0.21.2 under 5.24 drops prefix key/values in `generate` and refuses
SEQ_CLS prefix models). The probe checks the two capabilities those tests rely on, on tiny models, once a session.
"""

from __future__ import annotations

import functools
import importlib.metadata

import torch

CAPABILITIES = ("generate", "seq_cls")


@functools.cache
def broken() -> dict[str, str]:
    """Capability -> what is wrong with it; empty when PEFT works as a reference here."""
    from peft import PrefixTuningConfig

    from tests.engine_harness import trained_peft
    from tests.models import tiny_model

    problems: dict[str, str] = {}
    versions = f"peft {importlib.metadata.version('peft')}, transformers {importlib.metadata.version('transformers')}"
    base = tiny_model("llama")
    pm = trained_peft(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), seed=1)
    ids = torch.tensor([[5, 6, 7]])
    kw = dict(max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        with_prefix = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[0]
        bare = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[0]
    if torch.allclose(with_prefix, bare):
        problems["generate"] = f"{versions}: PEFT's generate ignores the prefix (same logits as the bare model)"
    bert = tiny_model("bert-cls")
    pm = trained_peft(bert, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3), seed=2)
    try:
        with torch.no_grad():
            pm(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception as e:  # whatever PEFT raises, the reference is unusable
        problems["seq_cls"] = f"{versions}: PEFT SEQ_CLS prefix model fails: {type(e).__name__}: {e}"
    return problems
