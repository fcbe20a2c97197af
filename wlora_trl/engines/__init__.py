"""The engines that run WeightLoRA across devices, detected once when a trainer sets WeightLoRA up.

`ENGINES` is the registry, in detection order: the first engine whose `detect(trainer)` says yes runs it, one
process (`Engine`) when none does. Adding an engine is a module with an `Engine` subclass and a line here
(`wlora_trl.engines.base` lists the hooks).

  base.py        Engine: the hooks, and the one-process engine (module swap)
  ddp.py         DataParallelEngine: the re-wrap at the switch, the ranks' agreement
  masked.py      MaskModeEngine: mask mode's switch and gathered save, unsharded (the base of the two below)
  fsdp2.py       Fsdp2Engine: mask mode over DTensor shards; FSDP version 1 refused
  deepspeed.py   ZeroEngine and ZeroParameterAccess: ZeRO-2 / ZeRO-3's partitions, masters and moments
  access.py      ParameterAccess: how the switch reads and writes a whole parameter (plain tensors, DTensors)
  collectives.py the collectives the method makes itself (omega's gradient, the ranks' agreement)
"""

from __future__ import annotations

from typing import Any

from .base import Engine
from .ddp import DataParallelEngine
from .deepspeed import ZeroEngine
from .fsdp2 import Fsdp2Engine
from .masked import MaskModeEngine

ENGINES: tuple[type[Engine], ...] = (ZeroEngine, Fsdp2Engine, MaskModeEngine, DataParallelEngine)


def check_training_args(args: Any) -> None:
    """Refuse an engine setting the training arguments carry (FSDP version 1, a DeepSpeed config WeightLoRA cannot
    run), before any model is built."""
    if args is None:
        return
    for engine in ENGINES:
        engine.check_arguments(args)


def detect_engine(trainer: Any) -> Engine:
    """The engine that runs `trainer` (a `transformers.Trainer` with its accelerator built), after refusing the
    settings no engine here runs (accelerate's FSDP1, several GPUs in one process). The arguments' own refusals
    (`check_training_args`) come first, from the trainer, before it builds anything."""
    for engine in ENGINES:
        engine.check_setup(trainer)
    for engine in ENGINES:
        if engine.detect(trainer):
            return engine()
    return Engine()


__all__ = [
    "ENGINES",
    "DataParallelEngine",
    "Engine",
    "Fsdp2Engine",
    "MaskModeEngine",
    "ZeroEngine",
    "check_training_args",
    "detect_engine",
]
