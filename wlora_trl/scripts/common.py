"""What the recipes share: the WeightLoRA flags, building the PEFT config from them, parser and logging setup."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig

from ..config import WeightLoraConfig

METHODS = ("weightlora", "random", "lora")


@dataclass
class WeightLoraArguments:
    """The adapter method and WeightLoRA's knobs, as command-line flags (LoRA's r/alpha/dropout/targets come from
    `trl.ModelConfig`'s `--lora_*` flags)."""

    method: Literal["weightlora", "random", "lora"] = field(
        default="weightlora",
        metadata={
            "help": "'weightlora': the paper's method (omega trained by StoIHT for T steps, then K adapters kept). "
            "'random': K random adapters kept after T steps (the paper's RLoRA ablation). 'lora': plain LoRA on "
            "every target module, the baseline (stock trainer, no selection)."
        },
    )
    plus: bool = field(
        default=False,
        metadata={"help": "WeightLoRA+: keep K = n/2 adapters and double their rank at the switch."},
    )
    k: float = field(
        default=0.5,
        metadata={
            "help": "K, the adapters kept at the switch: a value below 1 is a fraction of all n adapters (0.5 = the "
            "paper's n/2), a whole number >= 1 is a count."
        },
    )
    selection_steps: float = field(
        default=0.005,
        metadata={
            "help": "T, the optimizer steps before the switch: a value below 1 is a fraction of max_steps (at least "
            "5 steps; 0.005 = the paper's 0.5%%), a whole number >= 1 is a step count."
        },
    )
    omega_lr: float = field(
        default=WeightLoraConfig.omega_lr,  # one source of truth: the config's measured default
        metadata={"help": "Step size of the SGD step on omega (StoIHT); see WeightLoraConfig.omega_lr."},
    )
    reinit: bool = field(
        default=True,
        metadata={"help": "Re-initialise kept adapters at the switch, as the paper does (False keeps them)."},
    )


def count_or_fraction(value: float, name: str) -> int | float:
    """A flag that is a fraction below 1 and a count from 1 up: 0.5 -> 0.5, 3.0 -> 3; 2.5 is refused."""
    if value >= 1:
        if value != int(value):
            raise ValueError(f"--{name} {value}: a value >= 1 is a count and must be a whole number.")
        return int(value)
    return float(value)


def build_peft_config(args: WeightLoraArguments, **lora_kwargs) -> LoraConfig:
    """`WeightLoraConfig` for 'weightlora' / 'random', a stock `LoraConfig` for the 'lora' baseline; `lora_kwargs`
    (r, lora_alpha, target_modules, task_type, ...) are shared, so the baseline differs only in the selection."""
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r}: choose one of {', '.join(METHODS)}.")
    if args.method == "lora":
        if args.plus:
            raise ValueError("--plus is WeightLoRA+; it has no meaning with --method lora. Drop one of them.")
        return LoraConfig(**lora_kwargs)
    return WeightLoraConfig(
        k=count_or_fraction(args.k, "k"),
        selection_steps=count_or_fraction(args.selection_steps, "selection_steps"),
        omega_lr=args.omega_lr,
        plus=args.plus,
        reinit=args.reinit,
        selection="random" if args.method == "random" else "stoiht",
        **lora_kwargs,
    )


def let_optional_bools_stand_alone(parser) -> None:
    """Make `--bf16` (and every other `bool | None` flag) work without a value, like `--fp16` does.

    `HfArgumentParser` gives optional booleans whose default is None (bf16, tf32, ...) no `nargs='?'`, so a bare
    `--bf16` fails with "expected one argument"; `--bf16 true` still works after this. (Matched by name: TRL
    vendors its own copy of the argparser helpers.)
    """
    for action in parser._actions:
        if getattr(action.type, "__name__", None) == "string_to_bool" and action.nargs is None:
            action.nargs, action.const = "?", True


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler bound to whatever `sys.stderr` is when a record is written, not when the handler was made
    (pytest, notebooks and progress bars swap it; a stale stream may be closed)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always answers sys.stderr
        pass


def show_wlora_logs() -> None:
    """Print wlora_trl's INFO lines (the switch: kept K of n adapters, which modules) next to the progress bar.

    Adds one handler to the "wlora_trl" logger (once) and leaves propagation on, so the root logger, log capture
    in tests, and the user's own handlers still see every record.
    """
    logger = logging.getLogger("wlora_trl")
    logger.setLevel(logging.INFO)
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        logger.addHandler(handler)


# What the recipes raise when they refuse their input (bad flags, missing data or model files, an impossible K or T):
# the message says what to change, so the command line shows the message, not a traceback.
INPUT_ERRORS = (ValueError, OSError, ImportError)


def run_recipe(main, make_parser) -> None:
    """Entry point of a recipe (`python -m`, `accelerate launch`, examples/): parse, run, and print a refusal of the
    input as one message (exit status 2) instead of a traceback; WLORA_TRL_TRACEBACK=1 shows the traceback."""
    try:
        main(*make_parser().parse_args_and_config())
    except INPUT_ERRORS as error:
        if os.environ.get("WLORA_TRL_TRACEBACK"):
            raise
        print(f"error: {error}\n(set WLORA_TRL_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
