"""The saved artefact, built in one place from the model in memory, for every save route.

`save_adapter_folder` is the one builder: the trainers (every engine) and `WeightLoraModel.save_adapter` (custom
loops) all save through it. It takes the adapter's tensors and its stock `LoraConfig` from the `WeightLoraModel`
(`adapter_state_dict`, `adapter_config`: omega folded into B during the warm-up, exact module names, gathered from
the kept adapters under a sharding engine) and writes them as PEFT's own files, so nothing is written and then
read back and rewritten. A WeightLoRA save folder holds, beside the adapter weights and `adapter_config.json`:
- `weight_lora_warmup_adapter.safetensors` during the warm-up, unless the engine's own checkpoint keeps them: the
  weights as they are, which resuming loads back (`export.restore_warmup_weights`);
- `selection.json`: what the selection did (`state.write_selection`), the record a resume starts from;
- `selection_heatmap.png`: layers x projections, omega and the kept adapters (with matplotlib installed);
- `README.md`: the model card, linking the heatmap when there is one;
- `lora_targets.yaml`: for a stage-1 save (`select_adapters`), the selection in TRL ModelConfig keys;
- with `padded=True`, the adapter itself is padded to every targeted (layer, projection), for serving engines.
Every one of them is written from the `SelectionReport` and the stock `LoraConfig` in memory; none reads back what
another just wrote.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from ..state import SelectionReport, write_selection
from .card import write_model_card
from .export import ADAPTER_WEIGHTS, WARMUP_STATE_FILE, padded_adapter


def save_adapter_folder(
    directory: str | os.PathLike,
    weight_lora: Any,
    *,
    step: int | None = None,
    trainer_tags: list[str] | tuple[str, ...] = ("weightlora",),
    padded: bool = False,
    warmup_weights: bool = False,
    is_main_process: bool | None = None,
) -> None:
    """Write the stock PEFT adapter the `weight_lora` (a `WeightLoraModel`) computes now, and everything a save holds
    beside it, into `directory`.

    Under a sharding engine the tensors are gathered (collectives): call it on every rank; the main process writes
    (`is_main_process`, by default rank 0 of the default process group). `warmup_weights=True` also keeps the
    unfolded weights during the warm-up, for a resume without the engine's own checkpoint files."""
    state = weight_lora.adapter_state_dict()
    warmup = weight_lora.warmup_state_dict() if warmup_weights and not weight_lora.switched else None
    if is_main_process is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        is_main_process = not distributed or torch.distributed.get_rank() == 0
    if not is_main_process:
        return
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    report, config = weight_lora.report(step), weight_lora.adapter_config()
    if padded:  # the padded form for serving engines, built in memory: the folder holds that one only
        state, fields = padded_adapter(state, report, directory)
        for field, value in fields.items():
            setattr(config, field, value)
    save_file(state, os.path.join(directory, ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
    _save_config_as_peft_does(config, weight_lora.model, directory)
    if warmup is not None:
        save_file(warmup, os.path.join(directory, WARMUP_STATE_FILE))
    write_selection_files(directory, report, config, trainer_tags)


def _save_config_as_peft_does(config: LoraConfig, model: Any, directory: str) -> None:
    """`adapter_config.json` as `PeftModel.save_pretrained` writes it: inference mode, the base model's name when the
    config has none, and without a task type the base model's class, which `AutoPeftModel` reloads it with."""
    base = model.base_model.model
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = base.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    auto_mapping = None
    if config.task_type is None:
        auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    config.save_pretrained(directory, auto_mapping_dict=auto_mapping)


def write_selection_files(
    directory: str | os.PathLike,
    report: SelectionReport,
    adapter_config: LoraConfig,
    trainer_tags: list[str] | tuple[str, ...] = ("weightlora",),
) -> None:
    """Write everything a save holds beside the adapter weights (listed above) into `directory`, which already holds
    the stock adapter that `adapter_config` describes."""
    from .portable import write_lora_targets

    directory = os.fspath(directory)
    write_selection(directory, report)
    heatmap = _try_heatmap(report, directory)
    task = getattr(adapter_config.task_type, "value", adapter_config.task_type)
    write_model_card(
        directory, report, adapter_config.base_model_name_or_path, task, trainer_tags, heatmap=heatmap or None
    )
    if report.selection_only:  # saved by select_adapters: add the config-driven trainers' form
        write_lora_targets(directory, report, adapter_config=adapter_config)


def _try_heatmap(report: SelectionReport, directory: str) -> str:
    """The heatmap beside selection.json, when matplotlib is installed (an optional dependency); its file name, or
    an empty string without matplotlib."""
    try:
        from .plotting import HEATMAP_FILE, plot_selection_heatmap
    except ImportError:
        return ""
    try:
        plot_selection_heatmap(report, os.path.join(directory, HEATMAP_FILE))
    except ImportError:
        return ""
    return HEATMAP_FILE
