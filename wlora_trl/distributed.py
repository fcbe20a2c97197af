"""WeightLoRA under data parallelism: the DDP re-wrap at the switch and the check that the ranks agree.

DDP synchronises the gradients of the parameters it was built with; the switch re-creates the kept adapters, so the
model must be wrapped again or the ranks would train them apart, silently. `check_ranks_agree` makes that failure
(or any earlier one: a model never wrapped) loud, at the one point where it would otherwise become permanent.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch.nn.parallel import DistributedDataParallel

from ._compat import (
    ddp_find_unused_parameters,
    ddp_without_initial_broadcast,
    forget_prepared,
    release_ddp,
    reset_compile_caches,
)

logger = logging.getLogger(__name__)


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


def collective_device(tensor: torch.Tensor) -> torch.device:
    """Where `tensor` must be for a collective on the default group: the CPU for gloo; for a GPU backend (NCCL) the
    tensor's GPU, or this process's current one for a CPU tensor (mask mode's omega before its first forward)."""
    if torch.distributed.get_backend() == "gloo":
        return torch.device("cpu")
    if tensor.device.type != "cpu":
        return tensor.device
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index()) if accelerator else tensor.device


def check_ranks_agree(omega: torch.Tensor | None) -> None:
    """Raise unless every process holds the same omega (hence the same kept set): one small all-gather."""
    if omega is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    mine = omega.detach().to(collective_device(omega))
    gathered = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, mine)
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        raise RuntimeError(
            f"WeightLoRA: at the switch, ranks {differing} hold another omega than rank 0, so they would keep other "
            "adapters. The ranks have been training without synchronised gradients (under DDP: the model was not "
            "wrapped in DistributedDataParallel for part of the run; in a custom loop: omega_step was not called on "
            "every rank at every step)."
        )


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
