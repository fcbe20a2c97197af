"""wlora_trl: WeightLoRA and WeightLoRA+ (arXiv:2506.02724) as drop-in trainers for TRL and transformers."""

from .config import CITATION, WeightLoraConfig
from .model import WeightLoraModel
from .trainer import WeightLoraSFTTrainer, WeightLoraTrainer

__all__ = ["CITATION", "WeightLoraConfig", "WeightLoraModel", "WeightLoraSFTTrainer", "WeightLoraTrainer"]
__version__ = "0.1.0"
