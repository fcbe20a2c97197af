"""Mask mode as an engine: the switch that keeps the model's structure.

The base of the engines that shard the model (FSDP2, DeepSpeed ZeRO), which must not lose or reshape a parameter:
dropped adapters are zeroed and switched off in place, kept ones re-initialised in place (`wlora_trl.masking`), and
the saved adapter is gathered from the kept adapters only (by the one builder every engine saves through). On its own it runs in
one unsharded process, where the tests compare it with the module swap (a trainer's `_force_mask_mode = True`).
"""

from __future__ import annotations

from typing import Any

from .base import Engine


class MaskModeEngine(Engine):
    name = "mask mode"
    mask_mode = True

    @classmethod
    def detect(cls, trainer: Any) -> bool:
        return bool(getattr(trainer, "_force_mask_mode", False))
