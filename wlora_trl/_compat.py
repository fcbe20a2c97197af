"""Every reliance on private internals of accelerate, torch and transformers, in one place.

Each function names what it touches and why there is no public way. `tests/test_compat.py` checks every item
against the installed versions, so an upgrade that moves one of them fails there, loudly, rather than in a run.
Checked with accelerate 1.15-1.16, torch 2.11-2.13, transformers 5.17-5.25.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel


def forget_prepared(accelerator, *models: torch.nn.Module) -> None:
    """Drop models from `accelerator._models` (private). A replaced DDP wrapper must not stay registered: accelerate
    walks that list when it saves state or frees memory, and it would keep the old adapters alive."""
    accelerator._models = [m for m in accelerator._models if all(m is not other for other in models)]


def undo_evaluation_prepare(accelerator, model: torch.nn.Module) -> bool:
    """Forget `accelerator.prepare_model(model, evaluation_mode=True)`. It sets `model._is_accelerate_prepared`
    (private) on the bare model, after which a training `prepare` returns it unwrapped (no DDP), and under mixed
    precision it replaced `model.forward` with an autocast wrapper, keeping the original in `_original_forward`
    (private), which a second preparation would wrap again. Returns whether there was anything to undo."""
    if not getattr(model, "_is_accelerate_prepared", False):
        return False
    del model._is_accelerate_prepared
    if model.__dict__.pop("_original_forward", None) is not None:
        model.__dict__.pop("forward", None)  # the class's forward again
    forget_prepared(accelerator, model)
    return True


@contextlib.contextmanager
def ddp_find_unused_parameters(accelerator, value: bool):
    """Build the next DDP with `find_unused_parameters=value` through accelerate's `ddp_handler` (the kwargs handler
    it builds DDP from); restored afterwards. The Trainer sets the handler at construction, there is no per-call
    argument."""
    from accelerate.utils import DistributedDataParallelKwargs

    handler = accelerator.ddp_handler
    created = handler is None
    if created:
        handler = accelerator.ddp_handler = DistributedDataParallelKwargs()
    previous = handler.find_unused_parameters
    handler.find_unused_parameters = value
    try:
        yield
    finally:
        handler.find_unused_parameters = previous
        if created:
            accelerator.ddp_handler = None


@contextlib.contextmanager
def ddp_without_initial_broadcast():
    """accelerate's `prepare_model` builds its DDP as `torch.nn.parallel.DistributedDataParallel(...)`, looked up
    at call time, and never tests isinstance against that name. Within this context it builds a plain DDP with
    `init_sync=False` (torch >= 2.4): no broadcast of every parameter (16 GB of frozen weights for an 8B base) when
    the caller knows the ranks already agree."""
    original = torch.nn.parallel.DistributedDataParallel

    def without_initial_broadcast(*args, **kwargs):
        return original(*args, **{"init_sync": False, **kwargs})

    torch.nn.parallel.DistributedDataParallel = without_initial_broadcast
    try:
        yield
    finally:
        torch.nn.parallel.DistributedDataParallel = original


# DDP's private attributes that hold its parameters (and, through autograd hooks, their gradient accumulators).
DDP_PARAMETER_HOLDERS = ("_accum_grad_hooks", "_module_parameters", "_delay_all_reduce_params", "_delay_grad_views")


def release_ddp(ddp: DistributedDataParallel) -> None:
    """Empty a replaced DDP wrapper of what holds the old parameters: the hooks on their gradient accumulators, its
    parameter lists (private attributes) and its reducer and logger with the gradient buckets. `.module`, the live
    model, stays: the Trainer's epoch loop still calls `.parameters()`, `.zero_grad()` and `no_sync()` on it."""
    for handle in getattr(ddp, "_accum_grad_hooks", []):
        handle.remove()
    for attribute in DDP_PARAMETER_HOLDERS:
        if isinstance(getattr(ddp, attribute, None), list):
            setattr(ddp, attribute, [])
    for attribute in ("reducer", "logger"):
        if hasattr(ddp, attribute):
            setattr(ddp, attribute, None)


def reset_compile_caches() -> None:
    """`torch._dynamo.reset()` (private module): torch.compile's caches hold the replaced graph and, through its
    guards, the old adapters; the rebuilt model is compiled afresh anyway."""
    torch._dynamo.reset()


def sync_each_batch(accelerator) -> bool:
    """accelerate's `sync_each_batch` gradient-accumulation option, read from `gradient_state.plugin_kwargs`
    (no public getter): with it, no micro-batch runs under `no_sync`."""
    return bool(accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False))


def loss_scale(scaler) -> torch.Tensor | float:
    """The GradScaler's current scale as a device tensor (`_get_scale_async`, private); `get_scale()` returns a
    Python float, a GPU sync per step. Falls back to it where the private method is missing."""
    scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
    return scale if scale is not None else scaler.get_scale()


# Not callable, but relied on by the trainer (also checked by tests/test_compat.py):
# - transformers' `Trainer._inner_training_loop` keeps the wrapped model in a local variable and passes it to
#   `training_step`, `_clip_grad_norm` and `zero_grad`: after a DDP re-wrap the trainer swaps in `model_wrapped`
#   inside `training_step`, and the stale wrapper's `.parameters()` still reach the live model.
# - `Trainer._load_from_checkpoint(resume_from_checkpoint, model)` loads the adapter weights on resume; the trainer
#   rebuilds the checkpoint's structure before it runs and loads the unfolded warm-up weights after.
