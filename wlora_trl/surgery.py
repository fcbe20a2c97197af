"""The switch at step T, as operations on a PEFT LoRA model and on an optimizer.

- `drop_adapter` turns an adapted module back into its base layer: no LoRA parameters, no compute (other, frozen
  adapters of the layer stay).
- `rebuild_adapter` gives a kept adapter its post-switch form: re-initialised (A random, B zero) or with omega
  folded into B, at rank r or, for WeightLoRA+, 2r.
- `stock_lora_config` writes the result as a plain `peft.LoraConfig`, so the saved adapter loads with stock PEFT.
- `retarget_optimizer` edits a live optimizer in place: dropped parameters leave it, re-created ones take their
  predecessors' places in the same param groups. Editing in place (rather than building a new optimizer) keeps
  the optimizer object, its accelerate wrapper, the GradScaler bookkeeping and the LR scheduler untouched, so the
  learning rate after the switch is exactly the uninterrupted schedule's, and the param-group layout that
  `optimizer.pt` checkpoints record stays the same.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn


def drop_adapter(root: nn.Module, module_name: str, adapter_name: str) -> list[nn.Parameter]:
    """Take `adapter_name` off the LoRA layer at `module_name`; returns its parameters that left.

    A layer left without adapters becomes its base layer again. One that holds other, frozen adapters (TRL's
    reference copy "ref") keeps them: only this adapter's entries go, as in PEFT's `delete_adapter` but without
    making another adapter active there, so the layer computes its base layer alone until one is set."""
    layer = root.get_submodule(module_name)
    removed = adapter_parameters(layer, adapter_name)
    if any(name != adapter_name for name in layer.r):
        for attribute in (*layer.adapter_layer_names, *layer.other_param_names):
            entries = getattr(layer, attribute)
            if adapter_name in entries:
                del entries[adapter_name]
        return removed
    parent_name, _, child_name = module_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, layer.get_base_layer())
    return removed


def freeze_adapter_bias(layer: LoraLayer, bias: str) -> list[nn.Parameter]:
    """With `bias="lora_only"` PEFT trains the bias of every adapted layer: when the layer's adapter is dropped, its
    bias stops training too (the layer is a base layer again). Returns the bias it froze, if any, for the optimizer
    to forget. (`bias="all"` trains every bias in the model, adapted or not: those keep training.)"""
    base_bias = getattr(layer.get_base_layer(), "bias", None)
    if bias != "lora_only" or base_bias is None or not base_bias.requires_grad:
        return []
    base_bias.requires_grad_(False)
    return [base_bias]


def adapter_parameters(layer: LoraLayer, adapter_name: str) -> list[nn.Parameter]:
    return list(layer.lora_A[adapter_name].parameters()) + list(layer.lora_B[adapter_name].parameters())


@torch.no_grad()
def rebuild_adapter(
    layer: LoraLayer,
    adapter_name: str,
    config: LoraConfig,
    *,
    rank: int,
    alpha: float,
    reinit: bool,
    omega: float,
) -> None:
    """Give one kept adapter its post-switch form.

    `reinit=True`: a fresh adapter of `rank` (PEFT's own initialisation: A random, B zero).
    `reinit=False`: the trained A and B stay, omega is folded into B, and extra rank (WeightLoRA+) is added as
    fresh rows of A and zero columns of B; the caller keeps alpha/r constant, so the function is unchanged.
    The adapter keeps the dtype it had (PEFT would create it in the base layer's dtype, wrong for 8-bit bases).
    """
    old_a = layer.lora_A[adapter_name].weight.detach().clone()
    old_b = layer.lora_B[adapter_name].weight.detach().clone()
    dtype = old_a.dtype
    layer.update_layer(adapter_name, rank, alpha, config=config)
    new_a, new_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    new_a.data = new_a.data.to(dtype)
    new_b.data = new_b.data.to(dtype)
    if not reinit:
        old_rank = old_a.shape[0]
        new_a[:old_rank].copy_(old_a)
        new_b[:, :old_rank].copy_(old_b * omega)


def stock_lora_config(
    config: LoraConfig, kept_modules: Iterable[str], ranks: Mapping[str, int], alphas: Mapping[str, float]
) -> LoraConfig:
    """A plain `LoraConfig` (none of WeightLoRA's fields) describing exactly the kept adapters.

    `target_modules` lists the kept modules' full names; the most common rank and alpha become `r` and
    `lora_alpha`, and `rank_pattern` / `alpha_pattern` name the modules that differ (none in the usual case).
    """
    kept = list(kept_modules)
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
    fields.update(
        target_modules=kept,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        r=r,
        lora_alpha=alpha,
        rank_pattern={name: ranks[name] for name in kept if ranks[name] != r},
        alpha_pattern={name: alphas[name] for name in kept if alphas[name] != alpha},
    )
    return LoraConfig(**fields)


def alpha_for_rank(alpha: float, old_rank: int, new_rank: int, use_rslora: bool) -> float:
    """The lora_alpha that keeps the adapter's scaling (alpha/r, or alpha/sqrt(r) with rsLoRA) when r changes."""
    if new_rank == old_rank:
        return alpha
    factor = math.sqrt(new_rank / old_rank) if use_rslora else new_rank / old_rank
    scaled = alpha * factor
    return int(scaled) if float(scaled).is_integer() else scaled


def innermost_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's `AcceleratedOptimizer` (and similar wrappers)."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def retarget_optimizer(optimizer: torch.optim.Optimizer, replacements: Mapping[int, list[nn.Parameter]]) -> None:
    """Edit `optimizer` in place after the switch.

    `replacements` maps `id(old_parameter)` to the parameters that take its place (an empty list for a dropped
    adapter). Each old parameter leaves its param group and its state is deleted; its replacements join the same
    group at the same position with empty state. Parameters not mentioned keep their state (for example a
    classifier head in `modules_to_save`).
    """
    inner = innermost_optimizer(optimizer)
    for group in inner.param_groups:
        params = []
        for param in group["params"]:
            if id(param) in replacements:
                inner.state.pop(param, None)
                params.extend(replacements[id(param)])
            else:
                params.append(param)
        group["params"] = params
