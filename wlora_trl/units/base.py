"""The selectable unit's interface, and what every kind shares: ranks and alphas per layer, the mask-mode and
module-swap operations applied layer by layer (PEFT's own per layer). A kind subclasses `Unit` in a module of its
own and is registered in `wlora_trl.units.UNIT_KINDS`."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..engines.access import PLAIN_ACCESS, ParameterAccess
from ..masking import mask_adapter, preallocate_double_rank, reinit_in_place
from ..state import AdapterRecord
from ..surgery import adapter_parameters, alpha_for_rank, rebuild_adapter


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
        uneven = [r for r in self.layer_ranks if r % self.warmup_rank]
        if uneven:
            raise ValueError(
                f"WeightLoRA selects the adapters on {name} as one unit, and their ranks {self.layer_ranks} (from "
                "rank_pattern) are not multiples of the smallest: give them ranks that are (e.g. r and 2r)."
            )

    @classmethod
    def claim(cls, base: nn.Module, name: str, module: LoraLayer, adapter_name: str) -> list[Unit] | None:
        """The kind's answer for one of PEFT's LoRA layers (`module`, named `name` under `base`): None when it is not
        of this kind; else the units it makes ([] for a layer that is part of another layer's unit)."""
        raise NotImplementedError

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
