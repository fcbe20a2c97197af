"""Check that a folder is a stock PEFT LoRA adapter for the base model being evaluated, without loading weights.

Any LoRA adapter saved by PEFT qualifies (ours or anyone's): `adapter_config.json` with `peft_type: LORA` plus
`adapter_model.safetensors` (or the older `.bin`). "Trained on another base" is decided from what the adapter
actually holds: every LoRA tensor names the module it adapts and has that module's input/output size in its shape,
which the safetensors header gives without reading the tensors. That catches a different architecture (module names
absent) and a different size of the same architecture (shapes differ), where the recorded `base_model_name_or_path`
is only a name that may legitimately differ (a local copy, a fine-tuned sibling). The name is still compared, and
where it is a local folder its config is compared with the base model's.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .._offline.models import public_name
from .base_model import BaseModelInfo

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Shapes that tell two bases of one architecture apart.
_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
_PREFIX = "base_model.model."
# `<module>.lora_A.weight`, `<module>.lora_embedding_A` (PEFT strips the adapter name when saving; tolerate it).
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$"
)


class AdapterInputError(ValueError):
    """An --adapter folder that is not a LoRA adapter of the evaluated base model; raised before any model loads."""


@dataclass
class AdapterCheck:
    path: Path
    config: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise AdapterInputError(f"--adapter {path}: no such folder")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterInputError(
            f"--adapter {path} is not a PEFT adapter: it has no {CONFIG_FILE} (a LoRA adapter folder holds "
            f"{CONFIG_FILE} and adapter_model.safetensors, as written by PeftModel.save_pretrained)"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterInputError(f"--adapter {path}: {CONFIG_FILE} is not valid JSON: {err}") from err
    if config.get("peft_type") != "LORA":
        raise AdapterInputError(
            f'--adapter {path} is a {config.get("peft_type")!r} adapter, not LoRA (peft_type must be "LORA")'
        )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterInputError(f"--adapter {path} was trained for task_type {config['task_type']}, not CAUSAL_LM")
    return config


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    for name in WEIGHT_FILES:
        weights = path / name
        if weights.is_file():
            break
    else:
        raise AdapterInputError(f"--adapter {path} holds {CONFIG_FILE} but no weights ({' or '.join(WEIGHT_FILES)})")
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        # Only the header is read: names and shapes, no tensor data.
        with safe_open(str(weights), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    import torch

    state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    return {key: tuple(value.shape) for key, value in state.items()}


def _target_module_problems(config: dict, base: BaseModelInfo) -> tuple[list[str], list[str]]:
    """(errors, warnings) from comparing `target_modules` with the base model's layer names, as PEFT matches them."""
    targets = config.get("target_modules")
    names = base.module_names
    if not targets:
        return [], []
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, name) for name in names):
            return [], []
        return [f"target_modules regex {targets!r} matches no module of {base.name}"], []
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if len(missing) == len(targets):
        sample = sorted({name.rsplit(".", 1)[-1] for name in names})
        return [
            f"none of its target_modules {sorted(targets)} exists in {base.name}, whose layers are named {sample}"
        ], []
    if missing:
        return [], [f"target_modules {sorted(missing)} match no module of {base.name} (PEFT skips them)"]
    return [], []


def _weight_problems(shapes: dict[str, tuple[int, ...]], base: BaseModelInfo) -> list[str]:
    """Every saved tensor must name a module of the base and fit its input/output size."""
    problems = []
    for key, shape in shapes.items():
        name = key.removeprefix(_PREFIX)
        match = _LORA_KEY.match(name)
        if match is None:
            # A whole saved module (modules_to_save, e.g. a resized lm_head): same name and shape as in the base.
            if name in base.parameters and base.parameters[name] != shape:
                problems.append(f"{name} has shape {list(shape)}, the base's has {list(base.parameters[name])}")
            continue
        module, kind = match.group("module"), match.group("kind")
        if module not in base.layers:
            problems.append(f"{key} adapts {module}, which {base.name} does not have")
            continue
        if len(shape) != 2:  # convolutions: names checked, shapes are layer-specific
            continue
        in_features, out_features = base.layers[module]
        expected = {
            "lora_A": (1, in_features),
            "lora_B": (0, out_features),
            "lora_embedding_A": (1, in_features),
            "lora_embedding_B": (0, out_features),
        }[kind]
        if shape[expected[0]] != expected[1]:
            problems.append(
                f"{key} has shape {list(shape)}, which does not fit {module} of {base.name} "
                f"(in {in_features}, out {out_features})"
            )
    if not any(_LORA_KEY.match(key.removeprefix(_PREFIX)) for key in shapes):
        problems.append("its weights file holds no LoRA tensors")
    return problems


def _same_name(recorded: str, base: BaseModelInfo) -> bool:
    """The recorded base is the evaluated one: the same id as given or resolved (a packaged copy and its hub id are
    one model), or the same folder."""
    if recorded.lower() in {base.name.lower(), base.path.lower()}:
        return True
    if public_name(recorded) == public_name(base.name):
        return True
    return os.path.exists(recorded) and os.path.exists(base.path) and os.path.samefile(recorded, base.path)


def _recorded_base_problems(recorded: str | None, base: BaseModelInfo) -> tuple[list[str], list[str]]:
    if not recorded or _same_name(recorded, base):
        return [], []
    recorded_config = Path(recorded) / "config.json"
    if recorded_config.is_file():
        theirs = json.loads(recorded_config.read_text())
        ours = base.config.to_dict()
        differ = [f"{k} {theirs.get(k)} vs {ours.get(k)}" for k in _CONFIG_KEYS if theirs.get(k) != ours.get(k)]
        if differ:
            return [f"it was trained on {recorded}, a different model than {base.name}: {', '.join(differ)}"], []
        return [], []
    return [], [
        f"it records base model {recorded!r}, not {base.name!r}; its module names and shapes fit, so it is used"
    ]


def check_adapter(path: str | os.PathLike, base: BaseModelInfo) -> AdapterCheck:
    """Raise AdapterInputError unless `path` is a LoRA adapter that fits `base`; collect softer doubts as warnings."""
    path = Path(path)
    config = _read_config(path)
    errors, warnings = _target_module_problems(config, base)
    errors += _weight_problems(_tensor_shapes(path), base)
    name_errors, name_warnings = _recorded_base_problems(config.get("base_model_name_or_path"), base)
    errors += name_errors
    warnings += name_warnings
    if errors:
        raise AdapterInputError(f"--adapter {path} is not an adapter for {base.name}:\n  " + "\n  ".join(errors[:10]))
    for warning in warnings:
        logger.warning("--adapter %s: %s", path, warning)
    return AdapterCheck(path=path, config=config, warnings=warnings)
