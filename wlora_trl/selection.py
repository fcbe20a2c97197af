"""omega, its gates on the LoRA adapters, and the StoIHT step that trains it.

`OmegaGates` gives each selectable unit (`wlora_trl.units`) its omega and asks the unit to gate itself; what follows
is the gate of a linear adapter (an experts block's is `units.OmegaGatedParamWrapper`, on B).

During the selection phase adapter i computes `scaling * B((omega_i * A)(dropout(x)))`, which is the paper's
`omega_i * scaling * B(A(dropout(x)))`. The gate scales the weight of `lora_A` (r x in_features), not an activation:
for the warm-up each `lora_A` becomes an `OmegaGatedLinear` (a class swap on the same module object, so its
parameters, state-dict keys and everything PEFT saves stay as they were), whose forward is
`linear(x, A * omega_i)`. Why there:
- memory: nothing token-sized is saved for omega's gradient; the weight is a parameter anyway. Gating the adapter's
  output instead (PEFT's `scaling`, tried first) kept every adapter's out_features-wide output alive for the
  backward: +5.4 GB at Llama-3-8B shapes and 2048 tokens (benchmarks/results, H200).
- precision: A is fp32 (PEFT keeps adapters fp32 on bf16/fp16 bases), so `A * omega_i` is exact in fp32, and
  omega's gradient `<A, dL/d(A omega_i)>` is reduced in fp32 from fp32 weight gradients: no bf16 rounding of omega,
  no fp16 overflow where the LoRA gradients themselves do not overflow.
- cost: one multiply on a small tensor per adapter, whatever the number of tokens, no per-call Python hook (v0.1
  hooked every `lora_A`: 8-20% slower warm-up steps where Python overhead shows; `benchmarks/speed.py` keeps that
  gate as its `warmup_hooks` variant).
omega is n fp32 0-d parameters, one per adapter, registered on the `PeftModel`
itself as the `nn.ParameterList` `selection_omega`, not on a tuner layer, so PEFT's adapter file never contains
them (PEFT saves tuner-layer parameters whose names contain "lora_"), while DDP sees them as model parameters and
all-reduces their gradients. In mask mode (FSDP2) omega is not registered at all: `fully_shard` would otherwise shard
it or need it in `ignored_params`, and accelerate's rank-0 loading cannot load ignored parameters; mask mode
averages omega's gradient itself.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

# Name of omega's ParameterList on the PeftModel. It must not contain "lora_", or PEFT would save omega.
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


class OmegaGatedLinear(nn.Linear):
    """`lora_A` of one adapter during the warm-up: `linear(x, A * omega_i)`.

    Only ever made by swapping the class of an existing `nn.Linear` (and swapped back at the switch): same object,
    same parameters. Its omega entry (`omega_gate`, a 0-d parameter registered on the PeftModel) sits in the
    instance `__dict__`, not in `_parameters`, so the adapter's state dict never contains it.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, omega = self.weight, self.__dict__["omega_gate"]
        if weight.dtype == torch.float32:
            return F.linear(input, weight * omega, self.bias)
        # A low-precision A (FSDP2's mixed-precision all-gather, adapters cast to bf16): the product is rounded to
        # A's dtype as before, but omega's gradient, <A, dL/d(A omega)>, is then reduced in fp32, not in bf16.
        return F.linear(input, (weight.float() * omega).to(weight.dtype), self.bias)


class DetachedOmegaGatedLinear(OmegaGatedLinear):
    """The gate of mask mode, whose omega is not a parameter of the model (so FSDP2 neither shards it nor loads it,
    and `fully_shard` needs no `ignored_params`): omega follows its adapter to wherever sharding or `.to()` put it."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        omega = self.__dict__["omega_gate"]
        if omega.device != self.weight.device:
            omega.data = omega.data.to(self.weight.device)  # same Parameter object: the gates keep it
        return super().forward(input)


def gate_lora_a(module: nn.Linear, omega: nn.Parameter, detached: bool) -> None:
    """Put the gate on one adapter's `lora_A` (a class swap: same object, same parameters)."""
    if type(module) is not nn.Linear:
        raise TypeError(f"WeightLoRA gates plain nn.Linear lora_A modules; this model's is a {type(module).__name__}.")
    module.__class__ = DetachedOmegaGatedLinear if detached else OmegaGatedLinear
    module.__dict__["omega_gate"] = omega


def ungate_lora_a(module: nn.Linear) -> None:
    module.__class__ = nn.Linear
    module.__dict__.pop("omega_gate", None)


class OmegaGates:
    """omega (ones at start) and its gates on each selectable unit, in unit order (`wlora_trl.units`: a linear
    adapter is gated on its `lora_A`, an experts block on its wrappers' `lora_B`).

    Each unit's omega_i is a 0-d fp32 parameter of its own on its adapter's device: a model spread over devices
    needs no copies in the forward, and each omega_i is used in one unit only (an experts block's two wrappers sit
    in one decoder layer), so with reentrant gradient checkpointing under DDP its gradient is accumulated once per
    backward (one omega vector used in every checkpointed layer is "marked ready twice"). The StoIHT step works on
    the whole vector: `values` stacks the parameters (one kernel per device), `assign` writes them back (one foreach
    copy per device). The parameters are only ever read and written through their objects, so `.to()`, DDP's
    broadcasts or a checkpoint load, which may replace a parameter's storage, cannot detach omega from its gates.
    """

    def __init__(
        self, owner: nn.Module, base: nn.Module, units: list, adapter_name: str, register: bool = True
    ) -> None:
        self.owner = owner if register else None
        self.base = base
        self.units = list(units)
        self.adapter_name = adapter_name
        # On the CPU for an adapter still on the meta device (a rank that loads its weights later); a detached omega
        # follows its adapter at the first forward.
        self.parameters = nn.ParameterList(
            [
                nn.Parameter(torch.ones((), dtype=torch.float32, device=_real(unit.device(base, adapter_name))))
                for unit in self.units
            ]
        )
        if register:
            owner.add_module(OMEGA_PARAMETER_NAME, self.parameters)
        for unit, parameter in zip(self.units, self.parameters):
            unit.gate(base, adapter_name, parameter, detached=not register)

    @property
    def device(self) -> torch.device:
        """Where the whole vector lives for the StoIHT step: the first adapter's omega."""
        return self.parameters[0].device

    def _by_device(self) -> dict[torch.device, list[int]]:
        groups: dict[torch.device, list[int]] = defaultdict(list)
        for index, parameter in enumerate(self.parameters):
            groups[parameter.device].append(index)
        return groups

    @property
    def values(self) -> torch.Tensor:
        """omega in adapter order, as a new fp32 vector on `device`."""
        with torch.no_grad():
            return torch.stack([p.to(self.device) for p in self.parameters])

    @torch.no_grad()
    def assign(self, values: torch.Tensor) -> None:
        """Write omega (adapter order) into the per-adapter parameters."""
        values = values.to(self.device, torch.float32)
        for device, indices in self._by_device().items():
            sources = values[torch.tensor(indices, device=values.device)].to(device).unbind(0)
            torch._foreach_copy_([self.parameters[i] for i in indices], list(sources))

    def take_grad(self) -> torch.Tensor | None:
        """omega's accumulated gradient in adapter order (on `device`), taken off the parameters; None if none has
        one. An adapter unused in this step contributes a zero."""
        grads = [p.grad for p in self.parameters]
        if all(g is None for g in grads):
            return None
        for p in self.parameters:
            p.grad = None
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        return torch.stack([zero if g is None else g.to(self.device) for g in grads])

    def remove(self) -> None:
        """Take the gates off (every unit computes plain LoRA again) and omega off the model."""
        for unit in self.units:
            unit.ungate(self.base, self.adapter_name)
        if self.owner is not None:
            delattr(self.owner, OMEGA_PARAMETER_NAME)


def _real(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "meta" else device
