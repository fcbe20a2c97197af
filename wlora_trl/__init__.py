"""wlora_trl: WeightLoRA and WeightLoRA+ (arXiv:2506.02724) as drop-in trainers for TRL and transformers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# Imported on first use (PEP 562): `wlora-trl --help` and the lm-eval path must not pay for TRL and the trainers.
_EXPORTS = {
    "CITATION": ".config",
    "WeightLoraConfig": ".config",
    "WeightLoraDPOTrainer": ".trl_trainers",
    "WeightLoraGRPOTrainer": ".trl_trainers",
    "WeightLoraMixin": ".trainer",
    "WeightLoraModel": ".model",
    "WeightLoraSFTTrainer": ".trainer",
    "WeightLoraTrainer": ".trainer",
    "lora_config_from_selection": ".artifacts.portable",
}
__all__ = [
    "CITATION",
    "WeightLoraConfig",
    "WeightLoraDPOTrainer",
    "WeightLoraGRPOTrainer",
    "WeightLoraMixin",
    "WeightLoraModel",
    "WeightLoraSFTTrainer",
    "WeightLoraTrainer",
    "lora_config_from_selection",
]

if TYPE_CHECKING:
    from .artifacts.portable import lora_config_from_selection
    from .config import CITATION, WeightLoraConfig
    from .model import WeightLoraModel
    from .trainer import WeightLoraMixin, WeightLoraSFTTrainer, WeightLoraTrainer
    from .trl_trainers import WeightLoraDPOTrainer, WeightLoraGRPOTrainer


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'wlora_trl' has no attribute {name!r}")
