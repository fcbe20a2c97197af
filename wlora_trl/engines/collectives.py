"""The few collectives the method makes itself, on the default process group, whatever the engine.

omega lives outside the sharded model in mask mode, so FSDP2 and ZeRO neither reduce its gradient nor check it;
and every engine must end the warm-up with the same omega on every rank. Without a process group each function is
a no-op (one process).
"""

from __future__ import annotations

import torch


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def collective_device(tensor: torch.Tensor) -> torch.device:
    """Where `tensor` must be for a collective on the default group: the CPU for gloo; for a GPU backend (NCCL) the
    tensor's GPU, or this process's current one for a CPU tensor (mask mode's omega before its first forward)."""
    if torch.distributed.get_backend() == "gloo":
        return torch.device("cpu")
    if tensor.device.type != "cpu":
        return tensor.device
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index()) if accelerator else tensor.device


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over the default process group (itself without one): omega's gradient under FSDP2,
    which does not see omega and so does not reduce it. gloo has no AVG, hence SUM / world size."""
    if not _distributed():
        return tensor
    world = torch.distributed.get_world_size()
    if world == 1:
        return tensor
    reduced = tensor.detach().to(collective_device(tensor)).clone()
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
    return (reduced / world).to(tensor.device)


def check_ranks_agree(omega: torch.Tensor | None) -> None:
    """Raise unless every process holds the same omega (hence the same kept set): one small all-gather."""
    if omega is None or not _distributed():
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
