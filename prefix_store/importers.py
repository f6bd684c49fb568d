"""Every adapter format an upload may come in, behind one signature: `importer(files, ctx) -> PrefixArtifact`.

files: the upload's parts by name (bytes, each already size-bounded by the caller); ctx: what the artifact is for
(task, backbone) and the options a format may use. Each format's own module parses it (peft_io, bitfit_io,
vpt_io, codec); this module only names the parts each expects, so the HTTP upload, adapters by reference and the
CLI go through the same entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .artifact import BackboneFingerprint, PrefixArtifact
from .bitfit_io import import_bias_state_dict
from .codec import DEFAULT_MAX_BYTES, decode, load_tensors, read_safetensors_header
from .errors import ArtifactFormatError
from .peft_io import CONFIG_NAME, WEIGHTS_NAME, import_peft_adapter
from .vpt_io import import_vpt_checkpoint


@dataclass(frozen=True)
class ImportContext:
    """What an import produces an artifact for, and the options some formats take.

    labels: class names of a classification head (PEFT SEQ_CLS, VPT, a bias checkpoint's head).
    method: PEFT: which method an adapter holds where its type fits several (PREFIX_TUNING).
    references: bias checkpoints: the serving backbone's biases and weights by parameter name
        (service.runtime.bias.checkpoint_references), what a fine-tune's tensors are compared with.
    verbalizer: bias checkpoints: one label token id per label, read at [MASK] instead of a linear head.
    template: bias checkpoints: the task's input template, e.g. "{text} [MASK]".
    """

    task: str
    backbone: BackboneFingerprint
    max_bytes: int = DEFAULT_MAX_BYTES
    labels: list[str] | None = None
    method: str | None = None
    references: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
    verbalizer: list[int] | None = None
    template: str | None = None


Importer = Callable[[Mapping[str, bytes], ImportContext], PrefixArtifact]


def _artifact(files: Mapping[str, bytes], ctx: ImportContext) -> PrefixArtifact:
    return decode(files["artifact"], max_bytes=ctx.max_bytes).with_task(ctx.task)


def _peft(files: Mapping[str, bytes], ctx: ImportContext) -> PrefixArtifact:
    return import_peft_adapter(
        files[CONFIG_NAME],
        files[WEIGHTS_NAME],
        task=ctx.task,
        backbone=ctx.backbone,
        labels=ctx.labels,
        method=ctx.method,
        max_bytes=ctx.max_bytes,
    )


def _state_dict(files: Mapping[str, bytes], ctx: ImportContext) -> PrefixArtifact:
    if ctx.references is None:
        raise ArtifactFormatError("a bias checkpoint is compared with the serving backbone's tensors: none given")
    base, weights = ctx.references
    return import_bias_state_dict(
        files["state_dict"],
        max_bytes=ctx.max_bytes,
        task=ctx.task,
        backbone=ctx.backbone,
        base=base,
        base_weights=weights,
        labels=ctx.labels,
        verbalizer=ctx.verbalizer,
        template=ctx.template,
    )


def _vpt(files: Mapping[str, bytes], ctx: ImportContext) -> PrefixArtifact:
    data = files["vpt_checkpoint"]
    read_safetensors_header(data, max_bytes=ctx.max_bytes)
    return import_vpt_checkpoint(load_tensors(data), task=ctx.task, backbone=ctx.backbone, labels=ctx.labels)


# form -> (the parts it takes, in order; its importer)
FORMATS: dict[str, tuple[tuple[str, ...], Importer]] = {
    "artifact": (("artifact",), _artifact),
    "peft": ((CONFIG_NAME, WEIGHTS_NAME), _peft),
    "state_dict": (("state_dict",), _state_dict),
    "vpt_checkpoint": (("vpt_checkpoint",), _vpt),
}


def import_adapter(form: str, files: Mapping[str, bytes], ctx: ImportContext) -> PrefixArtifact:
    """The artifact of an upload in `form` (one of FORMATS), from exactly the parts that form takes."""
    if form not in FORMATS:
        raise ArtifactFormatError(f"adapter format {form!r}: expected one of {', '.join(FORMATS)}")
    parts, importer = FORMATS[form]
    if sorted(files) != sorted(parts):
        raise ArtifactFormatError(f"a {form} upload has the parts {list(parts)}; got {sorted(files)}")
    return importer(files, ctx)
