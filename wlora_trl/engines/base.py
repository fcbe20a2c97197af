"""The engine interface, and its first implementation: one process.

An engine is what runs the model across devices: one process, DDP, FSDP2, DeepSpeed ZeRO. What WeightLoRA does is
the same under each (the warm-up, StoIHT on omega, the switch, a stock adapter saved); how each step reaches the
parameters, the optimizer and the checkpoint files is not. A trainer detects its engine once, when WeightLoRA is set
up (`wlora_trl.engines.detect_engine`), and from then on asks it through the hooks below; the mixin itself
(`wlora_trl.trainer`) never asks which engine runs.

A new engine is one module: a subclass of `Engine` that overrides the hooks where it differs, registered in
`wlora_trl.engines.ENGINES`, with its tests. The hooks, in the order a run calls them:

- `check_arguments(args)`, `check_setup(trainer)` (class methods, for every registered engine): refuse what this
  engine's setting cannot run, before any training time is spent.
- `detect(trainer)` (class method): whether this engine runs the trainer (the first registered one that says yes).
- `setup(trainer)`: before the `WeightLoraModel` is made (`mask_mode` and `parameter_access` are then read).
- `prepare_optimizer(optimizer, weight_lora)`: the fresh optimizer, before the engine wraps it.
- `before_train(trainer)`, `check_wrapper(trainer)` (the first training step).
- `step_skipped(trainer)`: for engines whose optimizer steps inside the backward (`steps_in_backward`), whether that
  step was skipped; omega's step then follows in `training_step` instead of hanging on the optimizer.
- `before_switch(trainer)`, `after_switch(trainer)`.
- `save_model(trainer, directory, padded)`; `load_checkpoint(trainer, checkpoint, load_weights)` and
  `after_optimizer_loaded(trainer, checkpoint)` when resuming.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..artifacts.export import restore_warmup_weights
from ..artifacts.saving import save_adapter_folder
from ..state import RESUME_HINT, read_selection
from .access import PLAIN_ACCESS, ParameterAccess

logger = logging.getLogger(__name__)


class Engine:
    """One process: the switch removes dropped adapters and rebuilds kept ones (module swap); a checkpoint during the
    warm-up keeps the unfolded weights beside the adapter. The defaults of every hook are this engine's."""

    name = "one process"
    # Mask mode keeps the model's structure (dropped adapters switched off in place), for engines that shard it.
    mask_mode = False
    # Whether the engine shards the model's parameters (a recipe then evaluates and generates across processes).
    shards_parameters = False
    # Whether the engine's optimizer steps inside the backward (DeepSpeed under accelerate).
    steps_in_backward = False
    # Whether the engine's own checkpoint files hold the unfolded warm-up weights (FSDP2's and DeepSpeed's do); else
    # a save during the warm-up keeps them beside the adapter, for resuming.
    checkpoint_holds_warmup_weights = False

    def __init__(self) -> None:
        self.parameter_access: ParameterAccess = PLAIN_ACCESS

    # --- detection and refusals -----------------------------------------------------------------------------------

    @classmethod
    def check_arguments(cls, args: Any) -> None:
        """Refuse training arguments this engine's setting cannot run (before any model is built)."""

    @classmethod
    def check_setup(cls, trainer: Any) -> None:
        """Refuse an accelerator setting this engine's family cannot run (accelerate's config, not the arguments)."""

    @classmethod
    def detect(cls, trainer: Any) -> bool:
        """Whether this engine runs `trainer` (its accelerator and arguments)."""
        return True

    def setup(self, trainer: Any) -> None:
        """Before the `WeightLoraModel` is made."""

    # --- the optimizer and the training step ------------------------------------------------------------------------

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, weight_lora: Any) -> None:
        """The optimizer the Trainer just created (omega left out), before the engine wraps it."""

    def before_train(self, trainer: Any) -> None:
        """At `train()`, before the Trainer prepares the model."""

    def check_wrapper(self, trainer: Any) -> None:
        """At the first training step, with the model as the engine prepared it."""

    def step_skipped(self, trainer: Any) -> torch.Tensor | None:
        """With `steps_in_backward`: a true tensor when the engine skipped this step's optimizer update."""
        return None

    # --- the switch -------------------------------------------------------------------------------------------------

    def before_switch(self, trainer: Any) -> None:
        """Just before the switch (omega final)."""

    def after_switch(self, trainer: Any) -> None:
        """Just after the switch (the model holds the kept adapters only, or masks the others)."""

    # --- saving and resuming ----------------------------------------------------------------------------------------

    def save_model(self, trainer: Any, directory: str, padded: bool) -> None:
        """`save_model` and every checkpoint: the one artefact builder (`artifacts.saving.save_adapter_folder`) writes
        the stock adapter the model computes now (gathered from the kept adapters where the engine shards them: every
        rank takes part, the main process writes), with the unfolded warm-up weights beside it unless the engine's own
        checkpoint files hold them; then the tokenizer and the training arguments, as the Trainer's own save."""
        weight_lora, should_save = trainer.weight_lora, trainer.args.should_save
        save_adapter_folder(
            directory,
            weight_lora,
            step=trainer.state.global_step,
            trainer_tags=getattr(trainer, "_tag_names", ()),
            padded=padded,
            warmup_weights=not self.checkpoint_holds_warmup_weights,
            is_main_process=should_save,
        )
        if should_save:
            trainer._save_tokenizer_and_args(directory)

    def load_checkpoint(self, trainer: Any, checkpoint: str, load_weights: Callable[[], None]) -> None:
        """Resume: rebuild the checkpoint's structure (and omega) first, since the Trainer loads adapter weights into
        the current structure, which after the switch has other modules and ranks than a fresh model; then the
        weights (`load_weights`: the Trainer's own loading).

        A warm-up checkpoint's adapter file has omega folded in: the run continues from the unfolded weights beside
        it, unless the engine's own checkpoint files hold them. In mask mode the optimizer exists already (FSDP2 in
        the Trainer builds it before loading a checkpoint), so a replayed switch edits it; and the adapter file is the
        rank-r export (WeightLoRA+ allocates 2r), so during the warm-up only the unfolded weights fit."""
        weight_lora = trainer.weight_lora
        weight_lora.restore(read_selection(checkpoint, hint=RESUME_HINT), trainer.optimizer if self.mask_mode else None)
        if weight_lora.switched or self.checkpoint_holds_warmup_weights:
            load_weights()
            return
        if not self.mask_mode:
            load_weights()
        restore_warmup_weights(checkpoint, weight_lora)

    def after_optimizer_loaded(self, trainer: Any, checkpoint: str) -> None:
        """Resume: after the Trainer loaded the optimizer and scheduler from `checkpoint`."""
