"""Adapters saved during the warm-up: stock PEFT files that are the model being trained, plus what resuming needs.

Before the switch the model computes `B (omega_i A) x` per adapter, which no stock LoRA config can express. A save
in the warm-up (a checkpoint at a step <= T, or `save_model` mid-run) therefore post-processes what PEFT wrote:
- `adapter_model.safetensors`: every `lora_B` multiplied by its omega_i (zero for adapters thresholded out), so
  stock PEFT reloads the function the model has at that step;
- `adapter_config.json`: a stock LoRA config (no WeightLoRA fields; target_modules = every adapted module's name,
  target_parameters = every adapted expert or router parameter's);
- `weight_lora_warmup_adapter.safetensors`: the adapter weights as they are (unfolded), which resuming loads back:
  an adapter at omega_i = 0 keeps its weights and may re-enter the selection later, so folding must not lose them.
After the switch the model is plain LoRA and PEFT's files need one thing only: with `bias="lora_only"` the trained
biases of layers whose adapter was dropped (`finish_adapter_file` does both). A serving engine that wants every
projection type in every layer gets `pad_adapter`'s copy (zeros where an adapter was dropped).
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import WeightLoraConfig

WARMUP_STATE_FILE = "weight_lora_warmup_adapter.safetensors"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_LORA_FIELDS = {f.name for f in dataclasses.fields(WeightLoraConfig)} - {
    f.name for f in dataclasses.fields(LoraConfig)
}


def finish_adapter_file(directory: str | os.PathLike, weight_lora) -> None:
    """Make the adapter PEFT just wrote into `directory` the model being trained, in one read and one write of its
    weights: during the warm-up every `lora_B` is multiplied by its omega, the config becomes a stock one with exact
    module names, and the unfolded weights are kept beside it for resuming; with `bias="lora_only"` the trained
    biases of dropped adapters' layers are added (PEFT saves only those of layers that still have an adapter)."""
    warmup = not weight_lora.switched
    if warmup:
        raw = {
            key: value.detach().cpu().contiguous()
            for key, value in get_peft_model_state_dict(
                weight_lora.model, adapter_name=weight_lora.adapter_name
            ).items()
        }
        save_file(raw, os.path.join(directory, WARMUP_STATE_FILE))
    omega = weight_lora.omega if warmup else None
    biases = weight_lora.bias_state_dict()
    if omega is not None or biases:
        weights_path = _adapter_weights_path(directory)
        safetensors = weights_path.endswith(".safetensors")
        weights = load_file(weights_path) if safetensors else torch.load(weights_path, weights_only=True)
        if omega is not None:
            for unit, factor in zip(weight_lora.units, omega.detach().cpu().tolist()):
                for module in unit.file_modules:  # an experts block: each of its wrappers' B
                    key = f"base_model.model.{module}.lora_B.weight"
                    if key not in weights:
                        raise KeyError(f"{key} is not in {weights_path}: the saved adapter does not match the model")
                    weights[key] = weights[key] * factor
        weights.update(biases)
        if safetensors:
            save_file(weights, weights_path, metadata={"format": "pt"})
        else:
            torch.save(weights, weights_path)
    if warmup:
        _write_stock_warmup_config(directory, weight_lora.units)


def _adapter_weights_path(directory: str | os.PathLike) -> str:
    for name in ADAPTER_WEIGHTS:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}) in {directory}")


def _write_stock_warmup_config(directory: str | os.PathLike, units: list) -> None:
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    with open(config_path) as f:
        config = json.load(f)
    for field in WEIGHT_LORA_FIELDS:
        config.pop(field, None)
    # Exact module and parameter names, as after the switch: PEFT would otherwise re-resolve "all-linear" or
    # suffixes on reload.
    targets = {"target_modules": [], "target_parameters": []}
    for unit in units:
        for field, names in unit.config_targets().items():
            targets[field].extend(names)
    config.update(
        target_modules=targets["target_modules"] or (None if targets["target_parameters"] else []),
        target_parameters=targets["target_parameters"] or None,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
    )
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def restore_warmup_weights(directory: str | os.PathLike, weight_lora) -> bool:
    """Load the unfolded warm-up weights a checkpoint kept, if it has them; returns whether it did."""
    path = os.path.join(directory, WARMUP_STATE_FILE)
    if not os.path.isfile(path):
        return False
    state = load_file(path)
    device = next(weight_lora.model.parameters()).device
    result = set_peft_model_state_dict(
        weight_lora.model, {k: v.to(device) for k, v in state.items()}, adapter_name=weight_lora.adapter_name
    )
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{path} holds weights this model does not have: {unexpected[:3]}")
    return True


def pad_adapter(source: str | os.PathLike, target: str | os.PathLike, report=None) -> str:
    """Copy the adapter in `source` to `target` with an adapter on every (layer, projection) that was targeted: the
    dropped ones get zero weights at the kept rank, so the function is unchanged.

    For serving engines that want every projection type in every layer (TGI / LoRAX drop a projection type's LoRA in
    every layer when one layer lacks it; older SGLang failed without one of q/k/v). Needs the `selection.json`
    beside the adapter (format 2 or later: it records each layer's shape) and one rank for all kept adapters.
    Returns `target`. `source` and `target` may be the same folder. `report`: the source's selection, when the
    caller has it in memory (else read from its selection.json and checked against the weights,
    `state.check_adapter_weights`). A selection.json that disagrees with the folder, or an unreadable weights file,
    is a `ValueError` naming the file.
    """
    import shutil

    from .state import read_selection, unreadable_weights

    source, target = os.fspath(source), os.fspath(target)
    report = report if report is not None else read_selection(source, check_weights=True)
    if not report.switched:
        raise ValueError(f"{source} was saved before the switch: every adapter is still there, nothing to pad.")
    if any(a.kind != "linear" for a in report.adapters):
        raise ValueError(
            f"{source} holds adapters on experts or routers (target_parameters); padding is for serving engines that "
            "want every projection in every layer (TGI / LoRAX), which do not load mixture-of-experts LoRA. Serve it "
            "as it is (vLLM takes a subset of layers)."
        )
    if any(a.in_features is None for a in report.adapters):
        raise ValueError(
            f"{source}/selection.json predates format 2 and does not record the layers' shapes; save the adapter again "
            "with this version (WeightLoraModel.report()) to pad it."
        )
    ranks = {a.rank for a in report.adapters if a.kept}
    if len(ranks) != 1:
        raise ValueError(f"the kept adapters have ranks {sorted(ranks)}; padding needs one rank (no rank_pattern).")
    (rank,) = ranks
    weights_path = os.path.join(source, ADAPTER_WEIGHTS[0])
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"padding reads {ADAPTER_WEIGHTS[0]}; {source} has none")
    try:
        weights = load_file(weights_path)
    except SafetensorError as err:
        raise unreadable_weights(weights_path, err) from None
    dtype = next(iter(weights.values())).dtype
    for adapter in report.adapters:
        if adapter.kept:
            continue
        prefix = f"base_model.model.{adapter.module}"
        weights[f"{prefix}.lora_A.weight"] = torch.zeros(rank, adapter.in_features, dtype=dtype)
        weights[f"{prefix}.lora_B.weight"] = torch.zeros(adapter.out_features, rank, dtype=dtype)
    with open(os.path.join(source, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    config.update(target_modules=[a.module for a in report.adapters], rank_pattern={}, alpha_pattern={}, r=rank)
    if os.path.realpath(source) != os.path.realpath(target):
        shutil.copytree(source, target, dirs_exist_ok=True)
    save_file(weights, os.path.join(target, ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
    with open(os.path.join(target, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return target
