"""The adapter files' names, the warm-up weights a checkpoint keeps for resuming, and the padded copy.

Before the switch the model computes `B (omega_i A) x` per adapter, which no stock LoRA config can express, so a save
in the warm-up writes the function (every `lora_B` times its omega_i; `wlora_trl.artifacts.saving` builds it) and
keeps the weights as they are beside it (`WARMUP_STATE_FILE`): an adapter at omega_i = 0 keeps its weights and may
re-enter the selection later, so resuming must not lose them (`restore_warmup_weights`). A serving engine that wants
every projection type in every layer gets `pad_adapter`'s copy (zeros where an adapter was dropped).
"""

from __future__ import annotations

import json
import os

import torch
from peft import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WARMUP_STATE_FILE = "weight_lora_warmup_adapter.safetensors"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_CONFIG = "adapter_config.json"


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
    dropped ones get zero weights at the kept rank, so the function is unchanged (`padded_adapter`).

    For serving engines that want every projection type in every layer (TGI / LoRAX drop a projection type's LoRA in
    every layer when one layer lacks it; older SGLang failed without one of q/k/v). Needs the `selection.json`
    beside the adapter (format 2 or later: it records each layer's shape) and one rank for all kept adapters.
    Returns `target`. `source` and `target` may be the same folder. `report`: the source's selection, when the
    caller has it in memory (else read from its selection.json and checked against the weights,
    `state.check_adapter_weights`). A selection.json that disagrees with the folder, or an unreadable weights file,
    is a `ValueError` naming the file. A save with `padded=True` pads in memory instead.
    """
    import shutil

    from ..state import read_selection, unreadable_weights

    source, target = os.fspath(source), os.fspath(target)
    report = report if report is not None else read_selection(source, check_weights=True)
    weights_path = os.path.join(source, ADAPTER_WEIGHTS[0])
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"padding reads {ADAPTER_WEIGHTS[0]}; {source} has none")
    try:
        weights = load_file(weights_path)
    except SafetensorError as err:
        raise unreadable_weights(weights_path, err) from None
    weights, fields = padded_adapter(weights, report, source)
    with open(os.path.join(source, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    config.update(fields)
    if os.path.realpath(source) != os.path.realpath(target):
        shutil.copytree(source, target, dirs_exist_ok=True)
    save_file(weights, os.path.join(target, ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
    with open(os.path.join(target, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return target


def padded_adapter(
    weights: dict[str, torch.Tensor], report, source: str = "the adapter"
) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's tensors with zero adapters (at the kept rank) on the dropped (layer, projection)s, and the
    `adapter_config.json` fields that describe them (every targeted module, one rank, no patterns)."""
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
    weights = dict(weights)
    dtype = next(iter(weights.values())).dtype
    for adapter in report.adapters:
        if adapter.kept:
            continue
        prefix = f"base_model.model.{adapter.module}"
        weights[f"{prefix}.lora_A.weight"] = torch.zeros(rank, adapter.in_features, dtype=dtype)
        weights[f"{prefix}.lora_B.weight"] = torch.zeros(adapter.out_features, rank, dtype=dtype)
    fields = {"target_modules": [a.module for a in report.adapters], "rank_pattern": {}, "alpha_pattern": {}, "r": rank}
    return weights, fields
