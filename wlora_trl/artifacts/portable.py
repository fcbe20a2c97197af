"""The selection as a portable artefact: a stock `peft.LoraConfig` on the kept modules, for any trainer or engine.

The switch's outcome is a plain LoRA configuration (which modules, which rank). The two-stage route uses it:

    stage 1  `wlora-trl select` (or `trainer.select_adapters()`): T warm-up steps of WeightLoRA, the switch, stop;
             writes selection.json, the heatmap, a stock adapter_config.json and `lora_targets.yaml`.
    stage 2  any LoRA trainer on any setup (FSDP2, DeepSpeed, Axolotl, LLaMA-Factory) with that configuration:
             `SFTTrainer(peft_config=lora_config_from_selection("select_dir"))`.

How stage 2 differs from the one-run method (docs/source/distributed.md, "Past one GPU"): the optimizer state and
the LR schedule start fresh and the T warm-up batches come again; with the paper's default `reinit=True` the kept
adapters start from a fresh initialisation in the one-run method too. With `reinit=False` stage 2 can start from the
warm-up's adapters by loading the stage-1 folder with `PeftModel.from_pretrained(base, select_dir, is_trainable=True)`
(from Python).
"""

from __future__ import annotations

import json
import os

from peft import LoraConfig

from ..state import SelectionReport, read_selection
from ..surgery import alpha_for_rank
from .export import ADAPTER_CONFIG

TARGETS_FILE = "lora_targets.yaml"
# Fields of the stage-1 adapter config that describe the adapters' form, carried into stage 2's LoraConfig.
_CARRIED = ("lora_dropout", "use_rslora", "bias", "task_type", "modules_to_save", "init_lora_weights", "fan_in_fan_out")


def lora_config_from_selection(
    selection: str | os.PathLike | SelectionReport,
    *,
    r: int | None = None,
    lora_alpha: float | None = None,
    **lora_config_kwargs,
) -> LoraConfig:
    """A stock `LoraConfig` on exactly the adapters a WeightLoRA run kept.

    `selection`: a folder saved by a WeightLoRA trainer or `wlora-trl select` (selection.json and adapter_config.json),
    a selection.json path, or a `SelectionReport`. The rank is the kept adapters' rank after the switch (r, or 2r
    for WeightLoRA+) and `lora_alpha` the one the run's own export used (read from the folder's adapter_config.json),
    so stage 2 trains adapters of the same form. `r=` overrides the rank (alpha is then rescaled to keep alpha/r, or
    alpha/sqrt(r) with rsLoRA, unless `lora_alpha=` is given too); other keyword arguments go to `LoraConfig`
    (`lora_dropout`, `task_type`, ...). `target_modules` lists the kept linear modules' full names and
    `target_parameters` the kept experts blocks' and routers' parameters, which PEFT matches exactly on the same
    architecture.
    """
    if "target_modules" in lora_config_kwargs:
        raise TypeError("target_modules comes from the selection (the kept modules); it cannot be passed here.")
    report = selection if isinstance(selection, SelectionReport) else read_selection(selection)
    stage1 = {} if isinstance(selection, SelectionReport) else _stage1_config(selection)
    return _lora_config(report, stage1, r=r, lora_alpha=lora_alpha, **lora_config_kwargs)


def _lora_config(report: SelectionReport, stage1: dict, r=None, lora_alpha=None, **lora_config_kwargs) -> LoraConfig:
    """`lora_config_from_selection` from a report and the stage-1 adapter config as a dict ({} when unknown)."""
    if not report.switched:
        raise ValueError(
            "this selection was saved during the warm-up, before the switch decided which adapters stay: use the "
            "folder `wlora-trl select` or `trainer.select_adapters()` wrote, or a save from after step T."
        )
    kept = [a for a in report.adapters if a.kept]
    ranks = {a.rank for a in kept}
    if r is None and len(ranks) != 1:
        raise ValueError(f"the kept adapters have ranks {sorted(ranks)}; pass r= to choose one for stage 2.")
    rank = r if r is not None else ranks.pop()
    if lora_alpha is None:
        # Patterns that only give an experts block's parameters their multiple of its rank come from the record.
        multiples = {
            f"{a.module}.{name}" for a in kept for name, p in (a.parameters or {}).items() if p["rank_factor"] != 1
        }
        if set(stage1.get("alpha_pattern") or {}) - multiples or set(stage1.get("rank_pattern") or {}) - multiples:
            raise ValueError("the stage-1 adapter_config.json has rank or alpha patterns: pass r= and lora_alpha=.")
        if "lora_alpha" not in stage1:
            raise ValueError(
                "no adapter_config.json beside this selection.json to take lora_alpha from: pass lora_alpha= "
                "(the run's alpha; WeightLoRA+ doubles it with the rank)."
            )
        use_rslora = bool(lora_config_kwargs.get("use_rslora", stage1.get("use_rslora", False)))
        lora_alpha = alpha_for_rank(stage1["lora_alpha"], stage1["r"], rank, use_rslora)
    fields = {key: stage1[key] for key in _CARRIED if key in stage1}
    fields.update(lora_config_kwargs)
    modules = [a.module for a in kept if a.kind == "linear"]
    parameters = [name for a in kept for name in a.target_parameters]
    # An experts block's parameters at other multiples of its rank (PEFT's all-linear: a fused gate_up_proj at 2r).
    patterns = {
        f"{a.module}.{name}": shape["rank_factor"] * rank
        for a in kept
        for name, shape in (a.parameters or {}).items()
        if shape["rank_factor"] != 1
    }
    use_rslora = bool(fields.get("use_rslora", False))
    return LoraConfig(
        **{
            **fields,
            "r": rank,
            "lora_alpha": lora_alpha,
            "target_modules": modules or (None if parameters else []),
            "target_parameters": parameters or None,
            "rank_pattern": patterns,
            "alpha_pattern": {
                name: alpha_for_rank(lora_alpha, rank, value, use_rslora) for name, value in patterns.items()
            },
        }
    )


def _stage1_config(selection: str | os.PathLike) -> dict:
    """The stock adapter_config.json beside the selection, as a dict ({} when there is none)."""
    folder = os.fspath(selection)
    folder = folder if os.path.isdir(folder) else os.path.dirname(folder)
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def lora_targets_yaml(config: LoraConfig, report: SelectionReport, source: str) -> str:
    """The selection as YAML in the keys of TRL's `ModelConfig` (`trl sft --config`, `wlora-trl sft --method lora`),
    which Axolotl reads too; LLaMA-Factory's comma-separated `lora_target` as a comment. Carries what shapes the
    adapters (dropout, rsLoRA, task type, modules_to_save), so stage 2 does not fall back to TRL's defaults."""
    names = report.kept_modules  # the model's order (LoraConfig keeps a set)
    task = getattr(config.task_type, "value", config.task_type)
    alpha = config.lora_alpha
    lines = [
        f"# WeightLoRA selection ({report.method}, kept {len(names)} of {report.n} adapters) from {source}",
        "# TRL (trl sft --config, ModelConfig) reads these keys as they are; Axolotl too, with `adapter: lora`.",
        "# Module names are full paths, which PEFT matches exactly on the same model class as stage 1.",
        "use_peft: true",
        f"lora_r: {config.r}",
        f"lora_alpha: {alpha}" + ("  # not an integer (rsLoRA + plus): TRL's ModelConfig wants one" if
                                  not float(alpha).is_integer() else ""),
        f"lora_dropout: {config.lora_dropout}",
        f"use_rslora: {str(bool(config.use_rslora)).lower()}",
        *([f"lora_task_type: {task}"] if task else []),
        *(["lora_modules_to_save:", *[f"  - {m}" for m in config.modules_to_save]] if config.modules_to_save else []),
        "lora_target_modules:",
        *[f"  - {name}" for name in names if name in (config.target_modules or ())],
        *(["lora_target_parameters:", *[f"  - {name}" for name in config.target_parameters]]
          if config.target_parameters else []),
        f"# LLaMA-Factory: finetuning_type: lora, lora_rank: {config.r}, lora_alpha: {alpha}, and",
        f"# lora_target: {','.join(names)}",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def write_lora_targets(
    directory: str | os.PathLike, report: SelectionReport | None = None, adapter_config: LoraConfig | None = None
) -> str:
    """Write `lora_targets.yaml` beside a stage-1 folder's selection.json; returns its path. `report` and
    `adapter_config` (the stock config of the adapter saved there) are read from the folder when not given."""
    directory = os.fspath(directory)
    report = report or read_selection(directory)
    stage1 = adapter_config.to_dict() if adapter_config is not None else _stage1_config(directory)
    config = _lora_config(report, stage1)
    path = os.path.join(directory, TARGETS_FILE)
    with open(path, "w") as f:
        f.write(lora_targets_yaml(config, report, directory))
    return path
