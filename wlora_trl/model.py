"""`WeightLoraModel`: omega, its gates and the switch, attached to one `PeftModel`.

The trainers use it; so can any training loop (plain PyTorch, accelerate):

    model = get_peft_model(base_model, WeightLoraConfig(r=8, target_modules="all-linear"))
    weight_lora = WeightLoraModel(model, max_steps=1000)          # adds omega and its gates
    optimizer = torch.optim.AdamW(weight_lora.trainable_parameters(), lr=2e-4)   # everything but omega
    for step in range(1, 1001):
        loss = model(**next(batches)).loss
        loss.backward()
        weight_lora.omega_step()      # StoIHT on omega; a no-op after the switch
        optimizer.step()
        optimizer.zero_grad()
        if step == weight_lora.selection_steps:
            weight_lora.switch(optimizer)  # drop, re-initialise; edits the optimizer in place

Under FSDP2 (`fully_shard`), make it with `mask_mode=True` before sharding (omega is then not a model parameter):

    weight_lora = WeightLoraModel(model, max_steps=1000, mask_mode=True)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ...                                # the same loop; omega's gradient is all-reduced in omega_step
    weight_lora.save_adapter("out")    # on every rank: gathers the kept adapters, rank 0 writes a stock adapter

omega is never in the optimizer: it gets a plain SGD step of its own (Adam would normalise away the magnitudes
the ranking relies on) and is not touched by the LR schedule or by gradient clipping.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import weakref

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .config import WeightLoraConfig
from .engines.access import PLAIN_ACCESS, ParameterAccess, is_sharded
from .engines.collectives import all_reduce_mean, check_ranks_agree
from .masking import gathered_adapter_state_dict
from .selection import OUTCOMES, SKIPPED_NONFINITE, SKIPPED_WITH_OPTIMIZER, STEP_TAKEN, OmegaGates, stoiht_step
from .state import AdapterRecord, SelectionReport, switch_summary
from .surgery import retarget_optimizer, stock_lora_config
from .units import Unit, few, selectable_units

logger = logging.getLogger(__name__)


SWITCHED_MARK = "_weight_lora_switched"  # set on a PeftModel by the switch


class _OmegaOptimizerGuard:
    """A global optimizer step pre-hook, during the warm-up: an optimizer that holds omega is refused at its first
    step, before it updates anything (Adam on omega would normalise away the magnitudes the ranking relies on, and
    the optimizer would keep omega after the switch). Each optimizer is checked once."""

    def __init__(self, weight_lora: WeightLoraModel) -> None:
        self._weight_lora = weakref.ref(weight_lora)
        self._checked: weakref.WeakSet = weakref.WeakSet()
        self._handle = register_optimizer_step_pre_hook(self)

    def __call__(self, optimizer, args, kwargs) -> None:
        weight_lora = self._weight_lora()
        if weight_lora is None or weight_lora.gates is None:
            return  # removing a hook while torch iterates over them is an error; the switch removes it
        if optimizer in self._checked:
            return
        self._checked.add(optimizer)
        omega = {id(p) for p in weight_lora.omega_parameters()}
        if any(id(p) in omega for group in optimizer.param_groups for p in group["params"]):
            raise ValueError(
                f"This {type(optimizer).__name__} holds WeightLoRA's omega, which WeightLoRA updates itself (StoIHT, "
                "by SGD). Build the optimizer from weight_lora.trainable_parameters() instead of model.parameters()."
            )

    def remove(self) -> None:
        self._handle.remove()


def trained_adapter(model: PeftModel) -> str:
    """The adapter WeightLoRA selects within: the model's one active adapter, made from a `WeightLoraConfig`.

    Other adapters may stay when they are inactive and frozen, and made either from another config class (a frozen
    LoRA someone keeps for comparison) or from the trained adapter's own config object: that is how TRL's DPO and
    GRPO trainers add their reference policy to a PeftModel (`model.add_adapter("ref", model.peft_config["default"])`,
    weights copied). WeightLoRA leaves them alone: not counted in n, not gated, not dropped, not exported. Refused as
    ambiguous: several active adapters, another adapter that trains, another adapter with a WeightLoraConfig of its
    own (two selections were probably meant).
    """
    names = sorted(model.peft_config)
    if len(names) == 1:
        trained = names[0]
    else:
        active = list(model.active_adapters)
        if len(active) != 1:
            raise ValueError(
                f"The model has {len(names)} adapters ({names}) and {len(active)} of them are active ({active}); "
                "WeightLoRA selects within the one adapter that trains. Activate one (model.set_adapter(name)) and "
                "delete the others (model.delete_adapter(name)) or freeze them."
            )
        (trained,) = active
    config = model.peft_config[trained]
    if not isinstance(config, WeightLoraConfig):
        others = [name for name in names if isinstance(model.peft_config[name], WeightLoraConfig)]
        hint = (
            f" The WeightLoraConfig adapter {others[0]!r} is not active: model.set_adapter({others[0]!r})."
            if others
            else ""
        )
        raise TypeError(
            f"The adapter {trained!r} was made from {type(config).__name__}; use wlora_trl.WeightLoraConfig (a "
            f"drop-in for peft.LoraConfig) so WeightLoRA knows K and T.{hint}"
        )
    for other in names:
        if other == trained:
            continue
        training = [p for p in peft_adapter_parameters(model, other) if p.requires_grad]
        if training:
            raise ValueError(
                f"The model has {len(names)} adapters ({names}); WeightLoRA selects within the active one, "
                f"{trained!r}, but {other!r} trains too ({len(training)} of its parameters require grad), outside the "
                f"selection. Freeze it (requires_grad_(False) on its parameters) or delete it "
                f"(model.delete_adapter({other!r}))."
            )
        if isinstance(model.peft_config[other], WeightLoraConfig) and model.peft_config[other] is not config:
            raise ValueError(
                f"The model has {len(names)} adapters ({names}); WeightLoRA selects within a single adapter, the "
                f"active {trained!r}, but {other!r} has a WeightLoraConfig of its own, as if it were to be selected "
                f"too. Delete it (model.delete_adapter({other!r})). A frozen adapter that should stay, such as a "
                "reference policy, is made from a peft.LoraConfig, or from the trained adapter's own config as TRL's "
                f"DPO and GRPO trainers do (model.add_adapter(name, model.peft_config[{trained!r}]))."
            )
    return trained


def peft_adapter_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """Every parameter PEFT holds for `adapter_name`: its LoRA weights and its `modules_to_save` copies."""
    found: list[nn.Parameter] = []
    for module in model.modules():
        if not isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            continue
        for attribute in module.adapter_layer_names:
            container = module
            for part in attribute.split("."):  # e.g. "token_adapter.trainable_tokens_delta"
                container = getattr(container, part, None)
            if container is not None and adapter_name in container:
                item = container[adapter_name]
                found.extend(item.parameters() if isinstance(item, nn.Module) else [item])
    return found


class WeightLoraModel:
    """Owns WeightLoRA's state for a `PeftModel` whose adapter was made from a `WeightLoraConfig`.

    WeightLoRA selects within the model's active adapter (`trained_adapter` says which other adapters may stay).

    Adapter i (the i-th LoRA module in `model.named_modules()` order) is gated by `omega[i]`. Pass `max_steps`
    (or call `set_max_steps`) when `selection_steps` is a fraction.

    `mask_mode=True` keeps the model's structure fixed, as FSDP2 needs (`wlora_trl.masking`): the switch zeroes,
    freezes and switches off the dropped adapters instead of removing them, re-initialises the kept ones in place,
    and WeightLoRA+ adapters are allocated at rank 2r from the start (the extra half held at zero until the
    switch). omega is kept outside the model (FSDP2 neither shards nor reduces it) and its gradient is averaged over
    the processes here. Construct it before the model is sharded; export with `save_adapter`.

    `parameter_access` is how mask mode reads and writes the parameters (`wlora_trl.engines.access.ParameterAccess`:
    plain tensors and FSDP2's DTensors); under DeepSpeed ZeRO set it to
    `wlora_trl.engines.deepspeed.ZeroParameterAccess()` (the trainers take it from their engine).
    """

    parameter_access: ParameterAccess = PLAIN_ACCESS

    def __init__(self, model: PeftModel, max_steps: int | None = None, mask_mode: bool = False) -> None:
        if getattr(model, SWITCHED_MARK, False):
            raise ValueError(
                "This model went through WeightLoRA's switch already: it is plain LoRA on the kept adapters now (its "
                "adapter config is a stock LoraConfig). Train it further with a stock Trainer/SFTTrainer, or start a "
                "new selection from the base model."
            )
        if not isinstance(model, PeftModel):
            raise TypeError(
                f"WeightLoraModel needs a peft.PeftModel, got {type(model).__name__}. Wrap the model first: "
                "get_peft_model(model, WeightLoraConfig(...))."
            )
        self.adapter_name = trained_adapter(model)
        config = model.peft_config[self.adapter_name]
        # Frozen adapters beside the trained one (TRL's reference copy, "ref"): never counted, gated, dropped or saved.
        self.other_adapters = tuple(sorted(name for name in model.peft_config if name != self.adapter_name))
        if mask_mode and self.other_adapters:
            raise ValueError(
                f"The model holds frozen adapters besides the trained one ({list(self.other_adapters)}, e.g. the "
                "reference copy TRL's DPO and GRPO trainers add to a PeftModel), which mask mode (FSDP2) does not "
                "support: its switch turns dropped layers off in place, theirs included. Pass a plain model with "
                "peft_config= instead (the trainers then use the base model, adapters disabled, as the reference), "
                "or a ref_model, or delete them (model.delete_adapter(name))."
            )
        self.model = model
        self.config: WeightLoraConfig = config
        self.base = model.base_model.model  # PEFT's module names (target_modules) are relative to this
        units = selectable_units(self.base, self.adapter_name)
        if not units:
            raise ValueError(
                "The model has no LoRA layers on linear modules or on parameters, so there is nothing to select. Check "
                "target_modules (e.g. target_modules='all-linear')."
            )
        # The selectable units (`wlora_trl.units`), in module order: unit i is gated by omega[i]. A linear adapter, or
        # an experts block / router of a mixture-of-experts model (LoRA on its parameters).
        self.units: list[Unit] = units
        self.module_names = [unit.name for unit in units]
        self._units_by_name = {unit.name: unit for unit in units}
        self.num_adapters = len(units)
        # Each unit's rank during the warm-up (mask mode's WeightLoRA+ allocates 2r, computes r).
        self.warmup_ranks = {unit.name: unit.warmup_rank for unit in units}
        sharded = [u.name for u in units if any(map(is_sharded, u.parameters(self.base, self.adapter_name)))]
        if sharded:
            raise ValueError(
                f"The adapters are sharded already ({few(sharded)}): make the WeightLoraModel (with mask_mode=True) "
                "before fully_shard."
            )
        self.mask_mode = mask_mode
        if mask_mode and config.plus:
            for unit in units:
                unit.preallocate_double_rank(self.base, self.adapter_name, config)
        self.k = config.resolve_k(self.num_adapters)
        self.selection_steps: int | None = None
        self.switched = False
        self.adapters: list[AdapterRecord] | None = None  # filled by the switch
        self.gates: OmegaGates | None = None
        self._outcome_counts: torch.Tensor | None = None  # per outcome code of the StoIHT step, on omega's device
        self._restored_counts = [0] * len(OUTCOMES)  # from a checkpoint
        if config.selection == "stoiht":
            # Mask mode: omega outside the model, so FSDP2 leaves it alone (see selection.py).
            self.gates = OmegaGates(model, self.base, units, self.adapter_name, register=not mask_mode)
            self._outcome_counts = torch.zeros(len(OUTCOMES), dtype=torch.int64, device=self.omega.device)
            self._optimizer_guard = _OmegaOptimizerGuard(self)
        if max_steps is not None:
            self.set_max_steps(max_steps)
        elif isinstance(config.selection_steps, int):
            self.selection_steps = config.selection_steps  # a count needs no max_steps (custom loops)

    # --- the selection phase --------------------------------------------------------------------------------

    @property
    def omega(self) -> torch.Tensor | None:
        """A copy of omega in adapter order, fp32 (None without omega or after the switch); `set_omega` writes it."""
        return self.gates.values if self.gates is not None else None

    def set_omega(self, values: torch.Tensor) -> None:
        """Overwrite omega (adapter order), e.g. to start the selection from other weights than ones."""
        if self.gates is None or self.switched:
            raise RuntimeError("WeightLoRA: there is no omega to set (random selection, or after the switch).")
        if tuple(values.shape) != (self.num_adapters,):
            raise ValueError(
                f"omega has {self.num_adapters} entries, one per adapter; got shape {tuple(values.shape)}."
            )
        self.gates.assign(values)

    def omega_parameters(self) -> list[nn.Parameter]:
        """The per-adapter omega parameters (what DDP sees); empty without omega or after the switch."""
        return list(self.gates.parameters) if self.gates is not None else []

    def set_max_steps(self, max_steps: int, run: str | None = None) -> int:
        """Resolve T for a run of `max_steps` optimizer steps (raises if the switch would never happen; `run` says
        in the message where the step count came from, e.g. an epoch-based run's epochs)."""
        self.selection_steps = self.config.resolve_selection_steps(max_steps, run=run)
        return self.selection_steps

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter except omega: what an optimizer should get."""
        omega = {id(p) for p in self.omega_parameters()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in omega]

    def take_omega_grad(self) -> torch.Tensor | None:
        """Take omega's accumulated gradient off its parameters (so no optimizer or clipping sees it) and return it
        as one vector in adapter order, or None if there is none."""
        if self.gates is None or self.switched:
            return None
        grad = self.gates.take_grad()
        if self.mask_mode and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Under FSDP2 omega is outside the sharding, so its gradient is this process's own: average it as the
            # sharded gradients are. Every rank joins the collective, with zeros if it had no gradient (skipped).
            if grad is None:
                grad = torch.zeros(self.num_adapters, dtype=torch.float32, device=self.gates.device)
            grad = all_reduce_mean(grad)
        return grad

    def omega_step(self, grad: torch.Tensor | None = None, skip: torch.Tensor | None = None) -> torch.Tensor | bool:
        """One StoIHT step: SGD on omega with `omega_lr`, then keep its K largest `|omega_i|`.

        Uses omega's accumulated gradient unless `grad` is given (the trainers pass the unscaled gradient they
        took before clipping); `skip` (a 0-d bool tensor such as a fused optimizer's `found_inf`) skips the step.
        Call once per optimizer step. The step is skipped when the gradient is missing, all zero (step 1: B = 0)
        or not finite, and it never runs after the switch (returns False). Returns whether omega changed, as a 0-d
        bool tensor: the step itself never waits for the GPU, reading the result does. `omega_steps` counts
        what became of every step.
        """
        if self.gates is None or self.switched:
            return False
        if self.selection_steps is None:
            raise ValueError(
                f"selection_steps={self.config.selection_steps} is a fraction of max_steps, which this WeightLoraModel "
                "was not given, so it would never know when to switch: WeightLoraModel(model, max_steps=N) or "
                "weight_lora.set_max_steps(N), or an int selection_steps."
            )
        if grad is None:
            grad = self.take_omega_grad()
        values = self.gates.values
        code = stoiht_step(values, grad, self.config.omega_lr, self.k, skip=skip)
        self.gates.assign(values)
        if self._outcome_counts.device != code.device:  # mask mode's omega moved to its adapters' device
            self._outcome_counts = self._outcome_counts.to(code.device)
        self._outcome_counts.index_add_(0, code.reshape(1), torch.ones_like(code).reshape(1))
        return code == STEP_TAKEN

    def skip_omega_step(self) -> None:
        """Record a step that the optimizer skipped without stepping (fp16 GradScaler overflow); omega is left alone."""
        if self.omega is not None and not self.switched:
            self._outcome_counts[SKIPPED_WITH_OPTIMIZER] += 1

    @property
    def omega_steps(self) -> dict[str, int]:
        """What became of each StoIHT step so far: taken, or skipped for a missing or all-zero gradient (step 1),
        a non-finite one, or with the optimizer step (fp16 GradScaler). Reading it waits for the GPU."""
        counts = self._outcome_counts.tolist() if self._outcome_counts is not None else [0] * len(OUTCOMES)
        return {name: restored + count for name, restored, count in zip(OUTCOMES, self._restored_counts, counts)}

    # --- the switch ------------------------------------------------------------------------------------------

    def select(self, seed: int = 0) -> list[int]:
        """Indices of the K adapters to keep: nonzero omega (ties by index), or K random ones."""
        if self.omega is None:
            return sorted(random.Random(seed).sample(range(self.num_adapters), self.k))
        omega = self.omega.detach()
        if bool(omega.eq(1).all()):
            logger.warning(
                "WeightLoRA: omega never moved during the %s selection steps (no gradient reached it), so the "
                "kept adapters are simply the first %d by index. Check that the adapters are trained.",
                self.selection_steps,
                self.k,
            )
        order = torch.sort(omega.abs(), descending=True, stable=True).indices
        return sorted(order[: self.k].tolist())

    @torch.no_grad()
    def switch(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        seed: int = 0,
        kept: list[int] | None = None,
        announce: bool = True,
    ) -> list[AdapterRecord]:
        """Freeze the selection and turn the model into plain LoRA on the kept adapters.

        Dropped adapters become base layers; kept ones are re-initialised (or keep their weights with omega
        folded into B, `reinit=False`) at rank r, or 2r for WeightLoRA+. omega and its gates are removed and the
        adapter's config becomes a stock `LoraConfig`. With `optimizer`, it is edited in place to hold exactly
        the remaining trainable parameters. `seed` fixes the re-initialisation (and the random selection)
        without touching the global RNG; `kept` overrides the selection (used when resuming a checkpoint).
        `announce` logs the `summary()` line at INFO (the trainers print it themselves, on the main process).
        """
        if self.switched:
            raise RuntimeError("WeightLoRA: the switch already happened; the model is plain LoRA now.")
        if not self.mask_mode and any(is_sharded(p) for p in self.model.parameters()):
            raise RuntimeError(
                "WeightLoRA: the model is sharded (FSDP2), so the switch cannot remove or rebuild adapters. Make the "
                "WeightLoraModel with mask_mode=True, before fully_shard."
            )
        if self.mask_mode and kept is None:
            # Ranks that disagree would mask different adapters and then hang in the export's collectives: say why.
            check_ranks_agree(self.omega)
        kept = self.select(seed) if kept is None else sorted(kept)
        kept_set = set(kept)
        self._warn_about_nonfinite_steps()
        omega = self.omega.detach().tolist() if self.omega is not None else [None] * self.num_adapters
        if self.gates is not None:
            self.gates.remove()
            self.gates = None
            self._optimizer_guard.remove()

        cfg = self.config
        replacements: dict[int, list[nn.Parameter]] = {}
        infos, ranks = [], {}
        # A private, seeded RNG stream: the result depends on `seed` only, is the same on every DDP rank, and
        # training randomness after the switch (dropout, data order) is what it would have been without it. PEFT
        # initialises new adapters on the CPU and then moves them to their layer's device, so the CPU generator is
        # the only one to seed; `torch.manual_seed` would also reseed every GPU's generator, which `fork_rng` does
        # not restore here, and dropout after the switch would replay its masks from step 1.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            for index, unit in enumerate(self.units):
                name = unit.name
                if index not in kept_set:
                    # bias="lora_only": the layer's bias trained with its adapter; it is frozen with the adapter's
                    # removal (and exported as trained, see `bias_state_dict`), not left training on a plain layer.
                    replacements.update({id(p): [] for p in unit.freeze_bias(self.base, cfg.bias)})
                    if self.mask_mode:
                        dropped = unit.mask(self.base, self.adapter_name, self.parameter_access)
                        replacements.update({id(p): [] for p in dropped})
                    else:
                        replacements.update({id(p): [] for p in unit.parameters(self.base, self.adapter_name)})
                        unit.drop(self.base, self.adapter_name)
                    infos.append(unit.record(index, omega[index], False, 0))
                    continue
                factor = 1.0 if omega[index] is None else omega[index]
                rank = 2 * unit.warmup_rank if cfg.plus else unit.warmup_rank
                if self.mask_mode:
                    # The rank is final already (WeightLoRA+ was allocated at 2r); the parameters stay.
                    params = unit.reinit_in_place(
                        self.base,
                        self.adapter_name,
                        reinit=cfg.reinit,
                        omega=factor,
                        init_lora_weights=cfg.init_lora_weights,
                        access=self.parameter_access,
                    )
                    replacements.update({id(p): [p] for p in params})  # same place in the optimizer, fresh state
                else:
                    old_params = unit.parameters(self.base, self.adapter_name)
                    unit.rebuild(self.base, self.adapter_name, cfg, rank=rank, reinit=cfg.reinit, omega=factor)
                    for old, new in zip(old_params, unit.parameters(self.base, self.adapter_name)):
                        replacements[id(old)] = [new]
                ranks[name] = rank
                infos.append(unit.record(index, omega[index], True, rank))

        kept_units = [unit for unit in self.units if unit.name in ranks]
        self.model.peft_config[self.adapter_name] = stock_lora_config(cfg, kept_units, ranks)
        setattr(self.model, SWITCHED_MARK, True)
        if optimizer is not None:
            if self.mask_mode:
                self.parameter_access.edit_optimizer(optimizer, replacements)
            else:
                retarget_optimizer(optimizer, replacements)
        self.switched = True
        self.adapters = infos
        if announce:
            logger.info("WeightLoRA switch: %s", self.summary())
        logger.debug("WeightLoRA kept: %s", ", ".join(self.module_names[i] for i in kept))
        return infos

    def summary(self) -> str:
        """One line: 'kept 105 of 210 adapters (rank 8); per projection: q_proj 10/30, ...' (after the switch)."""
        return switch_summary(self.report())

    def _warn_about_nonfinite_steps(self) -> None:
        skipped = self.omega_steps[OUTCOMES[SKIPPED_NONFINITE]]
        if skipped:
            logger.warning(
                "WeightLoRA: %d of omega's StoIHT steps were skipped because its gradient was not finite (inf or nan). "
                "With fp16, bf16 or a lower initial loss scale avoids this; see omega_steps in selection.json.",
                skipped,
            )

    # --- state for checkpoints and reports -------------------------------------------------------------------

    def report(self, step: int | None = None) -> SelectionReport:
        """Everything about the selection (written as `selection.json`); omega as Python floats, which round-trip
        fp32 exactly."""
        if self.switched:
            adapters = self.adapters
        else:
            omega = self.omega.detach().tolist() if self.omega is not None else [None] * self.num_adapters
            adapters = [
                unit.record(i, omega[i], False, self.warmup_ranks[unit.name]) for i, unit in enumerate(self.units)
            ]
        cfg = self.config
        return SelectionReport(
            method="random" if cfg.selection == "random" else ("WeightLoRA+" if cfg.plus else "WeightLoRA"),
            adapter_name=self.adapter_name,
            n=self.num_adapters,
            k=self.k,
            selection_steps=self.selection_steps,
            switched=self.switched,
            switch_step=self.selection_steps + 1 if self.switched else None,  # the switch opens step T+1
            step=step,
            omega_lr=cfg.omega_lr,
            reinit=cfg.reinit,
            adapters=tuple(adapters),
            omega_steps=dict(self.omega_steps),
        )

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The function the adapters compute now, as the tensors of a stock PEFT adapter file (full, on the CPU):
        after the switch the kept adapters; during the warm-up every adapter, omega folded into B. Under FSDP2
        a collective (each adapter is all-gathered): call it on every rank."""
        if self.switched:
            kept = {a.module: a.rank for a in self.adapters if a.kept}
            factors, ranks = dict.fromkeys(kept), kept
        else:
            omega = self.omega.detach().tolist() if self.omega is not None else [None] * self.num_adapters
            factors, ranks = dict(zip(self.module_names, omega)), self.warmup_ranks
        return {**self._adapter_tensors(factors, ranks), **self.bias_state_dict()}

    def _adapter_tensors(
        self, factors: dict[str, float | None], ranks: dict[str, int] | None
    ) -> dict[str, torch.Tensor]:
        """PEFT's file tensors of the units named in `factors` (unit name: factor on B), at unit rank `ranks[name]`
        (None: as allocated), each unit's layers under the module names they have in the file (an experts block's
        inner wrapper is `<name>.base_layer`)."""
        modules, file_ranks, experts = {}, {}, {}
        for name, factor in factors.items():
            unit = self._units_by_name[name]
            layer_ranks = (
                unit.allocated_ranks(self.base, self.adapter_name) if ranks is None else unit.ranks_at(ranks[name])
            )
            for module, rank in zip(unit.file_modules, layer_ranks):
                modules[module], file_ranks[module], experts[module] = factor, rank, unit.num_experts
        return gathered_adapter_state_dict(
            self.model, modules, self.adapter_name, file_ranks, self.parameter_access, experts=experts
        )

    def bias_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained biases a stock adapter file must carry (full, on the CPU, PEFT's file keys): with
        `bias="lora_only"` those of every module that had an adapter in the warm-up, dropped ones included (they
        trained until the switch and are frozen since; PEFT's own save writes only the kept modules' biases); with
        `bias="all"` every bias; none with `bias="none"`. A collective under FSDP2: call it on every rank."""
        mode = self.config.bias
        if mode == "none":
            return {}
        prefix = "base_model.model."
        adapted = set(self.module_names)
        exported = {a.module for a in self.adapters if a.kept} if self.switched else adapted
        state = {}
        for key, param in self.model.named_parameters():
            if not (key == "bias" or key.endswith(".bias")) or "lora_" in key or "modules_to_save" in key:
                continue
            module = key[len(prefix) :].rsplit(".", 1)[0] if key.startswith(prefix) else None
            if module is not None and module.endswith(".base_layer"):
                module = module[: -len(".base_layer")]
                if module not in exported:  # mask mode keeps a dropped adapter's wrapper; a stock reload has none
                    key = f"{prefix}{module}.bias"
            if mode == "lora_only" and module not in adapted:
                continue
            state[key] = self.parameter_access.read(param).cpu().clone().contiguous()
        return state

    def warmup_state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter's weights as they are (not folded, full allocated rank), in PEFT's file keys: what resuming
        a warm-up checkpoint loads back. A collective under FSDP2."""
        return {**self._adapter_tensors(dict.fromkeys(self.module_names), None), **self.bias_state_dict()}

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every selectable unit's LoRA parameters (those the switch drops or re-initialises), in unit order."""
        return [p for unit in self.units for p in unit.parameters(self.base, self.adapter_name)]

    def adapter_config(self) -> LoraConfig:
        """The stock `LoraConfig` of `adapter_state_dict()` (exact module and parameter names; no WeightLoRA
        fields)."""
        if self.switched:
            return copy.deepcopy(self.model.peft_config[self.adapter_name])
        return stock_lora_config(self.config, self.units, self.warmup_ranks)

    def save_adapter(
        self,
        directory: str | os.PathLike,
        is_main_process: bool | None = None,
        *,
        step: int | None = None,
        trainer_tags: list[str] | tuple[str, ...] = ("weightlora",),
        padded: bool = False,
    ) -> None:
        """Write the stock PEFT adapter (`adapter_model.safetensors`, `adapter_config.json`) and what a save holds
        beside it (`selection.json`, the heatmap, the model card; `wlora_trl.artifacts.saving`).

        For custom loops, in any mode; under FSDP2 call it on every rank (it gathers the adapters), and rank 0
        writes (`is_main_process` overrides that). `PeftModel.from_pretrained(base, directory)` reloads it. `step`
        is recorded in selection.json; `trainer_tags` go into the card; `padded=True` pads the adapter to every
        targeted (layer, projection) for serving engines (`artifacts.export.pad_adapter`)."""
        from .artifacts.saving import save_adapter_folder

        save_adapter_folder(
            directory, self, step=step, trainer_tags=trainer_tags, padded=padded, is_main_process=is_main_process
        )

    def restore(self, report: SelectionReport, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Return to the state a `report()` describes (resuming a checkpoint), before its weights are loaded. Pass
        the `optimizer` if it exists already (FSDP2 in the Trainer builds it before loading a checkpoint): a switch
        replayed here edits it as the original one did."""
        if [a.module for a in report.adapters] != self.module_names or report.k != self.k:
            raise ValueError(
                "The checkpoint's selection.json describes other adapters (modules or K differ) than this model "
                "and config; resume with the same model, target_modules and k."
            )
        self.selection_steps = report.selection_steps
        self._restored_counts = [int(report.omega_steps.get(name, 0)) for name in OUTCOMES]
        if report.switched:
            self.switch(optimizer, kept=[a.index for a in report.adapters if a.kept], announce=False)
            self.adapters = list(report.adapters)  # the checkpoint's record, not this fresh model's omega
        elif self.gates is not None:
            self.gates.assign(torch.tensor([a.omega for a in report.adapters], dtype=torch.float32))
