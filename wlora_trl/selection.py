"""omega, its gates on the LoRA adapters, and the StoIHT step that trains it.

During the selection phase adapter i computes `(omega_i * scaling_i) * B(A(dropout(x)))`. The gate is PEFT's own
multiplication by `scaling`: for the warm-up, each LoRA layer's `scaling[adapter]` (a Python float in stock PEFT)
becomes a 0-d tensor `omega_i * scaling_i`, refreshed once per model forward by a pre-hook on the model. So the
gate costs no extra module call and no extra kernel in the forward (the multiplication happens anyway), one
multiply and one unbind per device and forward for all n adapters together, and in the backward the one reduction
per adapter that omega's gradient needs. (v0.1 put a forward hook on every `lora_A`: 8-13% slower steps wherever
Python overhead shows; `benchmarks/speed.py` keeps that gate as the `warmup_hooks` variant for comparison.)

Precision: omega is an fp32 parameter. The product with the adapter's output happens in that output's dtype (bf16
under bf16 training: omega_i * scaling_i is rounded to 8 significant bits there, the same relative error as the
adapter output itself), and omega's gradient is reduced in that dtype and handed back in fp32. StoIHT updates the
fp32 omega, so small steps accumulate exactly. In fp16 the reduction can overflow only where |grad omega_i| exceeds
about scaling_i * 65504 / loss_scale (about 2 for a typical alpha/r = 2 at the initial scale 2^16; measured
|grad omega| on SmolLM2 is below 1e-2); such a step is skipped and counted, never applied.

omega is one fp32 `nn.Parameter` of shape (n,), registered on the `PeftModel` itself, not on a tuner layer, so
PEFT's adapter file never contains it (PEFT saves tuner-layer parameters whose names contain "lora_"), while DDP
still sees it as a model parameter and all-reduces its gradient.
"""

from __future__ import annotations

from collections import defaultdict

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


# Outcomes of one StoIHT step, as codes (`stoiht_step` returns one as a 0-d tensor) and as the names reports use.
STEP_TAKEN = 0
SKIPPED_NO_GRADIENT = 1  # missing or all zero: step 1 (every B is 0), or omega unused
SKIPPED_NONFINITE = 2  # inf/nan: it would poison omega
SKIPPED_WITH_OPTIMIZER = 3  # the optimizer step was skipped (fp16 GradScaler overflow); omega is left alone too
OUTCOMES = ("taken", "skipped_no_gradient", "skipped_nonfinite", "skipped_by_grad_scaler")


@torch.no_grad()
def stoiht_step(
    omega: torch.Tensor, grad: torch.Tensor | None, lr: float, k: int, skip: torch.Tensor | None = None
) -> torch.Tensor:
    """One StoIHT step in place: `omega <- H_K(omega - lr * grad)`, unless the step must be skipped.

    Skipped when the gradient is missing, all zero or not finite, or when `skip` (a 0-d bool tensor, e.g. a fused
    optimizer's `found_inf`) is true. An all-zero gradient happens at step 1, where every B is zero; thresholding the
    untouched, all-equal omega would then keep the first K adapters by index and remove the rest for good. A
    non-finite gradient would poison omega.

    Returns the outcome code (`STEP_TAKEN`, `SKIPPED_*`) as a 0-d tensor on omega's device. The decision is made on
    the device, so the step never waits for the GPU; reading the code does.
    """
    if grad is None:
        return torch.full((), SKIPPED_NO_GRADIENT, device=omega.device)
    grad = grad.to(device=omega.device, dtype=omega.dtype)
    finite = torch.isfinite(grad).all()
    nonzero = grad.ne(0).any()
    stepped = omega - lr * grad
    stepped.mul_(top_k_mask(stepped, k))
    take = finite & nonzero
    code = torch.where(finite, torch.where(nonzero, STEP_TAKEN, SKIPPED_NO_GRADIENT), SKIPPED_NONFINITE)
    if skip is not None:
        skip = skip.to(device=omega.device, dtype=torch.bool).reshape(())
        take = take & ~skip
        code = torch.where(skip, SKIPPED_WITH_OPTIMIZER, code)
    omega.copy_(torch.where(take, stepped, omega))
    return code


class OmegaGates:
    """omega (ones at start) and its gates: each LoRA layer's `scaling[adapter]` becomes `omega_i * scaling_i`.

    `layers` are the LoRA layers in adapter order. omega lives on the first layer's device; a layer on another
    device (a model spread over devices with `device_map`) gets its gate moved to its own device, one copy per
    device and forward.
    """

    def __init__(self, owner: nn.Module, root: nn.Module, layers: list[nn.Module], adapter_name: str) -> None:
        self.owner = owner
        self.layers = layers
        self.adapter_name = adapter_name
        self.scalings = [float(layer.scaling[adapter_name]) for layer in layers]
        device = layers[0].lora_A[adapter_name].weight.device
        self.omega = nn.Parameter(torch.ones(len(layers), dtype=torch.float32, device=device))
        owner.register_parameter(OMEGA_PARAMETER_NAME, self.omega)
        # Per device: the adapters there, and the scaling most of them share (all of them, unless rank_pattern or
        # alpha_pattern differ): those get their gates from one multiply, the others one multiply each.
        by_device: dict[torch.device, list[int]] = defaultdict(list)
        for index, layer in enumerate(layers):
            by_device[layer.lora_A[adapter_name].weight.device].append(index)
        self._devices = []
        for device, indices in by_device.items():
            values = [self.scalings[i] for i in indices]
            common = max(set(values), key=values.count)
            self._devices.append((device, common, [i for i in indices if self.scalings[i] == common],
                                  [i for i in indices if self.scalings[i] != common]))
        self._handles: list[RemovableHandle] = [root.register_forward_pre_hook(self._refresh_hook)]
        with torch.no_grad():
            self.refresh()  # a layer called outside the model's forward still sees omega's current values

    def _refresh_hook(self, module: nn.Module, args: tuple) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Write `omega_i * scaling_i` into every layer's scaling, as autograd-tracked 0-d tensors.

        `aten.mul.Scalar` saves its factor as a number, not a tensor, and unbind and the device copy save no
        tensors: with reentrant gradient checkpointing every checkpointed segment back-propagates through these
        nodes again, which works only because nothing in them is freed after the first pass.
        """
        name, layers = self.adapter_name, self.layers
        for device, common, same, others in self._devices:
            omega = self.omega if device == self.omega.device else self.omega.to(device)
            gates = torch.ops.aten.mul.Scalar(omega, common).unbind(0)
            for index in same:
                layers[index].scaling[name] = gates[index]
            if others:
                entries = omega.unbind(0)
                for index in others:
                    layers[index].scaling[name] = torch.ops.aten.mul.Scalar(entries[index], self.scalings[index])

    def remove(self) -> None:
        """Take the gates off (every layer gets its float scaling back) and omega off the model: plain LoRA again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer, scaling in zip(self.layers, self.scalings):
            if self.adapter_name in layer.scaling:
                layer.scaling[self.adapter_name] = scaling
        delattr(self.owner, OMEGA_PARAMETER_NAME)
