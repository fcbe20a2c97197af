"""WeightLoRA as drop-in trainers: `WeightLoraSFTTrainer` (TRL) and `WeightLoraTrainer` (transformers).

Migrating a TRL script is two renames: `SFTTrainer` -> `WeightLoraSFTTrainer`, `LoraConfig` ->
`WeightLoraConfig`. What the trainers add to a normal run:

- Steps 1..T: every adapter trains, gated by omega; after each optimizer step omega takes a StoIHT step
  (SGD with `omega_lr`, then hard thresholding to K entries). omega's gradient is taken out before gradient
  clipping and the optimizer see it, and is unscaled for fp16; a step the GradScaler skips skips omega too.
- Start of step T+1: the switch. Dropped adapters become base layers (under FSDP2: masked in place, below), kept
  ones are re-initialised (rank 2r with WeightLoRA+), omega disappears, and the optimizer is edited in place, so
  the LR schedule carries on unchanged.
  The kept count is logged (`weight_lora/kept_adapters`) with the next regular log line.
- `save_model` writes a stock PEFT LoRA adapter plus `selection.json`; checkpoints carry `selection.json` too, so
  resuming before, at or after T continues the same run.
- `select_adapters()` instead of `train()`: the warm-up and the switch only (stage 1 of the two-stage route; the
  selection becomes any trainer's `LoraConfig` through `wlora_trl.lora_config_from_selection`).

- DDP (`accelerate launch`, torchrun): omega's gradient is all-reduced with the others, so every rank takes the
  same StoIHT steps; after the switch the model is re-wrapped in a new DDP, so the re-created adapters are
  synchronised too.

- FSDP2 (accelerate's `fsdp_version: 2`, `wlora_trl/cli/accelerate_configs/fsdp2.yaml`): the switch runs in mask mode
  (dropped adapters zeroed and switched off in place, kept ones re-initialised shard by shard), omega lives outside
  the sharded model, and `save_model` gathers only the kept adapters into a stock PEFT adapter.
- DeepSpeed ZeRO-2 / ZeRO-3 (`deepspeed=` in the arguments, or accelerate's `zero2.yaml` / `zero3.yaml`): the same
  mask mode, writing ZeRO's partitioned parameters, fp32 masters and Adam moments (`wlora_trl.engines.deepspeed`); omega's step
  runs after DeepSpeed's own step (which accelerate makes inside the backward). Resuming loads DeepSpeed's
  checkpoint, replays the selection, and after T loads the checkpoint once more over the replayed switch.

Limits: FSDP version 1, DeepSpeed ZeRO stages 0-1, offload to NVMe and fp16 are refused, one trained adapter (frozen ones
beside it, such as the reference copy TRL's DPO and GRPO trainers add, are left alone), plain LoRA on linear layers
(no DoRA or other variants), `load_best_model_at_end` refused (checkpoints on either side of the switch differ in
structure).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import os
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTTrainer

from ._compat import loss_scale, sync_each_batch
from .artifacts.card import write_model_card
from .artifacts.trackers import log_heatmap_to_trackers
from .config import CITATION, WeightLoraConfig
from .engines import Engine, check_training_args, detect_engine
from .model import WeightLoraModel
from .state import RESUME_HINT, SelectionReport, kept_per_projection, read_selection
from .surgery import innermost_optimizer

logger = logging.getLogger(__name__)


def _check_peft_config(peft_config: PeftConfig | None, model: Any, builder: str | None = None) -> None:
    """Refuse configs WeightLoRA cannot use, before the parent trainer spends time building anything. `builder`: the
    name of a parent trainer that takes no `peft_config` (a `transformers.Trainer` subclass), so cannot build the
    adapters itself."""
    if peft_config is None:
        if isinstance(model, PeftModel):
            return  # WeightLoraModel checks the adapter's config
        if builder is not None:
            raise ValueError(
                f"WeightLoRA needs LoRA adapters, and {builder} takes no peft_config to build them from: pass a model "
                "already wrapped with get_peft_model(model, WeightLoraConfig(...)), or subclass "
                f"wlora_trl.WeightLoraTrainer (a transformers.Trainer that takes peft_config=) instead of {builder}."
            )
        raise ValueError(
            "WeightLoRA needs LoRA adapters: pass peft_config=WeightLoraConfig(...), or a model already wrapped "
            "with get_peft_model(model, WeightLoraConfig(...))."
        )
    if not isinstance(peft_config, WeightLoraConfig):
        raise TypeError(
            f"peft_config is a {type(peft_config).__name__}; WeightLoRA needs wlora_trl.WeightLoraConfig, a drop-in "
            "for peft.LoraConfig that takes the same arguments plus k, selection_steps, omega_lr, plus, reinit."
        )


@contextlib.contextmanager
def _explained_peft_errors():
    """PEFT's refusals while it wraps the model, with what to change: with `target_modules="all-linear"` PEFT adapts
    the experts (and routers) of the mixture-of-experts families it maps as parameters, whose wrapper cannot apply
    lora_dropout."""
    try:
        yield
    except ValueError as err:
        if "ParamWrapper does not work with lora_dropout" not in str(err):
            raise
        raise ValueError(
            "PEFT adapts this model's expert (and router) weights as parameters: target_modules='all-linear' adds them "
            "for mixture-of-experts families such as Mixtral, Qwen3-MoE and OLMoE, or target_parameters names them. "
            "LoRA on parameters cannot apply dropout: set lora_dropout=0 in the WeightLoraConfig (or list the linear "
            "target_modules explicitly to leave the experts frozen)."
        ) from err


def _check_training_args(args: Any) -> None:
    """Refuse setups WeightLoRA does not support, before the parent trainer builds anything."""
    if args is None:
        return
    check_training_args(args)  # what each engine refuses: FSDP version 1, DeepSpeed's ZeRO stage, offload, fp16
    if args.load_best_model_at_end:
        raise ValueError(
            "load_best_model_at_end=True is not supported: checkpoints before and after the switch at step T hold "
            "different adapter structures. Set it to False and pick a checkpoint by its metrics."
        )


def _parent_trainer(cls: type) -> type:
    """The trainer after `WeightLoraMixin` in the MRO of `cls` (the one the mixin's arguments go to)."""
    mro = cls.__mro__
    return mro[mro.index(WeightLoraMixin) + 1]


def _takes_argument(trainer: type, name: str) -> bool:
    """Whether `trainer.__init__` takes `name`, by name or through **kwargs."""
    parameters = inspect.signature(trainer.__init__).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _parent_trainer_arguments(cls: type, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments the mixin passes on, by the names of the trainer after it in the MRO: `DPOTrainer(model,
    ref_model, args)` and `GRPOTrainer(model, reward_funcs, args)` do not take the training arguments second. Empty
    when they do not bind (the parent trainer then raises its own error); its checks run again after it is built."""
    signature = inspect.signature(_parent_trainer(cls).__init__)
    try:
        bound = signature.bind(None, *args, **kwargs)  # None: `self`
    except TypeError:
        return {}
    named = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:  # a parent that forwards **kwargs: the names it forwards
            named.update({key: item for key, item in value.items() if key not in named})
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


class WeightLoraMixin:
    """Adds WeightLoRA to any `transformers.Trainer` subclass whose model is, or is made into, a PeftModel from a
    `WeightLoraConfig`: `class MyTrainer(WeightLoraMixin, SomeTRLTrainer): pass` for a TRL trainer that takes
    `peft_config=` (DPO and GRPO ship as `wlora_trl.WeightLoraDPOTrainer` / `WeightLoraGRPOTrainer`). It reads
    `model`, `args` and `peft_config` by the parameter names of the trainer after it in the MRO, so any argument
    order works. Cooperative: it checks the arguments, lets the trainer build everything, then attaches
    `self.weight_lora` (a `WeightLoraModel`) and `self.engine` (one process, DDP, FSDP2 or DeepSpeed ZeRO, detected
    once: `wlora_trl.engines`), which it asks wherever engines differ. It overrides `create_optimizer` (omega stays out), `training_step`
    (the switch, omega's gradient), `save_model` / `_load_from_checkpoint` (selection.json, warm-up saves,
    the trained adapter only), `train` and `log`.
    """

    weight_lora: WeightLoraModel
    # Mask mode without FSDP2 (tests on a CPU, where accelerate does not enable FSDP): the same switch, unsharded
    # (`wlora_trl.engines.masked.MaskModeEngine`).
    _force_mask_mode = False

    def __init__(self, *args, **kwargs):
        parent = _parent_trainer(type(self))
        builder = None if _takes_argument(parent, "peft_config") else parent.__name__
        if builder is not None and "peft_config" in kwargs:
            raise TypeError(
                f"{builder} takes no peft_config (a transformers.Trainer does not build PEFT models): pass a model "
                "already wrapped with get_peft_model(model, WeightLoraConfig(...)) and no peft_config, or subclass "
                f"wlora_trl.WeightLoraTrainer (a transformers.Trainer that takes peft_config=) instead of {builder}."
            )
        given = _parent_trainer_arguments(type(self), args, kwargs)
        _check_training_args(given.get("args"))
        if given.get("model_init") is None:
            _check_peft_config(given.get("peft_config"), given.get("model"), builder)
        with _explained_peft_errors():  # TRL's trainers wrap the model themselves
            super().__init__(*args, **kwargs)
        self._setup_weight_lora()

    def _setup_weight_lora(self) -> None:
        _check_training_args(self.args)  # again: SFTTrainer may have built its own args
        # The engine is detected once, here; everything that differs between engines is asked of it from now on.
        self.engine: Engine = detect_engine(self)
        self.engine.setup(self)
        # FSDP2 and ZeRO partition the model's parameters, and ZeRO's optimizer cannot lose one: their switch keeps
        # the structure, in mask mode.
        self.weight_lora = WeightLoraModel(self.model, mask_mode=self.engine.mask_mode)
        self.weight_lora.parameter_access = self.engine.parameter_access
        if self.args.max_steps > 0:
            self.weight_lora.set_max_steps(self.args.max_steps)  # refuse an impossible T now, not at train()
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
        self.engine.prepare_optimizer(optimizer, weight_lora)
        if self.engine.steps_in_backward:
            return optimizer  # omega's step follows the engine's own, in training_step
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
            weight_lora.set_max_steps(self.state.max_steps, run=self._run_length())
        if self._omega_grad is not None:
            # omega's gradient from the last step was never applied: the GradScaler skipped that optimizer step
            # (and the pre-hook with it) on an fp16 overflow.
            self._omega_grad = None
            weight_lora.skip_omega_step()
        if not self._wrapper_checked:
            self.engine.check_wrapper(self)
            self._wrapper_checked = True
        if not weight_lora.switched and self.state.global_step >= weight_lora.selection_steps:
            self._switch()
        if model is not self.model_wrapped:
            # After a DDP re-wrap the loop still hands us the old wrapper (a local variable of the epoch loop),
            # and its `no_sync` context, which no longer applies: forward through the new one, with its own.
            model = self.model_wrapped
            if not self.accelerator.sync_gradients and not sync_each_batch(self.accelerator):
                with self.accelerator.no_sync(model):
                    return super().training_step(model, inputs, num_items_in_batch)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not weight_lora.switched and self.accelerator.sync_gradients:
            # Take omega's gradient before clipping sees it (its step size is omega_lr, not a clipped share of
            # the global norm); the optimizer pre-hook applies it.
            self._omega_grad = self._unscale(weight_lora.take_omega_grad())
            if self.engine.steps_in_backward:
                # The engine's optimizer stepped inside the backward, from this step's gradients: omega's step
                # follows it here, from the same gradients.
                grad, self._omega_grad = self._omega_grad, None
                weight_lora.omega_step(grad, skip=self.engine.step_skipped(self))
        return loss

    def _run_length(self) -> str | None:
        """How an epoch-based run's step count came about, for the message refusing a T it never reaches."""
        args = self.args
        if args.max_steps > 0:
            return None
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        dataset = self.train_dataset
        examples = f"{len(dataset)} examples" if hasattr(dataset, "__len__") else "the training data"
        return (
            f"num_train_epochs={args.num_train_epochs} over {examples}, {batch} examples per optimizer step, comes "
            f"to {self.state.max_steps} optimizer steps"
        )

    def _unscale(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        scaler = getattr(self.accelerator, "scaler", None)
        if grad is None or scaler is None or not scaler.is_enabled():
            return grad
        return grad.float() / loss_scale(scaler)  # a device tensor: no GPU sync per step

    def _switch(self) -> None:
        if self._omega_hook is not None:
            self._omega_hook.remove()
            self._omega_hook = None
        if self._omega_grad is not None:
            # Step T's gradient was never applied: the GradScaler skipped that optimizer step (only reachable from
            # select_adapters, which switches at the end of step T; training_step counts it otherwise).
            self.weight_lora.skip_omega_step()
        self._omega_grad = None
        self.engine.before_switch(self)
        self.weight_lora.switch(self.optimizer, seed=self.args.seed, announce=False)
        self.engine.after_switch(self)
        # At the default log level, on the main process only: the one event of the run a user must not miss.
        self.accelerator.print(f"WeightLoRA switch at step {self.state.global_step + 1}: {self.weight_lora.summary()}")
        report = self.weight_lora.report(self.state.global_step)
        self._weight_lora_logs = {
            "weight_lora/kept_adapters": self.weight_lora.k,
            "weight_lora/total_adapters": self.weight_lora.num_adapters,
            **{f"weight_lora/omega_steps_{outcome}": count for outcome, count in self.weight_lora.omega_steps.items()},
            **{f"weight_lora/kept/{projection}": kept for projection, (kept, _) in kept_per_projection(report).items()},
        }
        if self.is_world_process_zero():
            log_heatmap_to_trackers(self.callback_handler.callbacks, report, self.state.global_step + 1)

    # --- stage 1 of the two-stage route: the warm-up and the switch, then stop -----------------------------------

    def select_adapters(self, resume_from_checkpoint: str | bool | None = None, **train_kwargs) -> SelectionReport:
        """Train only the warm-up (T steps), make the switch at its end, and stop; returns the selection.

        Stage 1 of the two-stage route: `save_model(dir)` then writes selection.json, a stock adapter config on the
        kept modules and `lora_targets.yaml` (TRL ModelConfig keys), and `wlora_trl.lora_config_from_selection(dir)`
        turns the folder into the `LoraConfig` of any LoRA trainer's stage 2 (FSDP2, DeepSpeed, other frameworks). T is resolved as in a full run, so give the
        planned run's length (`max_steps` or epochs) when T is a fraction. Works wherever `train()` does (one
        device, 8-bit or 4-bit bases, DDP, FSDP2)."""
        if self.weight_lora.switched:
            raise RuntimeError("WeightLoRA: the switch already happened; the selection is in weight_lora.report().")
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if checkpoint and read_selection(checkpoint, hint=RESUME_HINT).switched:
            # Resuming it would train on past the switch, to max_steps: its selection is already made.
            raise ValueError(
                f"{checkpoint} was saved after the switch, so its selection is already made: use it directly, "
                f"lora_config_from_selection({str(checkpoint)!r})."
            )
        stop = _SwitchThenStop(self)
        self.add_callback(stop)
        try:
            self.train(resume_from_checkpoint=resume_from_checkpoint, **train_kwargs)
        finally:
            self.remove_callback(stop)
        if not self.weight_lora.switched:
            raise RuntimeError(
                f"WeightLoRA: training ended after {self.state.global_step} optimizer steps, before the warm-up's "
                f"T = {self.weight_lora.selection_steps}: give the run more data or epochs, or a smaller "
                "selection_steps."
            )
        return self.weight_lora.report(self.state.global_step)

    # --- guard rails for multi-process runs ----------------------------------------------------------------------

    def train(self, *args, **kwargs):
        self.engine.before_train(self)
        return super().train(*args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # The switch's numbers ride on the next regular log line, so every logging integration records them
        # without an extra log call in the middle of a step.
        if self._weight_lora_logs:
            logs = {**logs, **self._weight_lora_logs}
            self._weight_lora_logs = {}
        super().log(logs, *args, **kwargs)

    # --- saving and resuming ------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False, padded: bool = False) -> None:
        """The stock PEFT adapter plus `selection.json`, the selection heatmap (with matplotlib) and a model card.

        `padded=True`: an adapter on every targeted (layer, projection), zeros where one was dropped, for serving
        engines that want that shape (see `artifacts.export.pad_adapter`)."""
        directory = output_dir or self.args.output_dir
        self.engine.save_model(self, directory, padded)
        if self.args.push_to_hub and not _internal_call:  # as the Trainer's own save_model
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_tokenizer_and_args(self, directory: str) -> None:
        """What `Trainer._save` writes beside the weights."""
        from transformers.trainer import TRAINING_ARGS_NAME

        if self.processing_class is not None:
            self.processing_class.save_pretrained(directory)
        elif getattr(getattr(self, "data_collator", None), "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(directory)
        torch.save(self.args, os.path.join(directory, TRAINING_ARGS_NAME))

    def create_model_card(self, *args, **kwargs) -> None:
        # TRL writes its card into output_dir at every checkpoint, and both libraries at push_to_hub: write ours, which
        # says what WeightLoRA selected and carries the paper's citation.
        if self.is_world_process_zero():
            self._write_card(self.args.output_dir, self.weight_lora.report(self.state.global_step))

    def _write_card(self, directory: str, report) -> None:
        config = self.weight_lora.adapter_config()
        task = getattr(config.task_type, "value", config.task_type)
        write_model_card(directory, report, config.base_model_name_or_path, task, getattr(self, "_tag_names", ()))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_weights = functools.partial(super()._load_from_checkpoint, resume_from_checkpoint, model)
        self.engine.load_checkpoint(self, resume_from_checkpoint, load_weights)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.engine.after_optimizer_loaded(self, checkpoint)


class _SwitchThenStop(TrainerCallback):
    """`select_adapters`: at the end of step T make the switch there (rather than at the start of step T+1, which
    never comes) and end training, with a log line that carries the switch's numbers."""

    def __init__(self, trainer: WeightLoraMixin) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        weight_lora = self.trainer.weight_lora
        if not weight_lora.switched and state.global_step >= weight_lora.selection_steps:
            self.trainer._switch()
            control.should_training_stop = True
            control.should_log = True
        return control


_REFUSALS = """
    Raises:
        TypeError: At construction, before any training (as every error here, the message says what to change):
            `peft_config` is not a `WeightLoraConfig` (a plain `LoraConfig`, another PEFT method), or the model's
            adapter was not made from one.
        ValueError: At construction: no LoRA adapters (neither `peft_config` nor a PeftModel); several adapters
            that are active, trainable or made from WeightLoraConfigs of their own (a frozen reference copy may
            stay, except under FSDP2); LoRA on embeddings (`ensure_weight_tying=True` included) or on non-linear
            layers; K < 1 or K > n; T >= `max_steps`; FSDP version 1; DeepSpeed with ZeRO stage 0 or 1, NVMe
            offload or fp16;
            `load_best_model_at_end=True`; several GPUs in one process (nn.DataParallel); a model that went
            through the switch already. (LoRA variants, `lora_bias`, unsupported inits, `lora_dropout` with LoRA
            on parameters (`target_parameters`, the experts of mixture-of-experts models), and `plus=True` with a K
            other than n/2 are refused by `WeightLoraConfig` itself.)
        RuntimeError: During training: several processes but the model is not wrapped in DDP (first step), or
            ranks that hold different omega at the switch.
"""


def seed_as_the_trainer_does(args: Any) -> None:
    """`transformers.Trainer.__init__`'s seeding, for work that must happen before it (building the adapters)."""
    from transformers import TrainingArguments
    from transformers.trainer_utils import enable_full_determinism, set_seed

    args = args if args is not None else TrainingArguments("tmp_trainer")  # the Trainer's default arguments
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


class WeightLoraTrainer(WeightLoraMixin, Trainer):
    __doc__ = (
        """`transformers.Trainer` with WeightLoRA, for any task (e.g. sequence classification with an encoder).

    Pass a plain model and `peft_config=WeightLoraConfig(...)`, or a model wrapped with `get_peft_model(model,
    WeightLoraConfig(...))`, or `model_init=` with `peft_config=` (each fresh model gets its own selection). Modules
    in `modules_to_save` (a classifier head) train normally and are not subject to selection.

    Example:
        ```python
        from wlora_trl import WeightLoraConfig, WeightLoraTrainer

        config = WeightLoraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"])
        trainer = WeightLoraTrainer(model, training_args, train_dataset=dataset, peft_config=config)
        trainer.train()            # warm-up, the switch at step T+1 (one console line), plain LoRA after
        trainer.save_model(out)    # a stock PEFT LoRA adapter + selection.json
        ```
    """
        + _REFUSALS
    )

    def __init__(self, model=None, args=None, *trainer_args, peft_config: WeightLoraConfig | None = None, **kwargs):
        self._peft_config_for_model_init = None
        if model is None and kwargs.get("model_init") is not None:
            # model_init (hyperparameter search): every fresh model is wrapped and gets its own selection, in
            # call_model_init; it must return a plain model with peft_config, or a WeightLoRA PeftModel without.
            self._peft_config_for_model_init = peft_config
        else:
            _check_peft_config(peft_config, model)
            if peft_config is not None:
                if isinstance(model, PeftModel):
                    raise ValueError("Pass either a PeftModel or peft_config, not both.")
                _check_training_args(args)  # before get_peft_model spends time wrapping
                # The Trainer seeds in its __init__, after this: seed first, as it would, so that `args.seed` (not
                # whatever the script drew before) decides the adapters' initialisation, hence the selection.
                seed_as_the_trainer_does(args)
                with _explained_peft_errors():
                    model = get_peft_model(model, peft_config)
        super().__init__(model, args, *trainer_args, **kwargs)

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
    __doc__ = (
        """`trl.SFTTrainer` with WeightLoRA: pass `peft_config=WeightLoraConfig(...)` where you passed a `LoraConfig`.

    Example:
        ```python
        from trl import SFTConfig
        from wlora_trl import WeightLoraConfig, WeightLoraSFTTrainer

        peft_config = WeightLoraConfig(r=8, lora_alpha=16, target_modules="all-linear")  # K = n/2, T = 0.5%
        trainer = WeightLoraSFTTrainer(model="Qwen/Qwen3-0.6B", args=SFTConfig("out", max_steps=1000),
                                       train_dataset=dataset, peft_config=peft_config)
        trainer.train()
        trainer.save_model("out")  # a stock PEFT LoRA adapter + selection.json
        ```
    """
        + _REFUSALS
    )

    # What TRL's model card (written with every checkpoint) says about the run.
    _tag_names = ["trl", "sft", "weightlora"]
    _name = "WeightLoRA SFT"
    _paper = {"title": "WeightLoRA: Keep Only Necessary Adapters", "id": "2506.02724", "citation": CITATION}
