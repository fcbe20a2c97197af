"""What a selectable unit is: the thing one omega gates and the switch keeps or drops. Two kinds.

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
`model.py` walks the units and never asks which kind it holds.

PEFT's layouts for E experts (0.21): `lora_A` is `Linear(in, r * E)`, its weight viewed as (E, r, in) (expert outer);
`lora_B` is `Linear(r * E, out)`, viewed as (out, r, E) (expert inner). Growing to 2r and exporting the first r keep
each expert's own rows and columns (`surgery.rank_view_a` / `rank_view_b`).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from .masking import PLAIN_ACCESS, ParameterAccess, mask_adapter, preallocate_double_rank, reinit_in_place
from .selection import gate_lora_a, ungate_lora_a
from .state import AdapterRecord
from .surgery import adapter_parameters, alpha_for_rank, drop_adapter, freeze_adapter_bias, rebuild_adapter


class Unit:
    """A selectable unit: the LoRA layers one omega gates (`layers`), under one module name (`name`, relative to the
    base model). Subclasses say how; the shared operations apply PEFT's own per layer."""

    kind = "unit"
    num_experts = 1

    def __init__(self, name: str, layers: list[LoraLayer], adapter_name: str) -> None:
        self.name = name
        # Each layer's rank and alpha in the warm-up (layers in `layers` order). A unit's layers may differ: PEFT's
        # `all-linear` gives an experts block's fused gate_up_proj rank 2r and alpha 2 alpha (gate and up, r each, as
        # in transformers 4), its down_proj r. The unit's rank is the smallest; the others keep their multiple of it
        # through the switch (WeightLoRA+ doubles every one).
        self.layer_ranks = [int(layer.r[adapter_name]) for layer in layers]
        self.layer_alphas = [layer.lora_alpha[adapter_name] for layer in layers]
        self.warmup_rank = min(self.layer_ranks)
        self.warmup_alpha = self.layer_alphas[self.layer_ranks.index(self.warmup_rank)]
        uneven = [r for r in self.layer_ranks if r % self.warmup_rank]
        if uneven:
            raise ValueError(
                f"WeightLoRA selects the adapters on {name} as one unit, and their ranks {self.layer_ranks} (from "
                "rank_pattern) are not multiples of the smallest: give them ranks that are (e.g. r and 2r)."
            )

    def ranks_at(self, rank: int) -> list[int]:
        """Each layer's rank when the unit's (smallest) rank is `rank`."""
        return [r * rank // self.warmup_rank for r in self.layer_ranks]

    def alphas_at(self, rank: int, use_rslora: bool) -> list[float]:
        """Each layer's lora_alpha at unit rank `rank`, keeping its scaling (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
        return [
            alpha_for_rank(alpha, r, new, use_rslora)
            for alpha, r, new in zip(self.layer_alphas, self.layer_ranks, self.ranks_at(rank))
        ]

    def layers(self, base: nn.Module) -> list[LoraLayer]:
        raise NotImplementedError

    @property
    def file_modules(self) -> list[str]:
        """The module names its tensors have in a PEFT adapter file (`base_model.model.<name>.lora_A.weight`)."""
        raise NotImplementedError

    def parameters(self, base: nn.Module, adapter_name: str) -> list[nn.Parameter]:
        return [p for layer in self.layers(base) for p in adapter_parameters(layer, adapter_name)]

    def device(self, base: nn.Module, adapter_name: str) -> torch.device:
        return self.layers(base)[0].lora_B[adapter_name].weight.device

    def allocated_ranks(self, base: nn.Module, adapter_name: str) -> list[int]:
        """Each layer's rank as allocated now (mask mode's WeightLoRA+ holds 2r from the start)."""
        return [int(layer.r[adapter_name]) for layer in self.layers(base)]

    # --- the warm-up gate -------------------------------------------------------------------------------------

    def gate(self, base: nn.Module, adapter_name: str, omega: nn.Parameter, detached: bool) -> None:
        raise NotImplementedError

    def ungate(self, base: nn.Module, adapter_name: str) -> None:
        raise NotImplementedError

    # --- the switch -------------------------------------------------------------------------------------------

    def drop(self, base: nn.Module, adapter_name: str) -> list[nn.Parameter]:
        """Remove the unit's adapter: its module computes its base alone, with no LoRA parameters or ops left."""
        raise NotImplementedError

    def freeze_bias(self, base: nn.Module, bias: str) -> list[nn.Parameter]:
        return []

    def mask(self, base: nn.Module, adapter_name: str, access: ParameterAccess = PLAIN_ACCESS) -> list[nn.Parameter]:
        """Mask mode's drop: zeroed, frozen and switched off in place (`masking.mask_adapter`), layer by layer."""
        return [p for layer in self.layers(base) for p in mask_adapter(layer, adapter_name, access)]

    def rebuild(self, base, adapter_name, config, *, rank: int, reinit: bool, omega: float) -> None:
        """The kept unit's post-switch form at unit rank `rank` (`surgery.rebuild_adapter`, layer by layer)."""
        layers = self.layers(base)
        for layer, layer_rank, alpha in zip(layers, self.ranks_at(rank), self.alphas_at(rank, config.use_rslora)):
            rebuild_adapter(
                layer,
                adapter_name,
                config,
                rank=layer_rank,
                alpha=alpha,
                reinit=reinit,
                omega=omega,
                num_experts=self.num_experts,
            )

    def reinit_in_place(self, base, adapter_name, *, reinit, omega, init_lora_weights, access) -> list[nn.Parameter]:
        """Mask mode's kept unit: re-initialised (or folded) in place (`masking.reinit_in_place`), layer by layer."""
        return [
            p
            for layer, warmup_rank in zip(self.layers(base), self.layer_ranks)
            for p in reinit_in_place(
                layer,
                adapter_name,
                warmup_rank=warmup_rank,
                reinit=reinit,
                omega=omega,
                init_lora_weights=init_lora_weights,
                access=access,
                num_experts=self.num_experts,
            )
        ]

    def preallocate_double_rank(self, base: nn.Module, adapter_name: str, config) -> None:
        for layer in self.layers(base):
            preallocate_double_rank(layer, adapter_name, config, num_experts=self.num_experts)

    # --- records and exports ----------------------------------------------------------------------------------

    def record(self, index: int, omega: float | None, kept: bool, rank: int) -> AdapterRecord:
        raise NotImplementedError

    def config_targets(self) -> dict[str, list[str]]:
        """Where the unit goes in a stock `LoraConfig`: {"target_modules": [...]} or {"target_parameters": [...]},
        with exact names (also the keys of `rank_pattern` / `alpha_pattern` for it), one per layer in `layers`
        order."""
        raise NotImplementedError

    def targets_at(self, rank: int, use_rslora: bool) -> dict[str, dict[str, tuple[int, float]]]:
        """{config field: {exact target name: (rank, lora_alpha)}} of the unit at unit rank `rank`."""
        ((field, names),) = self.config_targets().items()
        return {field: dict(zip(names, zip(self.ranks_at(rank), self.alphas_at(rank, use_rslora))))}


class LinearUnit(Unit):
    """One LoRA adapter on a linear module (`lora.Linear`; GPT-2's Conv1D too)."""

    kind = "linear"

    def __init__(self, name: str, layers: list[LoraLayer], adapter_name: str) -> None:
        super().__init__(name, layers, adapter_name)
        (layer,) = layers
        self.in_features, self.out_features = int(layer.in_features), int(layer.out_features)

    def layers(self, base: nn.Module) -> list[LoraLayer]:
        return [base.get_submodule(self.name)]

    @property
    def file_modules(self) -> list[str]:
        return [self.name]

    def gate(self, base, adapter_name, omega, detached) -> None:
        gate_lora_a(self.layers(base)[0].lora_A[adapter_name], omega, detached)

    def ungate(self, base, adapter_name) -> None:
        ungate_lora_a(self.layers(base)[0].lora_A[adapter_name])

    def drop(self, base, adapter_name) -> list[nn.Parameter]:
        return drop_adapter(base, self.name, adapter_name)

    def freeze_bias(self, base, bias) -> list[nn.Parameter]:
        # bias="lora_only": the layer's bias trained with its adapter; it is frozen with the adapter's removal.
        return freeze_adapter_bias(self.layers(base)[0], bias)

    def record(self, index, omega, kept, rank) -> AdapterRecord:
        return AdapterRecord(index, self.name, omega, kept, rank, self.in_features, self.out_features)

    def config_targets(self) -> dict[str, list[str]]:
        return {"target_modules": [self.name]}


class ParameterUnit(Unit):
    """The `ParamWrapper`s on one module's parameters, as one unit: an experts block (3-D parameters, E experts) or a
    router (`gate.weight`). `parameters` lists the wrapped parameter names innermost first, the nesting PEFT builds
    again on reload (it wraps a module's parameters in their registration order, whatever `target_parameters`
    says), so the adapter file's `<name>.base_layer.lora_A` and `<name>.lora_A` keys land where they were trained."""

    def __init__(self, name: str, layers: list[LoraLayer], adapter_name: str) -> None:
        super().__init__(name, layers, adapter_name)
        self.depth = len(layers)  # layers: outermost first, as they nest
        self.num_experts = int(layers[0].num_experts)
        self.kind = "experts" if self.num_experts > 1 else "parameter"
        # innermost first (the nesting order), of one expert: {parameter name: (in_features, out_features)}
        self.shapes = {w.parameter_name: (int(w.in_features), int(w.out_features)) for w in reversed(layers)}
        self._parameter_names = [w.parameter_name for w in layers]  # `layers` order: outermost first

    def layers(self, base: nn.Module) -> list[LoraLayer]:
        module, chain = base.get_submodule(self.name), []
        while isinstance(module, ParamWrapper) and len(chain) < self.depth:
            chain.append(module)
            module = module.base_layer
        return chain

    @property
    def file_modules(self) -> list[str]:
        return [self.name + ".base_layer" * depth for depth in range(self.depth)]  # outermost first, as `layers`

    def gate(self, base, adapter_name, omega, detached) -> None:
        for wrapper in self.layers(base):
            wrapper.__class__ = DetachedOmegaGatedParamWrapper if detached else OmegaGatedParamWrapper
            wrapper.__dict__["omega_gate"] = omega
            wrapper.__dict__["omega_gated_adapter"] = adapter_name

    def ungate(self, base, adapter_name) -> None:
        for wrapper in self.layers(base):
            wrapper.__class__ = ParamWrapper
            wrapper.__dict__.pop("omega_gate", None)
            wrapper.__dict__.pop("omega_gated_adapter", None)

    def drop(self, base, adapter_name) -> list[nn.Parameter]:
        chain = self.layers(base)
        removed = self.parameters(base, adapter_name)
        if any(name != adapter_name for wrapper in chain for name in wrapper.r):
            # Other, frozen adapters (TRL's reference copy) stay on the wrappers: only this adapter's entries go.
            for wrapper in chain:
                for attribute in (*wrapper.adapter_layer_names, *wrapper.other_param_names):
                    entries = getattr(wrapper, attribute)
                    if adapter_name in entries:
                        del entries[adapter_name]
            return removed
        parent_name, _, child_name = self.name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, child_name, chain[-1].base_layer)  # the plain experts (or router) module again
        return removed

    def record(self, index, omega, kept, rank) -> AdapterRecord:
        factors = self._rank_factors
        return AdapterRecord(
            index,
            self.name,
            omega,
            kept,
            rank,
            kind=self.kind,
            num_experts=self.num_experts,
            parameters={
                parameter: {"in_features": i, "out_features": o, "rank_factor": factors[parameter]}
                for parameter, (i, o) in self.shapes.items()
            },
        )

    @property
    def _rank_factors(self) -> dict[str, int]:
        return {p: r // self.warmup_rank for p, r in zip(self._parameter_names, self.layer_ranks)}

    def config_targets(self) -> dict[str, list[str]]:
        return {"target_parameters": [f"{self.name}.{parameter}" for parameter in self._parameter_names]}


class _GatedFactor:
    """Stands in for `lora_B[adapter]` while PEFT's `ParamWrapper` reads its `.weight`: the weight times omega."""

    __slots__ = ("weight",)

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


class OmegaGatedParamWrapper(ParamWrapper):
    """A `ParamWrapper` during the warm-up: its delta is `scaling * (omega B) A`, per expert. PEFT's own
    `get_delta_factors` / `get_delta_weight` run unchanged; for the time they read `lora_B`, an instance attribute
    shadows the ModuleDict with one whose trained adapter's weight is `omega * B` (computed in fp32 for an fp32 B,
    as the linear gate does). Only ever made by a class swap (`ParameterUnit.gate`); omega sits in `__dict__`, so the
    state dict never holds it."""

    @contextmanager
    def _omega_in_b(self, adapter_name: str):
        if adapter_name != self.__dict__.get("omega_gated_adapter"):
            yield  # another, frozen adapter of the layer: not gated
            return
        modules = self._modules["lora_B"]
        weight, omega = modules[adapter_name].weight, self._omega(modules[adapter_name].weight)
        gated = weight * omega if weight.dtype == torch.float32 else (weight.float() * omega).to(weight.dtype)
        self.__dict__["lora_B"] = {**dict(modules.items()), adapter_name: _GatedFactor(gated)}
        try:
            yield
        finally:
            del self.__dict__["lora_B"]

    def _omega(self, weight: torch.Tensor) -> torch.Tensor:
        return self.__dict__["omega_gate"]

    def get_delta_factors(self, adapter_name):
        with self._omega_in_b(adapter_name):
            return super().get_delta_factors(adapter_name)

    def get_delta_weight(self, adapter_name, *args, **kwargs):
        with self._omega_in_b(adapter_name):
            return super().get_delta_weight(adapter_name, *args, **kwargs)


class DetachedOmegaGatedParamWrapper(OmegaGatedParamWrapper):
    """Mask mode's gate (omega not a model parameter): omega follows its adapter wherever sharding or `.to()` put it."""

    def _omega(self, weight: torch.Tensor) -> torch.Tensor:
        omega = self.__dict__["omega_gate"]
        if omega.device != weight.device:
            omega.data = omega.data.to(weight.device)  # same Parameter object: the gates keep it
        return omega


# --- finding the units -----------------------------------------------------------------------------------------


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
        if isinstance(module, ParamWrapper):
            if name.endswith(".base_layer") and isinstance(
                base.get_submodule(name[: -len(".base_layer")]), ParamWrapper
            ):
                continue  # an inner wrapper: part of its outermost wrapper's unit
            chain, inner = [], module
            while isinstance(inner, ParamWrapper):
                chain.append(inner)
                inner = inner.base_layer
            chain = [wrapper for wrapper in chain if adapter_name in wrapper.lora_A]
            if chain:
                units.append(ParameterUnit(name, chain, adapter_name))
        elif adapter_name in getattr(module, "lora_embedding_A", {}):
            embeddings.append(name)
        elif adapter_name in module.lora_A:
            if type(module.lora_A[adapter_name]) is nn.Linear:
                units.append(LinearUnit(name, [module], adapter_name))
            else:
                others.append((name, module))
    suffixes = sorted({unit.name.rsplit(".", 1)[-1] for unit in units if isinstance(unit, LinearUnit)})
    instead = f" Use target_modules={suffixes} (the linear layers adapted now)." if suffixes else ""
    if embeddings:
        raise ValueError(
            f"WeightLoRA cannot select LoRA adapters on embedding layers ({_few(embeddings)}): remove them from "
            "target_modules, and drop ensure_weight_tying=True, which adds the input embedding when a tied lm_head is "
            f"targeted.{instead} To train an embedding fully, list it in modules_to_save."
        )
    if others:
        kinds = sorted({type(module).__name__ for _, module in others})
        raise ValueError(
            f"WeightLoRA selects LoRA adapters on linear layers and on parameters (experts) only; "
            f"{_few([n for n, _ in others])} are {kinds}.{instead}"
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
        f"WeightLoRA: {len(unadapted)} 3-D (expert) parameters have no adapter ({_few(unadapted)}), so the experts "
        f"stay frozen and outside the selection: target_modules does not reach parameters for this model. To adapt "
        f"and select them, add target_parameters={suffixes} to the WeightLoraConfig (with lora_dropout=0).",
        UserWarning,
        stacklevel=3,
    )


def _few(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
