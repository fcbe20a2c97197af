"""The linear kind: one LoRA adapter on a linear (or GPT-2 Conv1D) module, PEFT's `lora.Linear`, gated on its
`lora_A` (`selection.OmegaGatedLinear`)."""

from __future__ import annotations

from peft.tuners.lora import LoraLayer
from torch import nn

from ..selection import gate_lora_a, ungate_lora_a
from ..state import AdapterRecord
from ..surgery import drop_adapter, freeze_adapter_bias
from .base import Unit


class LinearUnit(Unit):
    """One LoRA adapter on a linear module (`lora.Linear`; GPT-2's Conv1D too)."""

    kind = "linear"

    def __init__(self, name: str, layers: list[LoraLayer], adapter_name: str) -> None:
        super().__init__(name, layers, adapter_name)
        (layer,) = layers
        self.in_features, self.out_features = int(layer.in_features), int(layer.out_features)

    @classmethod
    def claim(cls, base: nn.Module, name: str, module: LoraLayer, adapter_name: str) -> list[Unit] | None:
        lora_a = getattr(module, "lora_A", {})
        if adapter_name not in lora_a or type(lora_a[adapter_name]) is not nn.Linear:
            return None  # an embedding's or a convolution's LoRA: refused by `selectable_units`
        return [cls(name, [module], adapter_name)]

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
