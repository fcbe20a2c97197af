"""The FSDP2 engine (accelerate's `fsdp_version: 2`): mask mode over sharded parameters.

`fully_shard` turns every parameter of a decoder layer into a DTensor shard, so the switch runs in mask mode
(`wlora_trl.engines.masked`), writing shards through the plain `ParameterAccess` (a DTensor takes its own slice of a
full tensor); omega lives outside the sharded model and its gradient is averaged over the ranks by the method
itself. FSDP version 1 is refused: it has no mask mode here.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from .masked import MaskModeEngine

logger = logging.getLogger(__name__)

SHARDING_UNSUPPORTED = (
    "WeightLoRA does not support FSDP version 1: it shards the parameters that the switch at step T rebuilds, and "
    "has no mask mode. Supported: one process, data-parallel (DDP) through `accelerate launch` / torchrun, FSDP2 "
    "(`fsdp_version: 2`, the packaged `wlora-trl config-path fsdp2`) and DeepSpeed ZeRO-2 / ZeRO-3 (`deepspeed=` in "
    "the training arguments, or `wlora-trl config-path zero2` / `zero3`). Another route for a model past one GPU's "
    "memory is two-stage: select on one GPU (a 4-bit base works) with `wlora-trl select` or "
    "`trainer.select_adapters()`, then train `lora_config_from_selection(dir)` with stock TRL under any engine "
    "(docs/source/distributed.md: 'Past one GPU'). Otherwise set fsdp_version: 2 or remove the fsdp settings."
)


def fsdp_version(args: Any) -> int | None:
    """The FSDP version the arguments ask for (transformers defaults to 2), or None without FSDP."""
    if not getattr(args, "fsdp", None):
        return None
    return int((getattr(args, "fsdp_config", None) or {}).get("version", 2))


def is_fsdp2(trainer: Any) -> bool:
    """Whether accelerate shards this trainer's model with FSDP2, for any `transformers.Trainer` (the recipes ask it
    of their stock LoRA baselines too)."""
    return trainer.accelerator.is_fsdp2


def keep_loss_in_full_precision(trainer: Any) -> None:
    """Under FSDP2, keep the model's outputs (the loss) in fp32 for any `transformers.Trainer`: WeightLoRA's trainers
    do it in `Fsdp2Engine.setup`; the recipes ask it of their stock baselines too, so every method's loss is measured
    alike. Call it before `train()` (accelerate reads the policy when it shards the model)."""
    if is_fsdp2(trainer):
        keep_fsdp2_outputs_in_full_precision(trainer.accelerator.state.fsdp_plugin)


class Fsdp2Engine(MaskModeEngine):
    name = "FSDP2"
    shards_parameters = True
    checkpoint_holds_warmup_weights = True

    @classmethod
    def check_arguments(cls, args: Any) -> None:
        if fsdp_version(args) not in (None, 2):
            raise ValueError(SHARDING_UNSUPPORTED)

    @classmethod
    def check_setup(cls, trainer: Any) -> None:
        if trainer.is_fsdp_enabled and not trainer.accelerator.is_fsdp2:  # an accelerate config, not the args
            raise ValueError(SHARDING_UNSUPPORTED)

    @classmethod
    def detect(cls, trainer: Any) -> bool:
        return is_fsdp2(trainer)

    def setup(self, trainer: Any) -> None:
        logger.info(
            "WeightLoRA under FSDP2: the switch runs in mask mode (dropped adapters are zeroed, frozen and switched "
            "off in place; they keep their share of the sharded LoRA weights), and save_model gathers the kept "
            "adapters only."
        )
        keep_loss_in_full_precision(trainer)


def keep_fsdp2_outputs_in_full_precision(fsdp_plugin) -> None:
    """accelerate's FSDP2 mixed precision (`mixed_precision: bf16`) also casts the model's outputs to bf16, the loss
    included: every logged training and evaluation loss is then rounded to bf16 (steps of 0.008 near 2.0, 0.03 near
    4.6: seen on 2 processes). Keep the outputs as the model computes them (Transformers computes the loss in fp32
    from the bf16 logits); the parameters and the gradient reduction keep accelerate's dtypes. Done before
    `accelerator.prepare` shards the model, which is where the policy is read."""
    policy = getattr(fsdp_plugin, "mixed_precision_policy", None)
    output_dtype = getattr(policy, "output_dtype", None)
    if output_dtype is None or output_dtype == torch.float32:
        return
    fsdp_plugin.mixed_precision_policy = dataclasses.replace(policy, output_dtype=None)
    logger.info(f"FSDP2 mixed precision: the model's outputs (the loss) stay in fp32 instead of {output_dtype}.")
