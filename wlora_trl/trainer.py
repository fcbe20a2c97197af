"""WeightLoRA as drop-in trainers: `WeightLoraSFTTrainer` (TRL) and `WeightLoraTrainer` (transformers).

Migrating a TRL script is two renames: `SFTTrainer` -> `WeightLoraSFTTrainer`, `LoraConfig` ->
`WeightLoraConfig`. What the trainers add to a normal run:

- Steps 1..T: every adapter trains, gated by omega; after each optimizer step omega takes a StoIHT step
  (SGD with `omega_lr`, then hard thresholding to K entries). omega's gradient is taken out before gradient
  clipping and the optimizer see it, and is unscaled for fp16; a step the GradScaler skips skips omega too.
- Start of step T+1: the switch. Dropped adapters become base layers, kept ones are re-initialised (rank 2r with
  WeightLoRA+), omega disappears, and the optimizer is edited in place, so the LR schedule carries on unchanged.
  The kept count is logged (`weight_lora/kept_adapters`) with the next regular log line.
- `save_model` writes a stock PEFT LoRA adapter plus `selection.json`; checkpoints carry `selection.json` too, so
  resuming before, at or after T continues the same run.

- DDP (`accelerate launch`, torchrun): omega's gradient is all-reduced with the others, so every rank takes the
  same StoIHT steps; after the switch the model is re-wrapped in a new DDP, so the re-created adapters are
  synchronised too.

Limits: FSDP and DeepSpeed are refused, one adapter, plain LoRA on linear layers (no DoRA or
other variants), `load_best_model_at_end` refused (checkpoints on either side of the switch differ in structure).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer
from trl import SFTTrainer

from .config import WeightLoraConfig
from .model import WeightLoraModel
from .report import read_selection, write_selection
from .surgery import innermost_optimizer


def _check_peft_config(peft_config: PeftConfig | None, model: Any) -> None:
    """Refuse configs WeightLoRA cannot use, before the parent trainer spends time building anything."""
    if peft_config is None:
        if isinstance(model, PeftModel):
            return  # WeightLoraModel checks the adapter's config
        raise ValueError(
            "WeightLoRA needs LoRA adapters: pass peft_config=WeightLoraConfig(...), or a model already wrapped "
            "with get_peft_model(model, WeightLoraConfig(...))."
        )
    if not isinstance(peft_config, WeightLoraConfig):
        raise TypeError(
            f"peft_config is a {type(peft_config).__name__}; WeightLoRA needs wlora_trl.WeightLoraConfig, a drop-in "
            "for peft.LoraConfig that takes the same arguments plus k, selection_steps, omega_lr, plus, reinit."
        )


SHARDING_UNSUPPORTED = (
    "WeightLoRA does not support DeepSpeed or FSDP yet: they shard the parameters that the switch at step T "
    "rebuilds. Supported: one process, or data-parallel (DDP) through `accelerate launch` / torchrun. Remove the "
    "deepspeed/fsdp settings."
)


def _check_training_args(args: Any) -> None:
    """Refuse setups WeightLoRA does not support, before the parent trainer builds anything."""
    if args is None:
        return
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        raise ValueError(SHARDING_UNSUPPORTED)
    if args.load_best_model_at_end:
        raise ValueError(
            "load_best_model_at_end=True is not supported: checkpoints before and after the switch at step T hold "
            "different adapter structures. Set it to False and pick a checkpoint by its metrics."
        )


class WeightLoraMixin:
    """Adds WeightLoRA to a `transformers.Trainer` subclass. Call `_setup_weight_lora()` at the end of `__init__`."""

    weight_lora: WeightLoraModel

    def _setup_weight_lora(self) -> None:
        args = self.args
        _check_training_args(args)  # again: SFTTrainer may have built its own args
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # enabled by an accelerate config, not the args
            raise ValueError(SHARDING_UNSUPPORTED)
        if args.n_gpu > 1:
            # Several GPUs in one process: the Trainer would wrap the model in nn.DataParallel, whose replicas
            # share omega's gates across devices (and TRL refuses it too).
            raise ValueError(
                f"This process sees {args.n_gpu} GPUs and was not started by a distributed launcher, so the Trainer "
                "would use torch.nn.DataParallel, which WeightLoRA does not support. Launch with `accelerate launch "
                "--num_processes N` or `torchrun --nproc_per_node N` (one process per GPU), or expose one GPU with "
                "CUDA_VISIBLE_DEVICES."
            )
        self.weight_lora = WeightLoraModel(self.model)
        if args.max_steps > 0:
            self.weight_lora.set_max_steps(args.max_steps)  # refuse an impossible T now, not at train()
        self._omega_grad: torch.Tensor | None = None
        self._omega_hook = None
        self._weight_lora_logs: dict[str, float] = {}

    # --- optimizer: omega stays out of it; its step runs as the optimizer's step pre-hook ---------------------

    def create_optimizer(self, model=None):
        weight_lora = self.weight_lora
        omega = weight_lora.omega if not weight_lora.switched else None
        if omega is not None:
            # The stock grouping takes every parameter that requires grad; omega must not be Adam-updated.
            omega.requires_grad_(False)
        try:
            optimizer = super().create_optimizer(model)
        finally:
            if omega is not None:
                omega.requires_grad_(True)
        if self.state.max_steps > 0 and weight_lora.selection_steps is None:
            weight_lora.set_max_steps(self.state.max_steps)
        if omega is not None:
            inner = innermost_optimizer(optimizer)
            if any(p is omega for group in inner.param_groups for p in group["params"]):
                raise ValueError(
                    "The optimizer holds omega, which WeightLoRA updates itself by SGD. Build your optimizer from "
                    "trainer.weight_lora.trainable_parameters()."
                )
            if self._omega_hook is not None:
                self._omega_hook.remove()
            # A step pre-hook runs once per optimizer step, after gradients are unscaled and clipped.
            self._omega_hook = inner.register_step_pre_hook(self._omega_step_hook)
        return optimizer

    def _omega_step_hook(self, optimizer, args, kwargs) -> None:
        grad, self._omega_grad = self._omega_grad, None
        # On an fp16 overflow the GradScaler skips `optimizer.step()`, and this hook with it, except for optimizers
        # that handle scaling themselves (fused AdamW, the Trainer's default on CUDA): those are stepped anyway with
        # `found_inf` set on them and skip the update inside their kernel. omega must skip too; the flag is read on
        # the device, so this step does not wait for the GPU.
        self.weight_lora.omega_step(grad, skip=getattr(optimizer, "found_inf", None))

    # --- the training step: the switch at the start of step T+1, omega's gradient after the last micro-batch ---

    def training_step(self, model, inputs, num_items_in_batch=None):
        weight_lora = self.weight_lora
        if weight_lora.selection_steps is None:
            weight_lora.set_max_steps(self.state.max_steps)
        if self._omega_grad is not None:
            # omega's gradient from the last step was never applied: the GradScaler skipped that optimizer step
            # (and the pre-hook with it) on an fp16 overflow.
            self._omega_grad = None
            weight_lora.skip_omega_step()
        if not weight_lora.switched and self.state.global_step >= weight_lora.selection_steps:
            self._switch()
        if model is not self.model_wrapped:
            # After a DDP re-wrap the loop still hands us the old wrapper (a local variable of the epoch loop),
            # and its `no_sync` context, which no longer applies: forward through the new one, with its own.
            model = self.model_wrapped
            if not self.accelerator.sync_gradients and not self._sync_each_batch():
                with self.accelerator.no_sync(model):
                    return super().training_step(model, inputs, num_items_in_batch)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not weight_lora.switched and self.accelerator.sync_gradients:
            # Take omega's gradient before clipping sees it (its step size is omega_lr, not a clipped share of
            # the global norm); the optimizer pre-hook applies it.
            self._omega_grad = self._unscale(weight_lora.take_omega_grad())
        return loss

    def _sync_each_batch(self) -> bool:
        return bool(self.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False))

    def _unscale(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        scaler = getattr(self.accelerator, "scaler", None)
        if grad is None or scaler is None or not scaler.is_enabled():
            return grad
        # The scale as a device tensor where torch exposes it: `get_scale()` returns a float, a GPU sync per step.
        scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
        return grad.float() / (scale if scale is not None else scaler.get_scale())

    def _switch(self) -> None:
        if self._omega_hook is not None:
            self._omega_hook.remove()
            self._omega_hook = None
        self._omega_grad = None
        self.weight_lora.switch(self.optimizer, seed=self.args.seed)
        if isinstance(self.model_wrapped, DistributedDataParallel):
            self.model_wrapped = self._rewrap_ddp()
        self._weight_lora_logs = {
            "weight_lora/kept_adapters": self.weight_lora.k,
            "weight_lora/total_adapters": self.weight_lora.num_adapters,
            **{f"weight_lora/omega_steps_{outcome}": count for outcome, count in self.weight_lora.omega_steps.items()},
        }

    def _rewrap_ddp(self) -> DistributedDataParallel:
        """Wrap the rebuilt model in a new DDP: the old one would never all-reduce the re-created adapters.

        DDP's constructor broadcasts rank 0's parameters, so every rank starts the LoRA phase from the same
        weights. All remaining trainable parameters are used in every forward now (omega and the dropped
        adapters are gone), so the new wrapper skips the `find_unused_parameters` search unless the user asked
        for it.
        """
        accelerator, old = self.accelerator, self.model_wrapped
        accelerator._models = [m for m in accelerator._models if m is not old]
        handler = accelerator.ddp_handler
        previous = handler.find_unused_parameters if handler is not None else None
        if handler is not None:
            handler.find_unused_parameters = bool(self.args.ddp_find_unused_parameters)
        try:
            return accelerator.prepare_model(self.model)
        finally:
            if handler is not None:
                handler.find_unused_parameters = previous

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # The switch's numbers ride on the next regular log line, so every logging integration records them
        # without an extra log call in the middle of a step.
        if self._weight_lora_logs:
            logs = {**logs, **self._weight_lora_logs}
            self._weight_lora_logs = {}
        super().log(logs, *args, **kwargs)

    # --- saving and resuming ------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            write_selection(output_dir or self.args.output_dir, self.weight_lora.report(self.state.global_step))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Rebuild the checkpoint's structure (and omega) first: the Trainer loads adapter weights into the current
        # structure, which after the switch has other modules and ranks than a fresh model.
        self.weight_lora.restore(read_selection(resume_from_checkpoint))
        super()._load_from_checkpoint(resume_from_checkpoint, model)


class WeightLoraTrainer(WeightLoraMixin, Trainer):
    """`transformers.Trainer` with WeightLoRA, for any task (e.g. sequence classification with an encoder).

    Pass a model wrapped with `get_peft_model(model, WeightLoraConfig(...))`, or a plain model and
    `peft_config=WeightLoraConfig(...)`. Modules in `modules_to_save` (a classifier head) train normally and are
    not subject to selection.
    """

    def __init__(self, model=None, args=None, *trainer_args, peft_config: WeightLoraConfig | None = None, **kwargs):
        _check_peft_config(peft_config, model)
        _check_training_args(args)
        if peft_config is not None:
            if isinstance(model, PeftModel):
                raise ValueError("Pass either a PeftModel or peft_config, not both.")
            model = get_peft_model(model, peft_config)
        super().__init__(model, args, *trainer_args, **kwargs)
        self._setup_weight_lora()


class WeightLoraSFTTrainer(WeightLoraMixin, SFTTrainer):
    """`trl.SFTTrainer` with WeightLoRA: pass `peft_config=WeightLoraConfig(...)` where you passed a LoraConfig."""

    def __init__(self, model, args=None, *trainer_args, peft_config: WeightLoraConfig | None = None, **kwargs):
        _check_peft_config(peft_config, model)
        _check_training_args(args)
        super().__init__(model, args, *trainer_args, peft_config=peft_config, **kwargs)
        self._setup_weight_lora()
