"""What a save writes into a folder, composed in one place from the run's state in memory.

A WeightLoRA save folder holds, beside the adapter weights and `adapter_config.json`:
- `selection.json`: what the selection did (`state.write_selection`), the record a resume starts from;
- `selection_heatmap.png`: layers x projections, omega and the kept adapters (with matplotlib installed);
- `README.md`: the model card, linking the heatmap when there is one;
- `lora_targets.yaml`: for a stage-1 save (`select_adapters`), the selection in TRL ModelConfig keys;
- with `padded=True`, the adapter padded to every targeted (layer, projection) for serving engines.
Every one of them is written from the `SelectionReport` and the stock `LoraConfig` in memory; none reads back what
another just wrote. The trainers and `WeightLoraModel.save_adapter` both end their saves here.
"""

from __future__ import annotations

import os

from peft import LoraConfig

from .card import write_model_card
from .state import SelectionReport, write_selection


def write_selection_files(
    directory: str | os.PathLike,
    report: SelectionReport,
    adapter_config: LoraConfig,
    trainer_tags: list[str] | tuple[str, ...] = ("weightlora",),
    padded: bool = False,
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
    if padded:
        from .export import pad_adapter

        pad_adapter(directory, directory, report=report)


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
