"""Mask mode: the switch for models whose structure must not change, such as models sharded with FSDP2.

`fully_shard` turns every parameter of a decoder layer into a shard (a DTensor) that its FSDP state all-gathers
before the layer runs; replacing a LoRA module, or re-creating its parameters at another rank, would leave that
state pointing at parameters the model no longer has. So in mask mode nothing is replaced:
- a dropped adapter is zeroed (A and B), frozen and switched off on its layer (PEFT's per-layer `enable_adapters`),
  so its layer computes only the base layer: no LoRA compute and no gradient. Its (sharded) parameters stay in the
  model and are still all-gathered with the rest of the layer: that, and their share of memory, is what a dropped
  adapter costs under FSDP2. The optimizer forgets them, with their state.
- a kept adapter is re-initialised in place, from full tensors drawn from a seeded CPU stream and written shard by
  shard (each rank copies its own slice of the same full tensor: no communication, every rank agrees);
- WeightLoRA+ cannot grow the rank at the switch, so `preallocate_double_rank` gives every adapter rank 2r before
  sharding, with the extra half of A and B held at zero: it computes the rank-r adapter exactly and, with zero A
  rows and zero B columns, gets zero gradients there (Adam moves nothing), until the switch brings them to life.
- the adapter is exported from gathered full tensors of the kept adapters only (`gathered_adapter_state_dict`),
  so the saved adapter is the same stock PEFT adapter a one-process run writes.

How the switch reaches a parameter is the one thing that differs between engines, and it lives in the engine's
`ParameterAccess` (`wlora_trl.engines.access`): read a parameter's whole value, write one back, and make the
optimizer forget what it held for the dropped and re-initialised adapters. Plain tensors (one process, DDP) and
FSDP2's DTensors share one; DeepSpeed ZeRO, whose parameters are partitioned and whose optimizer holds flat fp32
copies of them, has its own (`wlora_trl.engines.deepspeed.ZeroParameterAccess`). Everything here is written once,
against that interface.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .engines.access import PLAIN_ACCESS, ParameterAccess, full_shape
from .surgery import adapter_parameters, alpha_for_rank, first_rank, rank_view_a, rank_view_b, rebuild_adapter


def lora_init_a(rank: int, in_features: int, init_lora_weights: bool | str, num_experts: int = 1) -> torch.Tensor:
    """A fresh `lora_A` weight (rank * num_experts rows), drawn from the default CPU generator as PEFT's
    `reset_lora_parameters` draws it."""
    weight = torch.empty(rank * num_experts, in_features)
    if init_lora_weights is True:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    else:  # "gaussian" (WeightLoraConfig refuses every other init)
        nn.init.normal_(weight, std=1 / rank)
    return weight


@torch.no_grad()
def preallocate_double_rank(layer: LoraLayer, adapter_name: str, config, num_experts: int = 1) -> None:
    """WeightLoRA+ in mask mode, before sharding: give the adapter rank 2r (alpha doubled, so alpha/r and the
    function stay), its first r rows of A and columns of B (per expert) the adapter's own, the rest zero."""
    rank = layer.r[adapter_name]
    alpha = alpha_for_rank(layer.lora_alpha[adapter_name], rank, 2 * rank, config.use_rslora)
    with torch.random.fork_rng(devices=[]):  # PEFT draws a throwaway init here; leave the user's stream alone
        rebuild_adapter(
            layer, adapter_name, config, rank=2 * rank, alpha=alpha, reinit=False, omega=1.0, num_experts=num_experts
        )
    rank_view_a(layer.lora_A[adapter_name].weight, num_experts)[:, rank:].zero_()
    rank_view_b(layer.lora_B[adapter_name].weight, num_experts)[:, rank:].zero_()


@torch.no_grad()
def mask_adapter(layer: LoraLayer, adapter_name: str, access: ParameterAccess = PLAIN_ACCESS) -> list[nn.Parameter]:
    """Switch a dropped adapter off in place: zero weights (so re-enabling adapters, as PEFT's `disable_adapter()`
    context does on exit, adds nothing and trains nothing), frozen, and its layer computing the base layer only."""
    params = adapter_parameters(layer, adapter_name)
    for param in params:
        access.write(param, torch.zeros(full_shape(param)))
    layer.enable_adapters(False)  # also sets requires_grad=False on the layer's adapter weights
    access.switched_off(layer, params)
    return params


@torch.no_grad()
def reinit_in_place(
    layer: LoraLayer,
    adapter_name: str,
    *,
    warmup_rank: int,
    reinit: bool,
    omega: float,
    init_lora_weights,
    access: ParameterAccess = PLAIN_ACCESS,
    num_experts: int = 1,
) -> list[nn.Parameter]:
    """A kept adapter's post-switch form, in place (same parameters, same shapes): re-initialised (A from the
    current CPU generator, B zero) or, with `reinit=False`, omega folded into B and any extra rank (WeightLoRA+)
    given fresh rows of A (per expert, for an experts `ParamWrapper`), so the function is unchanged. Returns the
    adapter's parameters."""
    a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    rows, in_features = full_shape(a)
    rank = rows // num_experts
    fresh = lora_init_a(rank, in_features, init_lora_weights, num_experts)
    if reinit:
        access.write(a, fresh)
        access.write(b, torch.zeros(full_shape(b)))
    else:
        access.write(b, access.read(b).to(device="cpu", dtype=torch.float32) * omega)
        if rank > warmup_rank:
            grown = rank_view_a(fresh.clone(), num_experts)
            kept_rows = rank_view_a(access.read(a).to(device="cpu", dtype=fresh.dtype), num_experts)[:, :warmup_rank]
            grown[:, :warmup_rank] = kept_rows
            access.write(a, grown.reshape(rows, in_features))
    return adapter_parameters(layer, adapter_name)


def gathered_adapter_state_dict(
    model: nn.Module,
    modules: dict[str, float | None],
    adapter_name: str,
    ranks: dict[str, int],
    access: ParameterAccess = PLAIN_ACCESS,
    experts: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """PEFT's adapter file contents (keys as `get_peft_model_state_dict` writes them), from full tensors on the CPU.

    `modules` maps each exported module's name (relative to the base model, as in the file: an experts block's inner
    wrapper is `<name>.base_layer`) to the factor its `lora_B` is multiplied by (omega during the warm-up; None for
    1), `ranks` its rank (a WeightLoRA+ adapter pre-allocated at 2r exports its first r during the warm-up, per
    expert), `experts` its number of experts (1 when absent). Other modules' adapters are left out; `modules_to_save` copies come along.
    Under FSDP2 and DeepSpeed ZeRO this is a collective (each parameter is gathered): call it on every rank. A
    gathered tensor of another shape than the parameter's (ZeRO-3's empty local storage, saved as the 40-byte adapter
    file of a known ZeRO-3 + PEFT failure) is an error here, not a silently empty adapter.
    """
    from peft import get_peft_model_state_dict

    prefix = "base_model.model."
    gathered: dict[str, torch.Tensor] = {}
    for key, param in model.named_parameters():
        if "modules_to_save" in key:
            gathered[key] = _gathered_tensor(access, key, param)
            continue
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module = key[len(prefix) :].split(".lora_", 1)[0] if key.startswith(prefix) else None
        if module not in modules:
            continue
        value = _gathered_tensor(access, key, param)
        rank, num_experts = ranks[module], (experts or {}).get(module, 1)
        value = first_rank(value, "A" if ".lora_A." in key else "B", rank, num_experts)
        if ".lora_B." in key and modules[module] is not None:
            value = value * modules[module]
        gathered[key] = value.contiguous()
    missing = sorted(set(modules) - {key[len(prefix) :].split(".lora_", 1)[0] for key in gathered})
    if missing:
        raise RuntimeError(
            f"WeightLoRA: the export found no LoRA weights for {len(missing)} adapted modules (first: {missing[0]}): "
            "the adapter file would miss them. Please report it with your launch command."
        )
    return {
        key: value
        for key, value in get_peft_model_state_dict(model, state_dict=gathered, adapter_name=adapter_name).items()
    }


def _gathered_tensor(access: ParameterAccess, key: str, param: torch.Tensor) -> torch.Tensor:
    value = access.read(param).cpu().clone()
    if tuple(value.shape) != full_shape(param) or value.numel() == 0:
        raise RuntimeError(
            f"WeightLoRA: gathering {key} gave a tensor of shape {tuple(value.shape)}, not the parameter's "
            f"{full_shape(param)}: the engine did not gather it (a ZeRO-3 partition read as it is?), and the saved "
            "adapter would be empty. Please report it with your launch command and DeepSpeed config."
        )
    return value
