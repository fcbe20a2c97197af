"""What the base model looks like, read from its config alone: module names and weight shapes, without weights.

Validation must finish before any model loads (loading a 7B model to learn that an adapter does not fit it wastes
minutes), so the model is built on PyTorch's `meta` device: every module and parameter shape exists, no memory is
allocated and nothing is read from disk but `config.json`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .._offline.models import resolve_model


class ModelInputError(ValueError):
    """A --model that cannot be resolved or read; raised before any model loads."""


@dataclass
class BaseModelInfo:
    name: str  # as the user gave it (--model)
    path: str  # what from_pretrained loads: a local folder, or a hub id when online
    config: object
    # module name -> (in_features, out_features) for layers LoRA can adapt (Linear, Conv1D, Embedding)
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    # parameter name -> shape, for adapters that also save whole modules (modules_to_save)
    parameters: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def module_names(self) -> list[str]:
        return list(self.layers)


def _in_out(module: torch.nn.Module) -> tuple[int, int] | None:
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
        return tuple(module.weight.shape)
    return None


# Any of these makes a folder loadable by AutoTokenizer (fast, slow sentencepiece, BPE and WordPiece layouts).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def inspect_base_model(name: str) -> BaseModelInfo:
    """Resolve `--model` (local folder, hub id, or a packaged default such as SmolLM2) and list its layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        hint = (
            ""
            if os.path.exists(path)
            else " (not a local folder; offline, only local folders and packaged models work)"
        )
        raise ModelInputError(f"--model {name}: cannot read its config{hint}: {err}") from err
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ModelInputError(
            f"--model {name}: {path} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...), which lm-eval needs "
            "to read the tasks. Save it next to the weights: tokenizer.save_pretrained(path)."
        )
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as err:  # not a causal LM architecture
        raise ModelInputError(f"--model {name} is not a causal language model: {err}") from err
    layers = {n: shape for n, m in model.named_modules() if n and (shape := _in_out(m)) is not None}
    parameters = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return BaseModelInfo(name=name, path=str(path), config=config, layers=layers, parameters=parameters)
