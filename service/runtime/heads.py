"""Classification read-outs shared by serving and training: pooling a row's states, a linear head, and a
verbalizer's label scores at [MASK]. The trainer imports these, so what is trained is what is served."""

from __future__ import annotations

import torch

from prefix_store import ClassificationHead

from .backbone import MaskedLMHead


def pool(
    pooling: str, mean: torch.Tensor, first_or_last: torch.Tensor, pooler: torch.Tensor | None = None
) -> torch.Tensor:
    """The pooled state (..., hidden) a head reads: "pooler" (the encoder's pooler output), "mean" (the mean of the
    input tokens' states), or "cls" / "last_token" (first_or_last: the [CLS] state on encoders, the last real
    token's on causal LMs). Works on one row (hidden,) or a batch (B, hidden) alike."""
    if pooling == "pooler":
        assert pooler is not None, "pooler pooling is checked against the backbone"
        return pooler
    if pooling == "mean":
        return mean
    return first_or_last


def head_logits(
    head: ClassificationHead, mean: torch.Tensor, first_or_last: torch.Tensor, pooler: torch.Tensor | None = None
) -> torch.Tensor:
    """A linear head's logits (C,) fp32 over one row, pooled as the head asks (see pool)."""
    assert head.weight is not None, "a linear head has a weight (verbalizers are scored by verbalizer_logits)"
    x = pool(head.pooling, mean, first_or_last, pooler)
    logits = x @ head.weight.T + (head.bias if head.bias is not None else 0)  # (C,)
    return logits.float()


def mlm_states(mlm: MaskedLMHead, states: torch.Tensor) -> torch.Tensor:
    """[MASK] states (n, hidden) through the masked-LM head's transform (dense, activation, LayerNorm), where the
    checkpoint has one. Bias deltas of the transform apply inside the caller's context."""
    return states if mlm.transform is None else mlm.transform(states)


def verbalizer_logits(
    mlm: MaskedLMHead, z: torch.Tensor, verb: torch.Tensor, label_delta: torch.Tensor | None = None
) -> torch.Tensor:
    """Label logits (n, C) fp32 of transformed [MASK] states z (n, hidden) (mlm_states): the masked-LM decoder at
    the verbalizer's tokens verb (C,) only, `z . E[verb]^T + b_dec[verb] + delta_dec[verb]`; label_delta: a bias
    task's decoder-bias delta at verb, (C,) or (n, C)."""
    logits = z @ mlm.weight[verb].T  # (n, C)
    if mlm.bias is not None:
        logits = logits + mlm.bias[verb]
    if label_delta is not None:
        logits = logits + label_delta.to(logits.dtype)
    return logits.float()
