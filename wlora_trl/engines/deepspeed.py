"""The DeepSpeed ZeRO engine (stages 2 and 3), in mask mode: how the switch reaches a ZeRO parameter and its
optimizer.

ZeRO keeps up to three copies of a trainable parameter, and a write at the switch must reach each of them:
- the working copy the forward uses: partitioned under ZeRO-3 (each rank holds a slice; `GatheredParameters(...,
  modifier_rank=0)` gathers it and re-partitions rank 0's edit on exit), whole on every rank under ZeRO-2;
- the fp32 master copy in the optimizer (partitioned in both stages), written with `safe_set_full_fp32_param`; ZeRO
  copies the master over the working copy after every step, so an edit of the working copy alone would be undone;
- the optimizer state (Adam's moments), written with `safe_set_full_optimizer_state`.
Those functions do nothing for a parameter whose `requires_grad` is False, which the switch sets on dropped adapters,
so they are called with the parameter briefly trainable again: ZeRO still holds it (nothing leaves its optimizer after
`deepspeed.initialize`, DeepSpeed issue 5639).

What ZeRO then does with a dropped adapter (checked with 2 gloo processes, both stages): its layer no longer calls it,
so it gets no gradient, and ZeRO-3 uses zeros for the gradient of a parameter with requires_grad False (one still
marked trainable would keep its last gradient in ZeRO-3's buffer and drift); with zero weights, zero moments and
decoupled weight decay, Adam keeps it at zero. So a dropped adapter still costs its partitioned memory (working copy,
master, moments) and its share of the optimizer's elementwise step, but no compute and, with its layer's external
parameter registration undone (`switched_off`), no gathering: its module never runs. Except under ZeRO-3's default
`stage3_param_persistence_threshold`, below which every LoRA matrix of usual sizes falls: such parameters stay whole on
every rank and are all-gathered after every optimizer step, the dropped ones too (`benchmarks/deepspeed_cost.py`).

Adam's step count lives in the state of a flat fp32 partition (one per parameter group), not per parameter, so ZeRO
cannot give a re-initialised adapter the fresh count of the one-process switch (new parameters, new state). When
every parameter of a group starts afresh or is dropped (the usual case: only LoRA weights train), the whole group's
state is reset, count included: exactly the one-process run. The trainers keep the adapters in parameter groups of
their own for that (`separate_adapter_groups`); a group shared with other trained parameters (a DeepSpeed-config
optimizer with `modules_to_save`) keeps its count, and the kept adapters' first steps are then smaller (Adam's bias
correction), with a warning.

A custom loop does what the trainers' `ZeroEngine` does (`benchmarks/deepspeed_cost.py` runs this):

    weight_lora = WeightLoraModel(model, max_steps=1000, mask_mode=True)  # before deepspeed.initialize
    weight_lora.parameter_access = ZeroParameterAccess()
    optimizer = torch.optim.AdamW(weight_lora.trainable_parameters(), lr=2e-4)  # adapters only: one group
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    for step in range(1, 1001):              # ds_config: ZeRO stage 2 or 3, "zero_allow_untested_optimizer": true
        engine.backward(engine(**next(batches)).loss)
        engine.step()
        weight_lora.omega_step()             # omega's gradient is averaged over the ranks here; no-op after T
        if step == weight_lora.selection_steps:
            weight_lora.switch(optimizer)
    weight_lora.save_adapter("out")          # on every rank: gathers the kept adapters, rank 0 writes

Everything that reads ZeRO's internals (the ZeRO optimizer's parameter groups, flat partitions and ZeRO-3's gradient
positions) is in the last section of this module.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..state import RESUME_HINT, read_selection
from ..surgery import innermost_optimizer
from .access import ParameterAccess, full_shape
from .masked import MaskModeEngine

logger = logging.getLogger(__name__)

SUPPORTED_STAGES = (2, 3)


# --- which DeepSpeed setups mask mode supports ------------------------------------------------------------------------


def deepspeed_config_problem(config: Mapping[str, Any] | None, fp16: bool = False) -> str | None:
    """Why WeightLoRA cannot run with this DeepSpeed config (a dict, as DeepSpeed reads it), or None.

    - ZeRO stages 0 and 1 are refused: stage 0 keeps the parameters in a plain optimizer (the module-swap switch's
      setting, not ZeRO's), and stage 1 with bf16 uses another optimizer wrapper; neither is what was tested.
    - Offload to NVMe is refused (not checked: it swaps the optimizer state through files); offload to the CPU
      (`offload_optimizer` and `offload_param` with `device: cpu`) was checked with 2 processes: the same run as
      without it, resumes included.
    - fp16 is refused: the loss scale and the step skipped on an overflow live inside DeepSpeed's optimizer, which
      omega, kept outside the engine, cannot follow. bf16 needs neither.
    """
    if config is None:
        return None
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_STAGES:
        return (
            f"WeightLoRA under DeepSpeed runs ZeRO stage 2 or 3; this config has zero_optimization.stage={stage!r}. "
            "Set it to 2 or 3 (the packaged `wlora-trl config-path zero2` / `zero3`)."
        )
    offloaded = [
        f"zero_optimization.{key}.device={(zero.get(key) or {}).get('device')!r}"
        for key in ("offload_optimizer", "offload_param")
        if str((zero.get(key) or {}).get("device", "none")).lower() not in ("none", "", "cpu")
    ]
    if offloaded:
        return (
            f"WeightLoRA does not support DeepSpeed offload to NVMe ({', '.join(offloaded)}): the switch at step T "
            "edits the optimizer's state in place, which was checked without offload and with offload to the CPU "
            "only. Set the offload devices to 'cpu' or 'none' (offload_optimizer_device / offload_param_device in an "
            "accelerate config). Or select on one GPU with a 4-bit base (`wlora-trl select`), then train "
            "lora_config_from_selection(dir) with stock TRL under any DeepSpeed setting (README: 'Past one GPU')."
        )
    fp16_config = (config.get("fp16") or {}).get("enabled", False)
    if fp16 or fp16_config is True:
        return (
            "WeightLoRA under DeepSpeed does not support fp16: DeepSpeed scales the loss and skips steps on overflow "
            "inside its optimizer, which omega (updated outside the engine) cannot follow. Use bf16 (bf16=True, or "
            "mixed_precision: bf16 in the accelerate config), or fp32."
        )
    return None


def check_deepspeed_args(args: Any) -> None:
    """Refuse a DeepSpeed setup the training arguments carry, before any model is built: TrainingArguments turns
    `deepspeed=` (a dict or a JSON path), and accelerate's DeepSpeed launch, into a `deepspeed_plugin`."""
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        check_deepspeed_plugin(plugin, fp16=bool(getattr(args, "fp16", False)))


def check_deepspeed_plugin(plugin: Any, fp16: bool = False) -> None:
    """Refuse the DeepSpeed config accelerate's plugin holds (the config the engine will read)."""
    problem = deepspeed_config_problem(getattr(plugin, "deepspeed_config", None), fp16=fp16)
    if problem:
        raise ValueError(problem)


# --- the switch's writes ---------------------------------------------------------------------------------------------


class ZeroParameterAccess(ParameterAccess):
    """Mask mode's reads and writes for DeepSpeed ZeRO-2 and ZeRO-3 (see the module docstring). Reads give the fp32
    master where ZeRO's optimizer holds the parameter (the trained value at full precision, also under bf16), else
    the gathered working copy. Works before `deepspeed.initialize` too (then every parameter is a plain tensor, or
    a ZeRO-3 partition from `zero.Init` loading, without a master). Reads and writes are collectives."""

    def read(self, parameter: torch.Tensor) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        if held_by_zero_optimizer(parameter):
            with _trainable(parameter):
                return safe_get_full_fp32_param(parameter).reshape(full_shape(parameter))
        if is_partitioned(parameter):
            import deepspeed

            with deepspeed.zero.GatheredParameters([parameter]):
                return parameter.detach().clone()
        return parameter.detach()

    @torch.no_grad()
    def write(self, parameter: torch.Tensor, full: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        if is_partitioned(parameter):
            import deepspeed

            # Every rank holds the same `full` (a seeded stream), so every rank writes it; rank 0's is broadcast.
            with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
                parameter.data.copy_(full.reshape(parameter.shape).to(parameter.device, parameter.dtype))
        else:
            parameter.data.copy_(full.to(parameter.device, parameter.dtype))
        if held_by_zero_optimizer(parameter):
            with _trainable(parameter):
                safe_set_full_fp32_param(parameter, full.to(torch.float32))

    def switched_off(self, layer: nn.Module, parameters: list[nn.Parameter]) -> None:
        """ZeRO-3 registers a parameter read outside its own module's forward as an "external parameter" of the
        module that read it, and gathers it before that module runs from then on. PEFT's LoRA layer reads
        `lora_A.weight.dtype` in its forward, so during the warm-up every lora_A became an external parameter of
        its layer, and a dropped adapter's A would still be gathered at every forward and backward of its (still
        running) layer, unused (measured: `benchmarks/deepspeed_cost.py`). Unregister them."""
        from deepspeed.runtime.zero.partition_parameters import unregister_external_parameter

        for module in layer.modules():
            external = getattr(module, "_external_params", None) or {}
            for param in parameters:
                if id(param) in external:
                    unregister_external_parameter(module, param)

    @torch.no_grad()
    def edit_optimizer(self, optimizer: Any, replacements: Mapping[int, list[nn.Parameter]]) -> None:
        """Nothing can leave ZeRO's optimizer; what the switch needs is that each replaced parameter (dropped, or
        re-initialised in place) continues from an empty optimizer state. Per flat partition: when all its parameters
        are replaced, its whole state is reset (moments and step count); otherwise the replaced ones' moments are
        zeroed and the count stays."""
        from deepspeed.utils import safe_set_full_optimizer_state

        zero = zero_optimizer(optimizer)
        shared = []
        for params, flat in zero_partitions(zero):
            replaced = [p for p in params if id(p) in replacements]
            state = zero.optimizer.state.get(flat)
            if not replaced or not state:
                continue  # nothing to forget, or no step taken yet (the state is created empty at the first step)
            if len(replaced) == len(params):
                for key, value in state.items():
                    if torch.is_tensor(value):
                        value.zero_()
                    elif isinstance(value, (int, float)):
                        state[key] = type(value)(0)
                continue
            elementwise = [k for k, v in state.items() if torch.is_tensor(v) and v.numel() == flat.numel()]
            for param in replaced:
                with _trainable(param):
                    for key in elementwise:
                        safe_set_full_optimizer_state(param, torch.zeros(full_shape(param), device=flat.device), key)
            if any(replacements[id(p)] for p in replaced):
                shared.append(len(params) - len(replaced))
        if shared:
            logger.warning(
                "WeightLoRA under DeepSpeed: the re-initialised adapters share an optimizer parameter group with %d "
                "other trained parameters, so they continue with that group's Adam step count (their moments are "
                "fresh): their first steps after the switch are smaller than a one-process run's. The trainers' own "
                "optimizer keeps adapters in groups of their own; this happens with an optimizer from the DeepSpeed "
                "config.",
                sum(shared),
            )


def separate_adapter_groups(optimizer: torch.optim.Optimizer, adapter_parameters: list[nn.Parameter]) -> None:
    """Split each parameter group of a fresh optimizer (no step taken) into the selectable adapters' parameters and
    the others (a classifier head, biases), same hyperparameters: ZeRO keeps one flat partition, with one Adam step
    count, per group, and the switch can reset an adapters-only group exactly (see the module docstring)."""
    adapters = {id(p) for p in adapter_parameters}
    groups = []
    for group in optimizer.param_groups:
        mine = [p for p in group["params"] if id(p) in adapters]
        others = [p for p in group["params"] if id(p) not in adapters]
        groups.extend({**group, "params": params} for params in (mine, others) if params)
    optimizer.param_groups[:] = groups


# --- the engine ---------------------------------------------------------------------------------------------------


class ZeroEngine(MaskModeEngine):
    """DeepSpeed ZeRO-2 / ZeRO-3 in the trainers (`deepspeed=` in the arguments, or accelerate's zero2/zero3 configs):
    mask mode through `ZeroParameterAccess`; the adapters in optimizer groups of their own; omega's step after
    DeepSpeed's own, which accelerate runs inside the backward; resuming through DeepSpeed's checkpoint files."""

    name = "DeepSpeed ZeRO"
    shards_parameters = True
    checkpoint_holds_warmup_weights = True
    steps_in_backward = True

    def __init__(self) -> None:
        super().__init__()
        self.parameter_access = ZeroParameterAccess()

    @classmethod
    def check_arguments(cls, args: Any) -> None:
        check_deepspeed_args(args)  # ZeRO stage, offload, fp16

    @classmethod
    def detect(cls, trainer: Any) -> bool:
        return bool(trainer.is_deepspeed_enabled)

    def setup(self, trainer: Any) -> None:
        check_deepspeed_plugin(trainer.accelerator.state.deepspeed_plugin)  # the config the engine will run
        logger.info(
            "WeightLoRA under DeepSpeed ZeRO: the switch runs in mask mode (dropped adapters are zeroed, with their "
            "fp32 masters and Adam moments, and switched off; they keep their partitioned memory), and save_model "
            "gathers the kept adapters only."
        )

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, weight_lora: Any) -> None:
        """The optimizer DeepSpeed will wrap (omega is not a model parameter in mask mode). ZeRO steps it once per
        sub-group, so omega's step cannot hang on it (it follows in the training step). Adapters get parameter groups
        of their own, so the switch can start their Adam state afresh exactly."""
        separate_adapter_groups(innermost_optimizer(optimizer), weight_lora.adapter_parameters())

    def step_skipped(self, trainer: Any) -> torch.Tensor | None:
        """accelerate ran DeepSpeed's optimizer step inside the backward, from this step's gradients; omega's step
        follows from the same gradients (DeepSpeed neither clips nor scales omega's), unless DeepSpeed skipped its."""
        return None if trainer.model_wrapped.was_step_applied() else torch.tensor(True)

    def after_optimizer_loaded(self, trainer: Any, checkpoint: str) -> None:
        """Resuming: under DeepSpeed the Trainer never calls `_load_from_checkpoint` (`load_checkpoint`); it builds the engine from a fresh model (every adapter trainable, as the original
        run started, so ZeRO's flat partitions match the checkpoint's), loads DeepSpeed's files into it and then comes
        here. Replay the selection: before T, omega; after T the switch, whose writes (re-initialised adapters, fresh
        optimizer state) DeepSpeed's files then overwrite, loaded once more."""
        from transformers.integrations.deepspeed import deepspeed_load_checkpoint

        weight_lora = trainer.weight_lora
        weight_lora.restore(read_selection(checkpoint, hint=RESUME_HINT), trainer.optimizer)
        if weight_lora.switched:
            deepspeed_load_checkpoint(trainer.model_wrapped, checkpoint, load_module_strict=False)


# --- DeepSpeed's internals: every reliance on them is here ------------------------------------------------------------


def is_partitioned(parameter: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (`ds_id`, set by `zero.Init` or `deepspeed.initialize`): its own storage is its local
    partition, empty outside a gather unless it is small enough to persist whole."""
    return hasattr(parameter, "ds_id")


def held_by_zero_optimizer(parameter: torch.Tensor) -> bool:
    """Whether ZeRO's optimizer holds a master copy of `parameter` (it was trainable at `deepspeed.initialize`).
    ZeRO-3 links every module parameter to its optimizer (`_z3_optimizer`) and knows where each trained one sits in
    its flat partitions (`grad_position`); ZeRO-2 maps each of its parameters onto them (`_hp_mapping`, None on the
    ranks that do not own a fragment of it, absent for parameters it does not hold)."""
    if is_partitioned(parameter):
        owner = getattr(parameter, "_z3_optimizer", None)
        return owner is not None and owner.get_param_id(parameter) in owner.grad_position
    return hasattr(parameter, "_hp_mapping")


def zero_optimizer(optimizer: Any) -> Any:
    """The ZeRO optimizer under accelerate's wrapper (`.optimizer` links), or the argument itself."""
    seen = optimizer
    while seen is not None and not _is_zero_optimizer(seen):
        seen = getattr(seen, "optimizer", None)
    if seen is None:
        raise TypeError(
            f"WeightLoRA under DeepSpeed expected the engine's ZeRO optimizer, got a {type(optimizer).__name__}. The "
            "switch must edit the optimizer that deepspeed.initialize returned."
        )
    return seen


def zero_partitions(zero: Any) -> list[tuple[list[nn.Parameter], torch.Tensor]]:
    """(model parameters, the flat fp32 partition holding them on this rank) per ZeRO parameter group: ZeRO-3's
    sub-groups (`fp16_groups`, `fp32_partitioned_groups_flat`), ZeRO-2's groups (`bit16_groups`,
    `single_partition_of_fp32_groups`). The flat tensors key the inner torch optimizer's state."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return list(zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat))
    return list(zip(zero.bit16_groups, zero.single_partition_of_fp32_groups))


def _is_zero_optimizer(candidate: Any) -> bool:
    return hasattr(candidate, "fp32_partitioned_groups_flat") or hasattr(candidate, "single_partition_of_fp32_groups")


@contextlib.contextmanager
def _trainable(parameter: torch.Tensor):
    """DeepSpeed's safe_get/set functions skip parameters with requires_grad False; ZeRO still holds them."""
    previous = parameter.requires_grad
    parameter.requires_grad_(True)
    try:
        yield
    finally:
        parameter.requires_grad_(previous)
