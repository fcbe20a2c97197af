"""`wlora-trl eval`: check every input, then evaluate the base and each adapter and write the comparison.

All checks (task names, data files, model config, adapters) run before the first model loads, so a typo costs
seconds, not a model load. Under `accelerate launch` every process runs this; lm-eval splits the documents across
processes and returns results on rank 0 only, which alone prints and writes.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from .._offline.data import local_data_or_hub
from . import tasks as task_defs
from .adapters import AdapterInputError, check_adapter
from .base_model import ModelInputError, inspect_base_model
from .runner import RunSettings, default_device, default_dtype, evaluate_model
from .table import build_rows, format_markdown, format_text, task_metrics, write_outputs

logger = logging.getLogger(__name__)

INPUT_ERRORS = (task_defs.TaskInputError, ModelInputError, AdapterInputError)


@dataclass
class Plan:
    tasks: list[str]
    data_dir: Path | None  # None: lm-eval's stock tasks on the hub
    settings: RunSettings
    models: list[tuple[str, str | None]]  # (label, adapter folder or None for the base)
    warnings: list[str] = field(default_factory=list)


def _data_source(args) -> Path | None:
    if args.online and args.data_dir:
        raise task_defs.TaskInputError("--online and --data_dir contradict each other; pass one of them")
    if args.online:
        return None
    try:
        return local_data_or_hub(
            args.data_dir,
            holding="with gsm8k/, hellaswag/, boolq/, arc_challenge/ in it, as described in eval/README.md",
        )
    except FileNotFoundError as err:
        raise task_defs.TaskInputError(str(err)) from err


def _labels(adapters: list[str]) -> list[str]:
    labels, used = [], {"base"}
    for adapter in adapters:
        name = Path(adapter).resolve().name or "adapter"
        label, i = name, 2
        while label in used:
            label, i = f"{name}-{i}", i + 1
        used.add(label)
        labels.append(label)
    return labels


def _limit(value: float | None) -> int | float | None:
    # lm-eval reads a limit below 1 as a fraction of the documents and one of 1 or more as a count.
    if value is None:
        return None
    return int(value) if value >= 1 else value


def prepare(args) -> Plan:
    """Every check that needs no model weights; raises one of INPUT_ERRORS."""
    tasks = task_defs.parse_tasks(args.tasks)
    data_dir = _data_source(args)
    if data_dir is not None:
        task_defs.check_local_data(tasks, data_dir, args.num_fewshot)
    if args.load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ModelInputError("--load_in_8bit needs bitsandbytes: pip install 'wlora-trl[8bit]'") from err
    base = inspect_base_model(args.model)
    adapters = args.adapter or []
    warnings = []
    for adapter in adapters:
        warnings += check_adapter(adapter, base).warnings
    device = args.device or default_device()
    settings = RunSettings(
        model_path=base.path,
        dtype=args.dtype or default_dtype(device),
        load_in_8bit=args.load_in_8bit,
        device=device,
        batch_size=args.batch_size,
        limit=_limit(args.limit),
        num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template,
    )
    models = [("base", None)] + [(label, str(Path(a).resolve())) for label, a in zip(_labels(adapters), adapters)]
    return Plan(tasks=tasks, data_dir=data_dir, settings=settings, models=models, warnings=warnings)


def _environment(device: str) -> dict:
    import torch

    versions = {}
    for package in ("wlora-trl", "lm_eval", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "versions": versions,
    }


def run(plan: Plan, args, argv: list[str]) -> dict | None:
    """Evaluate every model of the plan; the results payload on rank 0, None on other ranks."""
    from tqdm.auto import tqdm

    rank = int(os.environ.get("RANK", "0"))
    started = time.monotonic()
    results, n_samples, seconds = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="wlora_trl_tasks_") as task_dir:
        task_defs.write_task_folder(plan.tasks, plan.data_dir, task_dir)
        manager = task_defs.task_manager(Path(task_dir))
        bar = tqdm(plan.models, desc="models", unit="model", disable=rank != 0, file=sys.stderr)
        for label, adapter in bar:
            bar.set_postfix_str(label)
            tick = time.monotonic()
            out = evaluate_model(plan.settings, adapter, plan.tasks, manager)
            seconds[label] = round(time.monotonic() - tick, 1)
            if out is None:  # not rank 0
                continue
            results[label] = {task: task_metrics(out["results"].get(task, {})) for task in plan.tasks}
            n_samples = out.get("n-samples", n_samples)
    if rank != 0 or not results:
        return None
    labels = [label for label, _ in plan.models]
    rows = build_rows(results, labels, plan.tasks, n_samples)
    return {
        "command": "wlora-trl " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.monotonic() - started, 1),
        "environment": _environment(plan.settings.device),
        "settings": {
            "model": args.model,
            "model_path": plan.settings.model_path,
            "dtype": plan.settings.dtype,
            "load_in_8bit": plan.settings.load_in_8bit,
            "device": plan.settings.device,
            "batch_size": plan.settings.batch_size,
            "limit": plan.settings.limit,
            "num_fewshot": plan.settings.num_fewshot,
            "apply_chat_template": plan.settings.apply_chat_template,
            "tasks": plan.tasks,
            "data": str(plan.data_dir.resolve()) if plan.data_dir else "hub (lm-eval stock tasks)",
        },
        "models": [
            {"label": label, "adapter": adapter, "seconds": seconds.get(label)} for label, adapter in plan.models
        ],
        "n_samples": n_samples,
        "results": results,
        "table": rows,
        "warnings": plan.warnings,
    }


def eval_command(args, argv: list[str]) -> int:
    try:
        plan = prepare(args)
    except INPUT_ERRORS as err:
        print(f"wlora-trl eval: error: {err}", file=sys.stderr)
        return 2
    payload = run(plan, args, argv)
    if payload is None:
        return 0
    labels = [label for label, _ in plan.models]
    title = f"{args.model} ({payload['settings']['data']}, limit {plan.settings.limit})"
    markdown = (
        f"# wlora-trl eval: {title}\n\n{format_markdown(payload['table'], labels)}\n\nCommand: `{payload['command']}`"
    )
    output_dir = args.output_dir or os.path.join("outputs", "eval-" + time.strftime("%Y%m%d-%H%M%S"))
    json_path, md_path = write_outputs(output_dir, payload, markdown)
    print(format_text(payload["table"], labels))
    print(f"\nwrote {json_path} and {md_path}")
    return 0
