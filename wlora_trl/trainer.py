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

import contextlib
import copy
import os
from typing import Any

import torch
from accelerate.utils import DistributedDataParallelKwargs
from peft import PeftConfig, PeftModel, get_peft_model
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer
from trl import SFTTrainer

from .config import WeightLoraConfig
from .export import export_warmup_adapter, restore_warmup_weights
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
        self._wrapper_checked = False
        self._weight_lora_logs: dict[str, float] = {}

    # --- optimizer: omega stays out of it; its step runs as the optimizer's step pre-hook ---------------------

    def create_optimizer(self, model=None):
        weight_lora = self.weight_lora
        omega = weight_lora.omega_parameters() if not weight_lora.switched else []
        # The stock grouping takes every parameter that requires grad; omega must not be Adam-updated.
        for parameter in omega:
            parameter.requires_grad_(False)
        try:
            optimizer = super().create_optimizer(model)
        finally:
            for parameter in omega:
                parameter.requires_grad_(True)
        if self.state.max_steps > 0 and weight_lora.selection_steps is None:
            weight_lora.set_max_steps(self.state.max_steps)
        if omega:
            inner = innermost_optimizer(optimizer)
            omega_ids = {id(p) for p in omega}
            if any(id(p) in omega_ids for group in inner.param_groups for p in group["params"]):
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
        if not self._wrapper_checked and not weight_lora.switched:
            # Against the run's real length, known only now for epoch-based runs: refuse a T the run never reaches.
            weight_lora.set_max_steps(self.state.max_steps)
        if self._omega_grad is not None:
            # omega's gradient from the last step was never applied: the GradScaler skipped that optimizer step
            # (and the pre-hook with it) on an fp16 overflow.
            self._omega_grad = None
            weight_lora.skip_omega_step()
        if not self._wrapper_checked:
            self._check_data_parallel_wrapper()
            self._wrapper_checked = True
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
        ddp = _ddp_inside(self.model_wrapped)
        if self.accelerator.num_processes > 1:
            check_ranks_agree(self.weight_lora)
        self.weight_lora.switch(self.optimizer, seed=self.args.seed, announce=False)
        if ddp is not None:
            self.model_wrapped = self._rewrap_ddp(ddp)
        # At the default log level, on the main process only: the one event of the run a user must not miss.
        self.accelerator.print(f"WeightLoRA switch at step {self.state.global_step + 1}: {self.weight_lora.summary()}")
        self._weight_lora_logs = {
            "weight_lora/kept_adapters": self.weight_lora.k,
            "weight_lora/total_adapters": self.weight_lora.num_adapters,
            **{f"weight_lora/omega_steps_{outcome}": count for outcome, count in self.weight_lora.omega_steps.items()},
        }

    def _rewrap_ddp(self, old: DistributedDataParallel) -> torch.nn.Module:
        """Wrap the rebuilt model in a new DDP: the old one would never all-reduce the re-created adapters.

        - The new wrapper keeps the old one's `find_unused_parameters` (the user's setting, or the Trainer's default
          for a PEFT model): a kept adapter may still be unused in some steps (conditional compute).
        - It skips DDP's initial broadcast of every parameter (for an 8B base, 16 GB of frozen weights): the
          re-created adapters are the same on every rank already (seeded re-initialisation, checked by
          `check_ranks_agree` just before).
        - The old wrapper is emptied of everything that holds the old adapters (its reducer, gradient buckets and
          parameter lists): the epoch loop keeps it in a local variable until `train()` returns, and only calls
          `.parameters()`, `.zero_grad()` and `no_sync()` on it, which reach the same PeftModel.
        - Under `torch_compile` accelerate compiles the new wrapper too.
        """
        accelerator, wrapped = self.accelerator, self.model_wrapped
        accelerator._models = [m for m in accelerator._models if m is not wrapped and m is not old]
        handler = accelerator.ddp_handler
        created = handler is None
        if created:
            handler = accelerator.ddp_handler = DistributedDataParallelKwargs()
        previous = handler.find_unused_parameters
        handler.find_unused_parameters = old.find_unused_parameters
        try:
            with _ddp_without_initial_broadcast():
                new = accelerator.prepare_model(self.model)
        finally:
            handler.find_unused_parameters = previous
            if created:
                accelerator.ddp_handler = None
        _release_ddp(old)
        if wrapped is not old:
            # torch.compile's caches hold the old graph, and through its guards the old adapters; the new wrapper
            # has another structure and is compiled afresh anyway.
            torch._dynamo.reset()
        return new

    # --- guard rails for multi-process runs ----------------------------------------------------------------------

    def train(self, *args, **kwargs):
        self._undo_evaluation_prepare()
        return super().train(*args, **kwargs)

    def _undo_evaluation_prepare(self) -> None:
        """`evaluate()` before `train()` prepares the bare model in evaluation mode, which marks it as prepared:
        `train()` would then get it back unwrapped, and every rank would train alone. Forget that preparation."""
        model = self.model
        if self.accelerator.num_processes <= 1 or self.model_wrapped is not model:
            return
        if not getattr(model, "_is_accelerate_prepared", False):
            return
        del model._is_accelerate_prepared
        original_forward = model.__dict__.pop("_original_forward", None)  # accelerate's mixed-precision patch
        if original_forward is not None:
            model.__dict__.pop("forward", None)
        self.accelerator._models = [m for m in self.accelerator._models if m is not model]

    def _check_data_parallel_wrapper(self) -> None:
        if self.accelerator.num_processes > 1 and _ddp_inside(self.model_wrapped) is None:
            raise RuntimeError(
                f"WeightLoRA: {self.accelerator.num_processes} processes are training, but the model is not wrapped "
                f"in DistributedDataParallel (it is a {type(self.model_wrapped).__name__}), so each rank would select "
                "and train its own adapters. This happens when a model was prepared by accelerate before train() in "
                "a way WeightLoRA does not undo; please report it with your launch command."
            )

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
            directory = output_dir or self.args.output_dir
            if not self.weight_lora.switched:
                # During the warm-up: fold omega into the saved lora_B and write a stock config, so the file is
                # the model being trained; keep the unfolded weights beside it for resuming.
                export_warmup_adapter(directory, self.weight_lora)
            write_selection(directory, self.weight_lora.report(self.state.global_step))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Rebuild the checkpoint's structure (and omega) first: the Trainer loads adapter weights into the current
        # structure, which after the switch has other modules and ranks than a fresh model. A warm-up checkpoint's
        # adapter file has omega folded in; the unfolded weights beside it are what the run continues from.
        self.weight_lora.restore(read_selection(resume_from_checkpoint))
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self.weight_lora.switched:
            restore_warmup_weights(resume_from_checkpoint, self.weight_lora)


def _ddp_inside(model: torch.nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper of a prepared model, also under torch.compile (an OptimizedModule around the DDP)."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, DistributedDataParallel) else None


@contextlib.contextmanager
def _ddp_without_initial_broadcast():
    """accelerate builds its DDP as `torch.nn.parallel.DistributedDataParallel(...)`, looked up at call time; for
    the re-wrap, build a plain DDP with `init_sync=False` (no broadcast of the frozen base), whatever else accelerate
    passes. (accelerate's `prepare_model` only calls that name, never tests isinstance against it.)"""
    original = torch.nn.parallel.DistributedDataParallel

    def without_initial_broadcast(*args, **kwargs):
        return original(*args, **{"init_sync": False, **kwargs})

    torch.nn.parallel.DistributedDataParallel = without_initial_broadcast
    try:
        yield
    finally:
        torch.nn.parallel.DistributedDataParallel = original


def _release_ddp(ddp: DistributedDataParallel) -> None:
    """Drop what a replaced DDP wrapper holds of the old parameters: autograd hooks on their gradient accumulators,
    parameter lists, and the reducer with its gradient buckets. `.module` (the live model) stays."""
    for handle in getattr(ddp, "_accum_grad_hooks", []):
        handle.remove()
    for attribute in ("_accum_grad_hooks", "_module_parameters", "_delay_all_reduce_params", "_delay_grad_views"):
        if isinstance(getattr(ddp, attribute, None), list):
            setattr(ddp, attribute, [])
    for attribute in ("reducer", "logger"):
        if hasattr(ddp, attribute):
            setattr(ddp, attribute, None)


def check_ranks_agree(weight_lora: WeightLoraModel) -> None:
    """Raise unless every process holds the same omega (hence the same kept set): one small all-gather."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    omega = weight_lora.omega
    if omega is None:
        return
    backend = torch.distributed.get_backend()
    device = omega.device if backend != "gloo" else torch.device("cpu")
    mine = omega.detach().to(device)
    gathered = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, mine)
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        raise RuntimeError(
            f"WeightLoRA: at the switch, ranks {differing} hold another omega than rank 0, so they would keep other "
            "adapters. The ranks have been training without synchronised gradients (the model was not wrapped in "
            "DistributedDataParallel for part of the run)."
        )


class WeightLoraTrainer(WeightLoraMixin, Trainer):
    """`transformers.Trainer` with WeightLoRA, for any task (e.g. sequence classification with an encoder).

    Pass a model wrapped with `get_peft_model(model, WeightLoraConfig(...))`, or a plain model and
    `peft_config=WeightLoraConfig(...)`. Modules in `modules_to_save` (a classifier head) train normally and are
    not subject to selection.
    """

    def __init__(self, model=None, args=None, *trainer_args, peft_config: WeightLoraConfig | None = None, **kwargs):
        self._peft_config_for_model_init = None
        if model is None and kwargs.get("model_init") is not None:
            # model_init (hyperparameter search): every fresh model is wrapped and gets its own selection, in
            # call_model_init; it must return a plain model with peft_config, or a WeightLoRA PeftModel without.
            _check_training_args(args)
            self._peft_config_for_model_init = peft_config
        else:
            _check_peft_config(peft_config, model)
            _check_training_args(args)
            if peft_config is not None:
                if isinstance(model, PeftModel):
                    raise ValueError("Pass either a PeftModel or peft_config, not both.")
                model = get_peft_model(model, peft_config)
        super().__init__(model, args, *trainer_args, **kwargs)
        self._setup_weight_lora()

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        config = self._peft_config_for_model_init
        _check_peft_config(config, model)
        if config is not None:
            if isinstance(model, PeftModel):
                raise ValueError("model_init returned a PeftModel and peft_config was passed too; pass one of them.")
            model = get_peft_model(model, copy.deepcopy(config))  # PEFT edits the config it is given
        if hasattr(self, "weight_lora"):  # a new model for train(): a new selection (set up in __init__ otherwise)
            self.model = model
            self._setup_weight_lora()
        return model


class WeightLoraSFTTrainer(WeightLoraMixin, SFTTrainer):
    """`trl.SFTTrainer` with WeightLoRA: pass `peft_config=WeightLoraConfig(...)` where you passed a LoraConfig."""

    def __init__(self, model, args=None, *trainer_args, peft_config: WeightLoraConfig | None = None, **kwargs):
        _check_peft_config(peft_config, model)
        _check_training_args(args)
        super().__init__(model, args, *trainer_args, peft_config=peft_config, **kwargs)
        self._setup_weight_lora()
