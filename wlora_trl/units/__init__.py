"""What a selectable unit is: the thing one omega gates and the switch keeps or drops. A registry of kinds, two now.

- `LinearUnit`: one LoRA adapter on a linear (or GPT-2 Conv1D) module, PEFT's `lora.Linear`: `q_proj` of layer 3.
  Gated on its `lora_A` (`selection.OmegaGatedLinear`).
- `ParameterUnit`: the LoRA adapters PEFT puts on the parameters of one module (`target_parameters`, PEFT's
  `ParamWrapper`; nested, one wrapper per parameter, when a module has several). Two cases in practice:
  - an experts block, `model.layers.0.mlp.experts`: `gate_up_proj` and `down_proj` of all E experts, 3-D parameters.
    Both parameters are one unit, so what the switch keeps is servable: vLLM's MoE LoRA wants both of a block.
  - a router, `model.layers.0.mlp.gate` (`gate.weight`, 2-D): PEFT's `all-linear` adapts it for Mixtral, Qwen3-MoE
    and OLMoE. It is a unit of its own: it was targeted (by the user, or by PEFT for them), it is cheap (r * (hidden +
    E)), and whether it is worth keeping is what the selection decides; left in the experts block it would ride on
    the experts' omega, and stripped it would silently change what the user asked PEFT for.
  A `ParamWrapper` never calls `lora_A.forward`: it reads `lora_A.weight` / `lora_B.weight` through
  `get_delta_factors` / `get_delta_weight` and folds `W + scaling * B A` into the parameter while the module runs. So
  the gate is a class swap of the wrapper (`OmegaGatedParamWrapper`, same object, same parameters and state-dict
  keys) whose two methods see `omega * B`: exactly the ungated wrapper with B scaled by omega, value and gradient,
  and omega's gradient `<B, dL/d(omega B)>` is reduced in fp32 like the linear gate's.

Each kind says how it is gated, dropped (module swap; mask mode: zeroed, frozen, switched off), re-initialised or
folded (`reinit=False`), grown to 2r (WeightLoRA+), counted, exported (its keys in the adapter file, its place in a
stock `LoraConfig`: `target_modules` or `target_parameters` with exact names) and recorded (`state.AdapterRecord`).
`model.py` walks the units and never asks which kind it holds (`Unit.record` writes each kind's fields).

PEFT's layouts for E experts (0.21): `lora_A` is `Linear(in, r * E)`, its weight viewed as (E, r, in) (expert outer);
`lora_B` is `Linear(r * E, out)`, viewed as (out, r, E) (expert inner). Growing to 2r and exporting the first r keep
each expert's own rows and columns (`surgery.rank_view_a` / `rank_view_b`).

A kind is a module here with a `Unit` subclass whose `claim` says which of PEFT's LoRA layers it takes, and a line in
`UNIT_KINDS` (tried in order; the first claim wins):

  base.py        Unit: the interface, and what every kind shares
  linear.py      LinearUnit
  parameters.py  ParameterUnit, and the gate on PEFT's ParamWrapper
"""

from __future__ import annotations

import warnings

from peft.tuners.lora import LoraLayer
from torch import nn

from .base import Unit
from .linear import LinearUnit
from .parameters import DetachedOmegaGatedParamWrapper, OmegaGatedParamWrapper, ParameterUnit

UNIT_KINDS: tuple[type[Unit], ...] = (ParameterUnit, LinearUnit)


def selectable_units(base: nn.Module, adapter_name: str) -> list[Unit]:
    """The units WeightLoRA selects among, in module order: LoRA on linear (and GPT-2 Conv1D) modules, and LoRA on
    parameters (`target_parameters`: experts blocks and routers of mixture-of-experts models, one unit per module).

    Refuses, before any training, adapters it cannot gate, drop and export correctly, naming the target_modules to
    use instead: LoRA on embeddings (also added by `ensure_weight_tying=True` for a tied lm_head), which the
    selection would skip while they keep training and the export leaves out, and LoRA on other layer types
    (convolutions). Warns when the model holds 3-D (expert) parameters no adapter reaches (`warn_unadapted_experts`).
    """
    units: list[Unit] = []
    embeddings, others = [], []
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        claimed = next(
            (found for kind in UNIT_KINDS if (found := kind.claim(base, name, module, adapter_name)) is not None), None
        )
        if claimed is not None:
            units.extend(claimed)
        elif adapter_name in getattr(module, "lora_embedding_A", {}):
            embeddings.append(name)
        elif adapter_name in module.lora_A:
            others.append((name, module))
    suffixes = sorted({unit.name.rsplit(".", 1)[-1] for unit in units if isinstance(unit, LinearUnit)})
    instead = f" Use target_modules={suffixes} (the linear layers adapted now)." if suffixes else ""
    if embeddings:
        raise ValueError(
            f"WeightLoRA cannot select LoRA adapters on embedding layers ({few(embeddings)}): remove them from "
            "target_modules, and drop ensure_weight_tying=True, which adds the input embedding when a tied lm_head is "
            f"targeted.{instead} To train an embedding fully, list it in modules_to_save."
        )
    if others:
        kinds = sorted({type(module).__name__ for _, module in others})
        raise ValueError(
            f"WeightLoRA selects LoRA adapters on linear layers and on parameters (experts) only; "
            f"{few([n for n, _ in others])} are {kinds}.{instead}"
        )
    warn_unadapted_experts(base, units)
    return units


def warn_unadapted_experts(base: nn.Module, units: list[Unit]) -> None:
    """Say once when the model holds 3-D parameters (mixture-of-experts weights: every expert's projection stacked)
    that no adapter reaches, showing the `target_parameters` that would adapt them. PEFT's `all-linear` reaches the
    experts of the families it maps (Mixtral, Qwen3-MoE, OLMoE in 0.21) but not, e.g., Qwen2-MoE's or gpt-oss's."""
    adapted = {name for unit in units for name in unit.config_targets().get("target_parameters", [])}
    unadapted = []
    for key, param in base.named_parameters():
        if param.ndim != 3 or "lora_" in key:
            continue
        name = key
        while ".base_layer." in name:  # a wrapped module's parameter: `experts.base_layer.down_proj`
            name = name.replace(".base_layer.", ".", 1)
        if name not in adapted:
            unadapted.append(name)
    if not unadapted:
        return
    suffixes = sorted({".".join(name.split(".")[-2:]) for name in unadapted})
    warnings.warn(
        f"WeightLoRA: {len(unadapted)} 3-D (expert) parameters have no adapter ({few(unadapted)}), so the experts "
        f"stay frozen and outside the selection: target_modules does not reach parameters for this model. To adapt "
        f"and select them, add target_parameters={suffixes} to the WeightLoraConfig (with lora_dropout=0).",
        UserWarning,
        stacklevel=3,
    )


def few(names: list[str], shown: int = 3) -> str:
    """The first few of `names` for a message: 'a, b, c and 4 more'."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


__all__ = [
    "UNIT_KINDS",
    "DetachedOmegaGatedParamWrapper",
    "LinearUnit",
    "OmegaGatedParamWrapper",
    "ParameterUnit",
    "Unit",
    "few",
    "selectable_units",
    "warn_unadapted_experts",
]
