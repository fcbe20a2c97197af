"""Mask mode as an engine: the switch that keeps the model's structure, and resuming into it.

The base of the engines that shard the model (FSDP2, DeepSpeed ZeRO), which must not lose or reshape a parameter:
dropped adapters are zeroed and switched off in place, kept ones re-initialised in place (`wlora_trl.masking`), and
the saved adapter is gathered from the kept adapters only (by the one builder every engine saves through). On its own it runs in
one unsharded process, where the tests compare it with the module swap (a trainer's `_force_mask_mode = True`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..artifacts.export import restore_warmup_weights
from ..state import RESUME_HINT, read_selection
from .base import Engine


class MaskModeEngine(Engine):
    name = "mask mode"
    mask_mode = True

    @classmethod
    def detect(cls, trainer: Any) -> bool:
        return bool(getattr(trainer, "_force_mask_mode", False))

    def load_checkpoint(self, trainer: Any, checkpoint: str, load_weights: Callable[[], None]) -> None:
        """The optimizer exists already (FSDP2 in the Trainer builds it before loading a checkpoint): a switch replayed
        here edits it. Without the engine's own files the adapter file is the rank-r export (WeightLoRA+ allocates
        2r), so during the warm-up only the unfolded weights beside it fit."""
        weight_lora = trainer.weight_lora
        weight_lora.restore(read_selection(checkpoint, hint=RESUME_HINT), trainer.optimizer)
        if not weight_lora.switched:
            restore_warmup_weights(checkpoint, weight_lora)
            return
        load_weights()
