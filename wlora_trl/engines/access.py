"""How the switch reads and writes a whole parameter, whatever the engine has done to it.

One process and DDP hold plain tensors; FSDP2 holds DTensors (each rank a shard, `full_tensor()` all-gathers);
DeepSpeed ZeRO partitions parameters and keeps fp32 masters and Adam moments in its optimizer
(`wlora_trl.engines.deepspeed.ZeroParameterAccess`). The method (`wlora_trl.masking`, `wlora_trl.model`) is written
once against `ParameterAccess`; each engine hands the `WeightLoraModel` its own.
"""

from __future__ import annotations

import torch
from torch import nn

from ..surgery import retarget_optimizer


def is_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor (FSDP2's sharded parameters), without importing torch.distributed where it is missing."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "full_tensor")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered for a DTensor (a collective: every rank must call it, in the same order)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_shape(parameter: torch.Tensor) -> tuple[int, ...]:
    """The parameter's whole shape: a DTensor's is its own; a ZeRO-3 partitioned parameter records it as `ds_shape`
    (its own shape is its local, often empty, storage's)."""
    return tuple(getattr(parameter, "ds_shape", parameter.shape))


@torch.no_grad()
def write_full(parameter: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole tensor `full` into `parameter`; a sharded parameter takes its own slice of it. Every rank
    holds the same `full` (a seeded stream), so each slices locally: `src_data_rank=None` sends nothing."""
    if is_sharded(parameter):
        from torch.distributed.tensor import distribute_tensor

        local = full.to(device=parameter.to_local().device, dtype=parameter.dtype)
        parameter.copy_(distribute_tensor(local, parameter.device_mesh, parameter.placements, src_data_rank=None))
    else:
        parameter.copy_(full.to(device=parameter.device, dtype=parameter.dtype))


class ParameterAccess:
    """How mask mode reads and writes whole parameters and edits the optimizer at the switch: plain tensors and
    FSDP2's DTensors. Reads and writes of sharded parameters are collectives: every rank makes the same calls in the
    same order (the switch and the export walk the modules in one order on every rank). Subclasses: another engine."""

    def read(self, parameter: torch.Tensor) -> torch.Tensor:
        """The parameter's whole current value (all-gathered for a DTensor). Treat it as read-only: for a plain
        tensor it is the parameter's own storage."""
        return full_tensor(parameter.detach())

    def write(self, parameter: torch.Tensor, full: torch.Tensor) -> None:
        """Make `full` the parameter's value, everywhere the engine keeps one (every rank passes the same `full`)."""
        write_full(parameter, full)

    def switched_off(self, layer: nn.Module, parameters: list[nn.Parameter]) -> None:
        """A dropped adapter's layer no longer uses `parameters`: an engine that gathers a module's parameters
        before it runs can stop gathering these (FSDP2 gathers the whole decoder layer regardless: nothing to do)."""

    def edit_optimizer(self, optimizer: torch.optim.Optimizer, replacements: dict[int, list[nn.Parameter]]) -> None:
        """After the switch: the optimizer forgets the parameters mapped to [] (dropped) and starts those mapped to
        themselves afresh (re-initialised in place), as `surgery.retarget_optimizer` describes."""
        retarget_optimizer(optimizer, replacements)


PLAIN_ACCESS = ParameterAccess()
