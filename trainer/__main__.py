"""python -m trainer train --task NAME --method M --data FILE [options]   train one prefix and publish it
python -m trainer sweep --task NAME --method M --data FILE --lrs A B --prompt-lengths P Q [--methods ...]
                        [--reparams true false] [--poolings cls mean] [--prefix-inits activations random]
                                                                        train a grid, print it, publish the best
python -m trainer worker                                                take jobs from the Redis queue forever

Options of `train` are the fields of prefix_store.jobs.TrainSpec (--steps, --epochs, --max-time, --lr,
--lr-schedule, --num-virtual-tokens, --dev-data, --columns input=mr,output=ref, --labels neg,pos, --gate 0.8,
--export-peft DIR, ...). A run stops at the first of --steps, --epochs and --max-time it reaches, or early (patience,
convergence) on its validation split, carved from the training data (--val-fraction, --val-max); the dev set is
scored once, on the best version. Everything else (backbone, Redis, work dir) comes from PREFIXSERVE_* settings, as
for the service.

`train` and `sweep` are the local operator's: they read any path given and write --export-peft anywhere, with the
operator's own file permissions. PREFIXSERVE_TRAIN_DATA_DIRS and PREFIXSERVE_EXPORT_DIRS bind the `worker`, which
runs what others queued (see trainer.worker).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import types
import typing
import uuid
from typing import Any

from prefix_store import METHODS, EmbeddedRedis, PrefixStore, StoreUnavailable, open_store
from prefix_store.bitfit_io import parse_verbalizer
from prefix_store.jobs import JobQueue, TrainSpec
from service.runtime import UnsupportedBackbone, load_backbone

from .settings import TrainerSettings
from .worker import Worker, run_job

log = logging.getLogger("trainer")
LISTS = ("labels", "target_modules", "feedforward_modules")  # TrainSpec list fields: comma-separated here


def _flag(value: str) -> bool:
    return value.lower() in ("1", "true", "yes", "on")


def _spec_parser(sub: argparse._SubParsersAction, command: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(command, help=help_text, description=help_text)
    p.add_argument(
        "--run-id",
        default=None,
        help="work directory name under PREFIXSERVE_WORK_DIR: give the same id "
        "again to resume an interrupted run from its checkpoints (default: a fresh one)",
    )
    for name, field in TrainSpec.model_fields.items():
        if name in ("examples", "dev_examples", "sweep"):
            continue
        flag = "--" + name.replace("_", "-")
        kind = _scalar(field.annotation)
        default = _default(field)
        help_text = f"{field.description or ''}{f' ({default})' if default else ''}".lstrip()
        if kind is bool:
            p.add_argument(flag, type=_flag, default=None, help=help_text)
        elif name in ("columns", "verbalizer"):
            p.add_argument(flag, default=None, help=help_text + " (k=v,k=v)")
        elif name in LISTS:
            p.add_argument(flag, default=None, help=help_text + " (comma-separated)")
        else:
            p.add_argument(flag, type=kind, default=None, required=field.is_required(), help=help_text)
    return p


def _default(field: Any) -> str:
    """What a flag left out stands for: the TrainSpec default (argparse's own default is None: unset)."""
    if field.is_required():
        return "required"
    if field.default is None:
        return "" if "default:" in (field.description or "") else "default: none"  # the description says
    return f"default: {field.default}"


def _scalar(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return str
    return annotation if annotation in (int, float, str, bool) else str


def _spec_from(args: argparse.Namespace) -> TrainSpec:
    values = {k: v for k, v in vars(args).items() if k in TrainSpec.model_fields and v is not None}
    if "columns" in values:
        values["columns"] = dict(pair.split("=", 1) for pair in values["columns"].split(","))
    if "verbalizer" in values:
        values["verbalizer"] = dict(parse_verbalizer(values["verbalizer"]))
    for name in LISTS:
        if name in values:
            values[name] = [x.strip() for x in values[name].split(",")]
    if getattr(args, "command", None) == "sweep":
        grid = {
            "methods": args.methods,
            "lrs": args.lrs,
            "num_virtual_tokens": args.prompt_lengths,
            "reparam": args.reparams,
            "pooling": args.poolings,
            "prefix_init": args.prefix_inits,
        }
        values["sweep"] = {**{k: v for k, v in grid.items() if v}, "parallel": args.parallel}
    return TrainSpec(**values)


def _open_store(settings: TrainerSettings) -> tuple[PrefixStore, EmbeddedRedis | None]:
    return open_store(
        settings.redis_url,
        settings.data_dir,
        namespace=settings.namespace,
        max_artifact_bytes=settings.max_artifact_bytes,
        min_replicas=settings.redis_min_replicas,
    )


async def _train(settings: TrainerSettings, spec: TrainSpec, run_id: str | None) -> dict[str, Any]:
    backbone = load_backbone(**settings.backbone_args())
    store, embedded = _open_store(settings)
    try:
        await store.migrate_layout()
        return await run_job(backbone, store, spec, settings, run_id or f"cli-{spec.task}-{uuid.uuid4().hex[:8]}")
    finally:
        await store.aclose()
        if embedded:
            embedded.stop()


async def _worker(settings: TrainerSettings) -> None:
    backbone = load_backbone(**settings.backbone_args())
    store, embedded = _open_store(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await store.migrate_layout()
        except StoreUnavailable as e:  # every store read and write tries again first (see migrate_layout)
            log.error("%s", e)
        queue = JobQueue(store.client, namespace=settings.namespace, ttl_s=settings.job_ttl_s)
        await Worker(backbone, store, queue, settings).run(stop)
    finally:
        await store.aclose()
        if embedded:
            embedded.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _spec_parser(sub, "train", "train one prefix and publish it")
    sweep = _spec_parser(sub, "sweep", "train a grid of runs, print their table, publish the best")
    sweep.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="methods to try (default: --method)")
    sweep.add_argument("--lrs", nargs="+", type=float, default=None, help="learning rates (default: --lr)")
    sweep.add_argument(
        "--prompt-lengths", nargs="+", type=int, default=None, help="virtual tokens (default: --num-virtual-tokens)"
    )
    sweep.add_argument(
        "--reparams", nargs="+", type=_flag, default=None, help="with and without the MLP (default: --reparam)"
    )
    sweep.add_argument(
        "--poolings",
        nargs="+",
        default=None,
        choices=["pooler", "cls", "mean", "last_token"],
        help="what the classification head reads (default: --pooling)",
    )
    sweep.add_argument(
        "--prefix-inits",
        nargs="+",
        default=None,
        choices=["activations", "random"],
        help="key/value prefix starts (default: --prefix-init)",
    )
    sweep.add_argument(
        "--parallel", type=int, default=1, help="runs trained at once, in separate processes (default: 1)"
    )
    sub.add_parser("worker", help="consume training jobs from Redis")
    args = parser.parse_args(argv)
    settings = TrainerSettings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.apply_torch_threads()
    if args.command == "worker":
        try:
            asyncio.run(_worker(settings))
        except UnsupportedBackbone as e:
            log.error("%s", e)
            return 2
        return 0
    try:
        spec = _spec_from(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        result = asyncio.run(_train(settings, spec, args.run_id))
    except ValueError as e:  # bad data or a spec the backbone cannot train (DataError is a ValueError)
        log.error("%s", e)
        return 2
    if "table" in result:
        sys.stderr.write(result["table"] + "\n")
    sys.stdout.write(json.dumps({k: v for k, v in result.items() if k not in ("history", "table")}, indent=2) + "\n")
    return 0 if result.get("published") or spec.gate is not None else 1


if __name__ == "__main__":
    sys.exit(main())
