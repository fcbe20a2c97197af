"""The parameter kind: the LoRA adapters PEFT puts on one module's parameters (`target_parameters`, PEFT's
`ParamWrapper`): an experts block or a router, gated by a class swap of the wrapper (see `wlora_trl.units`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from ..state import AdapterRecord
from .base import Unit


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

    @classmethod
    def claim(cls, base: nn.Module, name: str, module: LoraLayer, adapter_name: str) -> list[Unit] | None:
        if not isinstance(module, ParamWrapper):
            return None
        if name.endswith(".base_layer") and isinstance(base.get_submodule(name[: -len(".base_layer")]), ParamWrapper):
            return []  # an inner wrapper: part of its outermost wrapper's unit
        chain, inner = [], module
        while isinstance(inner, ParamWrapper):
            chain.append(inner)
            inner = inner.base_layer
        chain = [wrapper for wrapper in chain if adapter_name in wrapper.lora_A]
        return [cls(name, chain, adapter_name)] if chain else []

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
