"""The switch at step T, as operations on a PEFT LoRA model and on an optimizer.

- `drop_adapter` turns an adapted module back into its base layer: no LoRA parameters, no compute (other, frozen
  adapters of the layer stay). Each unit kind (`wlora_trl.units`) applies these to its own layers.
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


def rank_view_a(weight: torch.Tensor, num_experts: int = 1) -> torch.Tensor:
    """`lora_A`'s weight (r * E, in) as (E, r, in): PEFT's layout for E experts (expert outer); (1, r, in) for a
    plain adapter."""
    return weight.view(num_experts, -1, weight.shape[-1])


def rank_view_b(weight: torch.Tensor, num_experts: int = 1) -> torch.Tensor:
    """`lora_B`'s weight (out, r * E) as (out, r, E): PEFT's layout for E experts (expert inner)."""
    return weight.view(weight.shape[0], -1, num_experts)


def first_rank(weight: torch.Tensor, which: str, rank: int, num_experts: int = 1) -> torch.Tensor:
    """The first `rank` of an adapter's A ("A") or B ("B") weight, per expert: what a rank-`rank` adapter holds."""
    if which == "A":
        return rank_view_a(weight, num_experts)[:, :rank].reshape(num_experts * rank, weight.shape[-1])
    return rank_view_b(weight, num_experts)[:, :rank].reshape(weight.shape[0], rank * num_experts)


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
    num_experts: int = 1,
) -> None:
    """Give one kept adapter its post-switch form.

    `reinit=True`: a fresh adapter of `rank` (PEFT's own initialisation: A random, B zero).
    `reinit=False`: the trained A and B stay, omega is folded into B, and extra rank (WeightLoRA+) is added as
    fresh rows of A and zero columns of B (per expert, for an experts `ParamWrapper` of `num_experts`); the caller
    keeps alpha/r constant, so the function is unchanged.
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
        old_rank = old_a.shape[0] // num_experts
        rank_view_a(new_a, num_experts)[:, :old_rank].copy_(rank_view_a(old_a, num_experts))
        rank_view_b(new_b, num_experts)[:, :old_rank].copy_(rank_view_b(old_b, num_experts) * omega)


def stock_lora_config(config: LoraConfig, kept_units: Iterable, ranks: Mapping[str, int]) -> LoraConfig:
    """A plain `LoraConfig` (none of WeightLoRA's fields) describing exactly the kept units (`wlora_trl.units`),
    `ranks` giving each one's rank by name.

    `target_modules` lists the kept linear modules' full names, `target_parameters` the kept experts' and routers'
    full parameter names (None when there are none); the most common rank and alpha become `r` and `lora_alpha`, and
    `rank_pattern` / `alpha_pattern` name the modules (or parameters) that differ (an experts block's fused
    gate_up_proj at 2r, from PEFT's `all-linear`; otherwise none in the usual case).
    """
    targets: dict[str, list[str]] = {"target_modules": [], "target_parameters": []}
    shapes: dict[str, tuple[int, float]] = {}
    for unit in kept_units:
        for field, named in unit.targets_at(ranks[unit.name], config.use_rslora).items():
            targets[field].extend(named)
            shapes.update(named)
    all_ranks = [rank for rank, _ in shapes.values()]
    all_alphas = [alpha for _, alpha in shapes.values()]
    r = max(set(all_ranks), key=all_ranks.count) if all_ranks else config.r
    alpha = max(set(all_alphas), key=all_alphas.count) if all_alphas else config.lora_alpha
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
    fields.update(
        # PEFT takes target_modules=None with target_parameters (an adapter on experts only), not an empty list.
        target_modules=targets["target_modules"] or (None if targets["target_parameters"] else []),
        target_parameters=targets["target_parameters"] or None,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        r=r,
        lora_alpha=alpha,
        rank_pattern={name: rank for name, (rank, _) in shapes.items() if rank != r},
        alpha_pattern={name: a for name, (_, a) in shapes.items() if a != alpha},
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
