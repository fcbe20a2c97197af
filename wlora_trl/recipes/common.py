"""What the recipes share: the WeightLoRA flags, building the PEFT config from them, parser and logging setup."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig
from transformers import TrainerCallback

from .._offline.models import public_name
from ..artifacts.card import CARD_FILE
from ..artifacts.plotting import HEATMAP_FILE
from ..config import WeightLoraConfig
from ..engines.fsdp2 import is_fsdp2
from ..state import SELECTION_FILE, kept_by_projection
from .cpu_threads import use_the_cpu_cores
from .flags import config_number
from .peers import PEER_METHODS, PeerArguments, check_peer_flags, peer_config
from .quick_eval import results_table, write_results
from .quiet_imports import release_if_4bit_on_cpu

METHODS = ("weightlora", "random", "lora", *PEER_METHODS)
logger = logging.getLogger(__name__)


_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(WeightLoraConfig)}


def _from_config(name: str, note: str = "", as_text: bool = False):
    """A flag that is `WeightLoraConfig.<name>`: its default and help come from the config, the one definition.

    `as_text`: k and selection_steps are int (a count) or float (a fraction) in the config; the flag keeps the
    text, so `--k 1.0` (all adapters) and `--k 1` (one) mean what `k=1.0` and `k=1` mean (`config_number`)."""
    config_field = _CONFIG_FIELDS[name]
    default = str(config_field.default) if as_text else config_field.default
    help_text = (config_field.metadata["help"] + note).replace("%", "%%")  # argparse formats help with %
    return field(default=default, metadata={"help": help_text})


@dataclass
class _MethodArguments:
    method: Literal["weightlora", "random", "lora", "adalora", "eva"] = field(
        default="weightlora",
        metadata={
            "help": "'weightlora': the paper's method (omega trained by StoIHT for T steps, then K adapters kept). "
            "'random': K random adapters kept after T steps (the paper's RLoRA ablation; WeightLoraConfig's "
            "selection='random'). 'lora': plain LoRA on every target module, the baseline (stock trainer). "
            "'adalora' / 'eva': stock PEFT's AdaLoRA and EVA at WeightLoRA's budget, k * LoRA's ranks (stock "
            "trainer; wlora_trl.recipes.peers says how the budgets are matched). Which wins depends on the task: in "
            "the benchmarks (docs: Benchmarks) EVA beat every WeightLoRA arm on every seed of the SmolLM2 / GSM8K "
            "study and trailed WeightLoRA on every GLUE task on an encoder; AdaLoRA trailed WeightLoRA in both, at "
            "the same learning rate."
        },
    )
    k: str = _from_config("k", " On the command line: '--k 3' keeps 3, '--k 0.5' half, '--k 1.0' all.", as_text=True)
    selection_steps: str = _from_config("selection_steps", as_text=True)
    omega_lr: float = _from_config("omega_lr")
    plus: bool = _from_config("plus")
    reinit: bool = _from_config("reinit")


@dataclass
class WeightLoraArguments(PeerArguments, _MethodArguments):  # dataclass fields: the method's first, then the peers'
    """The adapter method and WeightLoRA's knobs as command-line flags: every knob is a `WeightLoraConfig` field of
    the same name, with its default and help (LoRA's r/alpha/dropout/targets come from `trl.ModelConfig`'s
    `--lora_*` flags), then the peers' own (`peers.PeerArguments`)."""


def build_peft_config(args: WeightLoraArguments, max_steps: int | None = None, **lora_fields) -> LoraConfig:
    """`WeightLoraConfig` for 'weightlora' / 'random', a stock `LoraConfig` for the 'lora' baseline, AdaLoRA's or
    EVA's config for the peers (at WeightLoRA's budget; AdaLoRA needs the run's `max_steps`); `lora_fields` (r,
    lora_alpha, target_modules, task_type, ...) are shared, so the methods differ only in how they spend the ranks."""
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r}: choose one of {', '.join(METHODS)}.")
    if args.method in PEER_METHODS:
        check_peer_flags(args)
        return peer_config(args, max_steps, **lora_fields)
    if args.method == "lora":
        if args.plus:
            raise ValueError("--plus is WeightLoRA+; it has no meaning with --method lora. Drop one of them.")
        return LoraConfig(**lora_fields)
    return WeightLoraConfig(
        k=config_number(args.k, "k"),
        selection_steps=config_number(args.selection_steps, "selection_steps"),
        omega_lr=args.omega_lr,
        plus=args.plus,
        reinit=args.reinit,
        selection="random" if args.method == "random" else "stoiht",
        **lora_fields,
    )


def lora_kwargs(model_args, **overrides) -> dict:
    """The LoRA fields of a recipe's PEFT config from TRL's `ModelConfig` `--lora_*` flags (all-linear by default)."""
    kwargs = dict(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or "all-linear",
        modules_to_save=model_args.lora_modules_to_save,
        task_type=model_args.lora_task_type,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
    )
    kwargs.update(overrides)
    return kwargs


def evaluate_before_training(trainer, evaluate: Callable[[], dict], results: dict, timings: dict) -> None:
    """`results["before"] = evaluate()` on the model as training starts, with its wall time in `timings`.

    Without FSDP2 that is now. Under FSDP2 accelerate shards the model only together with its optimizer, inside
    `train()` (an `evaluate()` before it stops with accelerate's "a model and optimizer must be passed together"),
    so the evaluation runs from `on_train_begin`: the model is sharded, nothing has trained yet. A resumed run
    starts from its checkpoint's weights, which are not "before", so it skips the evaluation there and says so.
    """

    def run() -> None:
        tick = time.perf_counter()
        results["before"] = evaluate()
        timings["eval_before"] = time.perf_counter() - tick

    if not is_fsdp2(trainer):
        run()
        return
    if trainer.args.resume_from_checkpoint:
        logger.warning(
            "Under FSDP2 the 'before' evaluation runs as training starts, which a resumed run does from its "
            "checkpoint's weights: skipped (the table shows 'after' only)."
        )
        return

    class EvaluateAtTrainBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            trainer.remove_callback(self)  # once, not again on a later train() call
            run()

    trainer.add_callback(EvaluateAtTrainBegin())


def record_public_base(trainer, model_path: str) -> None:
    """Make the saved adapters record the base model (`model_path`: what `resolve_model` loaded it from) by the name
    others can load (the hub id of a packaged copy, not a path under this machine's cache); offline loading maps it
    back (`_offline.models.resolve_model`)."""
    public = public_name(model_path)
    for config in trainer.model.peft_config.values():
        config.base_model_name_or_path = public
    _quiet_the_vocabulary_lookup_of_a_packaged_base(trainer.model, model_path, public)


def _quiet_the_vocabulary_lookup_of_a_packaged_base(model, local: str, public: str) -> None:
    """At every save PEFT looks the recorded base up on the hub, to tell whether the vocabulary was resized (then it
    saves the embeddings too). For a packaged copy recorded by its hub id on a machine without the hub, that prints
    two warnings that read like a failure ("Unable to fetch remote file ... Name or service not known", "Could not
    find a config file ... will assume that the vocabulary was not modified") on every save. The packaged copy's own
    config answers the question: when its vocabulary is the model's, PEFT's assumption is right, and the two
    warnings about this base are ignored. A resized vocabulary keeps them."""
    config_file = os.path.join(local, "config.json")
    if public == local or not os.path.isfile(config_file):
        return  # a hub id (the lookup can work) or the user's own folder (PEFT reads it, no lookup)
    with open(config_file) as f:
        packaged_vocabulary = json.load(f).get("vocab_size")
    base_config = getattr(model.get_base_model(), "config", None)
    if packaged_vocabulary is None or packaged_vocabulary != getattr(base_config, "vocab_size", None):
        return
    name = re.escape(public)
    warnings.filterwarnings("ignore", rf"Unable to fetch remote file .* for the file config\.json in {name}\.$")
    warnings.filterwarnings("ignore", rf"Could not find a config file in {name} - will assume")


def record_selection(trainer, output_dir: str, summary: dict) -> None:
    """On the main process, after `save_model` (which wrote selection.json, the heatmap and the model card): the kept
    counts and those files into `summary`, and one line per projection type (nothing for the plain-LoRA baseline)."""
    weight_lora = getattr(trainer, "weight_lora", None)
    if weight_lora is None or not trainer.accelerator.is_main_process:
        return
    report = weight_lora.report(trainer.state.global_step)
    summary.update(kept_adapters=weight_lora.k, total_adapters=weight_lora.num_adapters)
    for key, name in (("selection", SELECTION_FILE), ("heatmap", HEATMAP_FILE), ("model_card", CARD_FILE)):
        if os.path.isfile(os.path.join(output_dir, name)):
            summary["files"][key] = os.path.join(output_dir, name)
    trainer.accelerator.print(
        f"WeightLoRA kept {weight_lora.k} of {weight_lora.num_adapters} adapters; per projection: "
        f"{kept_by_projection(report)}"
    )


def write_summary(trainer, output_dir: str, summary: dict, results: dict, metrics, title: str, closing: str) -> None:
    """On the main process: the before/after table printed and written (`eval_results.{json,md}`) with the
    summary, then the files saved and `closing` (wall times)."""
    if not trainer.accelerator.is_main_process:
        return
    table = results_table(results, metrics)
    json_path, markdown_path = write_results(output_dir, summary, table, title)
    summary["files"].update(results_json=json_path, results_markdown=markdown_path)
    trainer.accelerator.print(f"\n{title}\n\n{table}\n")
    saved = ", ".join(os.path.basename(path) for path in summary["files"].values())
    trainer.accelerator.print(f"Saved to {output_dir}: {saved} (+ adapter_config.json). {closing}")


class TrainableParameterCount(TrainerCallback):
    """The trainable parameters of the model as training starts, the most at any step, and as it ends (methods
    differ: WeightLoRA trains every adapter for T steps and far fewer after, AdaLoRA its init_r triplets
    throughout, masked)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    @staticmethod
    def _count(model) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.counts = {"start": self._count(model)}
        self.counts["peak"] = self.counts["start"]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.counts["peak"] = max(self.counts["peak"], self._count(model))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.counts["end"] = self._count(model)


def peak_rss_mib() -> float | None:
    """The most resident memory this process has held so far, in MiB (Linux and macOS; None elsewhere). It is the
    whole process: Python, torch, the model, the data; one run per process makes it that run's peak."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bf16 natively (x86 AVX512-BF16 or AMX-BF16, Arm's BF16), as /proc/cpuinfo says.

    There, bf16 autocast makes a SmolLM2-135M LoRA step 2.2x faster than fp32 (1.13 s against 2.45 s on this
    project's 2-core AMD EPYC); without the instructions it is slower than fp32. False where /proc/cpuinfo is absent.
    """
    try:
        with open(cpuinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    flags = set()
    for line in lines:
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_cpu_and_bf16_defaults(training_args) -> None:
    """Give `training_args.bf16` left at None the recipes' default: on for a CUDA GPU and for a CPU with native bf16,
    never with fp16. Where no GPU is, `use_cpu=True` is set whatever the precision: transformers accepts bf16 on a
    CPU only with it, and without it accelerate does not see the processes of a multi-process CPU launch (each would
    train alone, and an FSDP2 launch would stop on the meta weights of the ranks that load nothing)."""
    import torch

    on_gpu = torch.cuda.is_available() and not training_args.use_cpu
    if not on_gpu:
        training_args.use_cpu = True
    if training_args.bf16 is None:
        training_args.bf16 = (on_gpu or cpu_has_native_bf16()) and not training_args.fp16


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


def _uses_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "False").lower() not in ("true", "1")


def run_recipe(main, make_parser) -> None:
    """Entry point of a recipe (`python -m`, `accelerate launch`, examples/): parse, run, and print a refusal of the
    input as one message (exit status 2) instead of a traceback; WLORA_TRL_TRACEBACK=1 shows the traceback."""
    try:
        parsed = make_parser().parse_args_and_config()
        show_wlora_logs()
        release_if_4bit_on_cpu(parsed, uses_gpu=_uses_gpu())  # the kernel messages held back at import
        use_the_cpu_cores(uses_gpu=_uses_gpu())
        main(*parsed)
    except INPUT_ERRORS as error:
        if os.environ.get("WLORA_TRL_TRACEBACK"):
            raise
        print(f"error: {error}\n(set WLORA_TRL_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
