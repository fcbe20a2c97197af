"""The DDP engine: the DDP re-wrap at the switch and the check that the ranks agree.

DDP synchronises the gradients of the parameters it was built with; the switch re-creates the kept adapters, so the
model must be wrapped again or the ranks would train them apart, silently. `check_ranks_agree` makes that failure
(or any earlier one: a model never wrapped) loud, at the one point where it would otherwise become permanent.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from .._compat import (
    ddp_find_unused_parameters,
    ddp_without_initial_broadcast,
    forget_prepared,
    release_ddp,
    reset_compile_caches,
    undo_evaluation_prepare,
)
from .base import Engine
from .collectives import check_ranks_agree


def ddp_inside(model: torch.nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper of a prepared model, also under torch.compile (an OptimizedModule around the DDP)."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, DistributedDataParallel) else None


def rewrap_ddp(accelerator, model: torch.nn.Module, wrapped: torch.nn.Module) -> torch.nn.Module:
    """Wrap the rebuilt `model` in a new DDP in place of `wrapped` (a DDP, or a compiled one) and return it.

    - The new wrapper keeps the old one's `find_unused_parameters` (the user's setting, or the Trainer's default
      for a PEFT model): a kept adapter may still be unused in some steps (conditional compute).
    - It skips DDP's initial broadcast of every parameter: the re-created adapters are the same on every rank
      already (seeded re-initialisation, checked by `check_ranks_agree` just before).
    - The old wrapper is emptied of everything that holds the old adapters (reducer, buckets, parameter lists).
    - Under `torch_compile` accelerate compiles the new wrapper too.
    """
    old = ddp_inside(wrapped)
    forget_prepared(accelerator, wrapped, old)
    with ddp_find_unused_parameters(accelerator, old.find_unused_parameters), ddp_without_initial_broadcast():
        new = accelerator.prepare_model(model)
    release_ddp(old)
    if wrapped is not old:
        reset_compile_caches()
    return new


class DataParallelEngine(Engine):
    """DDP (`accelerate launch`, torchrun): the one-process switch on every rank, then a new DDP wrapper, so the
    re-created adapters are synchronised too; omega's gradient is all-reduced with the others, and the ranks are
    checked to agree on omega before the switch."""

    name = "DDP"

    @classmethod
    def check_setup(cls, trainer: Any) -> None:
        if trainer.args.n_gpu > 1:
            # Several GPUs in one process: the Trainer would wrap the model in nn.DataParallel, whose replicas
            # share omega's gates across devices (and TRL refuses it too).
            raise ValueError(
                f"This process sees {trainer.args.n_gpu} GPUs and was not started by a distributed launcher, so the "
                "Trainer would use torch.nn.DataParallel, which WeightLoRA does not support. Launch with `accelerate "
                "launch --num_processes N` or `torchrun --nproc_per_node N` (one process per GPU), or expose one GPU "
                "with CUDA_VISIBLE_DEVICES."
            )

    @classmethod
    def detect(cls, trainer: Any) -> bool:
        """A distributed launch (`accelerate launch`, torchrun), one process included: accelerate wraps a one-process
        CPU run in DDP too, and that wrapper must be renewed at the switch like any other."""
        accelerator = trainer.accelerator
        launch = getattr(accelerator.distributed_type, "value", accelerator.distributed_type)  # "MULTI_CPU", "NO"
        return accelerator.num_processes > 1 or str(launch).startswith("MULTI_")

    def before_train(self, trainer: Any) -> None:
        """`evaluate()` before `train()` prepares the bare model in evaluation mode, which marks it as prepared:
        `train()` would then get it back unwrapped, and every rank would train alone. Forget that preparation."""
        if trainer.accelerator.num_processes > 1 and trainer.model_wrapped is trainer.model:
            undo_evaluation_prepare(trainer.accelerator, trainer.model)

    def check_wrapper(self, trainer: Any) -> None:
        # One process needs no wrapper (accelerate leaves a one-process CUDA run unwrapped).
        if trainer.accelerator.num_processes > 1 and ddp_inside(trainer.model_wrapped) is None:
            raise RuntimeError(
                f"WeightLoRA: {trainer.accelerator.num_processes} processes are training, but the model is not wrapped "
                f"in DistributedDataParallel (it is a {type(trainer.model_wrapped).__name__}), so each rank would "
                "select and train its own adapters. This happens when a model was prepared by accelerate before "
                "train() in a way WeightLoRA does not undo; please report it with your launch command."
            )

    def before_switch(self, trainer: Any) -> None:
        check_ranks_agree(trainer.weight_lora.omega)  # a no-op for one process

    def after_switch(self, trainer: Any) -> None:
        if ddp_inside(trainer.model_wrapped) is not None:
            trainer.model_wrapped = rewrap_ddp(trainer.accelerator, trainer.model, trainer.model_wrapped)
