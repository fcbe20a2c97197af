"""Mask mode as an engine: the switch that keeps the model's structure, and the save that gathers the adapters.

The base of the engines that shard the model (FSDP2, DeepSpeed ZeRO), which must not lose or reshape a parameter:
dropped adapters are zeroed and switched off in place, kept ones re-initialised in place (`wlora_trl.masking`), and
the saved adapter is gathered from the kept adapters only (`WeightLoraModel.save_adapter`). On its own it runs in
one unsharded process, where the tests compare it with the module swap (a trainer's `_force_mask_mode = True`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from safetensors.torch import save_file

from ..export import WARMUP_STATE_FILE, restore_warmup_weights
from ..state import RESUME_HINT, read_selection
from .base import Engine


class MaskModeEngine(Engine):
    name = "mask mode"
    mask_mode = True
    # Whether the engine's own checkpoint files hold the unfolded warm-up weights (FSDP2's and DeepSpeed's do).
    writes_engine_checkpoint = False

    @classmethod
    def detect(cls, trainer: Any) -> bool:
        return bool(getattr(trainer, "_force_mask_mode", False))

    def save_model(self, trainer: Any, directory: str, padded: bool, stock_save: Callable[[], None]) -> None:
        """Every rank gathers the kept adapters only (never the base model: the Trainer's full state dict would gather
        all of it, and PEFT would save the switched-off adapters too); the main process writes the stock adapter
        (omega folded in during the warm-up). Without the engine's own checkpoint files the unfolded warm-up weights
        are written beside it, for resuming."""
        weight_lora, should_save = trainer.weight_lora, trainer.args.should_save
        tags = getattr(trainer, "_tag_names", ())
        weight_lora.save_adapter(
            directory, should_save, step=trainer.state.global_step, trainer_tags=tags, padded=padded
        )
        # A collective under a sharding engine: every rank gathers, before only the main process writes.
        raw = None if weight_lora.switched or self.writes_engine_checkpoint else weight_lora.warmup_state_dict()
        if should_save:
            trainer._save_tokenizer_and_args(directory)
            if raw is not None:
                save_file(raw, os.path.join(directory, WARMUP_STATE_FILE))

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
