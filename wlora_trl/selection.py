"""omega, its gates on the LoRA adapters, and the StoIHT step that trains it.

During the selection phase adapter i computes `omega_i * scaling * B(A(dropout(x)))`. The gate multiplies the
rank-r activation `A(dropout(x))` rather than the adapter's output: the product is the same (B has no bias, which
the config enforces), and the tensor is r wide instead of out_features wide, so the gates cost almost nothing.

omega is one fp32 `nn.Parameter` of shape (n,). It is registered on the `PeftModel` itself, not on a tuner layer,
so PEFT's adapter file never contains it (PEFT saves tuner-layer parameters whose names contain "lora_"), while
DDP still sees it as a model parameter and all-reduces its gradient.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# Attribute name on the PeftModel. It must not contain "lora_", or PEFT would save omega into the adapter file.
OMEGA_PARAMETER_NAME = "selection_omega"


def top_k_mask(omega: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k entries of largest |omega|; equal magnitudes go to the lower index.

    `torch.topk` does not promise which of several equal values it returns; a stable descending sort does.
    """
    order = torch.sort(omega.detach().abs(), descending=True, stable=True).indices
    mask = torch.zeros_like(omega, dtype=torch.bool)
    mask[order[:k]] = True
    return mask


@torch.no_grad()
def stoiht_step(omega: torch.Tensor, grad: torch.Tensor | None, lr: float, k: int) -> bool:
    """One StoIHT step in place: `omega <- H_K(omega - lr * grad)`. Returns whether the step was taken.

    The step is skipped when the gradient is missing, all zero or not finite. An all-zero gradient happens at
    step 1, where every B is zero; thresholding the untouched, all-equal omega would then keep the first K
    adapters by index and remove the rest for good. A non-finite gradient would poison omega.
    """
    if grad is None:
        return False
    grad = grad.to(omega.dtype)
    if not bool(torch.isfinite(grad).all() & grad.ne(0).any()):  # one host sync per optimizer step
        return False
    omega.sub_(grad, alpha=lr)
    omega.mul_(top_k_mask(omega, k))
    return True


class _OmegaGate:
    """Forward hook on `lora_A[adapter]` of adapter `index`: scales its output by omega[index]."""

    def __init__(self, omega: nn.Parameter, index: int) -> None:
        self.omega = omega
        self.index = index

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        # omega stays fp32; the cast keeps a bf16 adapter in bf16 and still carries the gradient to omega.
        return output * self.omega[self.index].to(output.dtype)


class OmegaGates:
    """omega (ones at start) and one gate per adapter, in the order of `lora_a_modules`."""

    def __init__(self, owner: nn.Module, lora_a_modules: list[nn.Module], device: torch.device) -> None:
        self.owner = owner
        self.omega = nn.Parameter(torch.ones(len(lora_a_modules), dtype=torch.float32, device=device))
        owner.register_parameter(OMEGA_PARAMETER_NAME, self.omega)
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(_OmegaGate(self.omega, index)) for index, module in enumerate(lora_a_modules)
        ]

    def remove(self) -> None:
        """Take the gates off the adapters and omega off the model: the model is plain LoRA again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        delattr(self.owner, OMEGA_PARAMETER_NAME)
