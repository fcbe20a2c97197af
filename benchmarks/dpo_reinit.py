"""What WeightLoRA's switch does to DPO, `reinit=True` against `reinit=False`, with plain LoRA for scale.

A tiny Llama (tests/testing_utils.py) learns 100 preference pairs ("a+b=": the sum chosen, an "x"-prefixed wrong
digit rejected), T = 10 warm-up steps, then 5 or 30 more steps; three seeds. Recorded: DPO's loss and reward margin
at step T+1 (with reinit=True exactly ln 2 and 0: the policy is the reference again) and the evaluation loss, margin
and reward accuracy on 20 held pairs at the end. The numbers in `WeightLoraDPOTrainer`'s docstring come from here.

    OMP_NUM_THREADS=1 python benchmarks/dpo_reinit.py --output benchmarks/results/dpo_reinit_tiny.json   # ~1 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.testing_utils

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from tests.testing_utils import char_tokenizer, tiny_llama  # noqa: E402
from wlora_trl import WeightLoraConfig, WeightLoraDPOTrainer  # noqa: E402

T = 10
SEEDS = (0, 1, 2)
ARMS = ("lora", "reinit", "keep")  # plain LoRA, WeightLoRA reinit=True, WeightLoRA reinit=False


def preference_pairs() -> Dataset:
    rows = [(f"{a}+{b}=", str(a + b), f"x{(a + b + 1) % 10}") for a in range(10) for b in range(10)]
    return Dataset.from_dict({key: [row[i] for row in rows] for i, key in enumerate(("prompt", "chosen", "rejected"))})


def run(arm: str, seed: int, max_steps: int, output_dir: str) -> dict[str, float]:
    pairs = preference_pairs()
    args = DPOConfig(
        output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=20,
        learning_rate=1e-2,
        beta=0.1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=seed,
    )
    lora = dict(r=4, lora_alpha=8, target_modules="all-linear")
    data = dict(train_dataset=pairs, eval_dataset=pairs.select(range(0, 100, 5)), processing_class=char_tokenizer())
    if arm == "lora":
        trainer = DPOTrainer(tiny_llama(seed=seed), args=args, peft_config=LoraConfig(**lora), **data)
    else:
        config = WeightLoraConfig(**lora, selection_steps=T, reinit=arm == "reinit")
        trainer = WeightLoraDPOTrainer(tiny_llama(seed=seed), args=args, peft_config=config, **data)
    trainer.train()
    after_switch = next(entry for entry in trainer.state.log_history if entry.get("step") == T + 1 and "loss" in entry)
    evaluation = trainer.evaluate()
    return {
        "loss_at_T+1": after_switch["loss"],
        "margin_at_T+1": after_switch["rewards/margins"],
        "accuracy_at_T+1": after_switch["rewards/accuracies"],
        "eval_loss": evaluation["eval_loss"],
        "eval_margin": evaluation["eval_rewards/margins"],
        "eval_accuracy": evaluation["eval_rewards/accuracies"],
    }


def markdown_table(results: dict) -> str:
    """Evaluation loss per arm, by steps after the switch (means over the seeds): the table the trainers page shows."""
    labels = {"reinit": "reinit=True", "keep": "reinit=False", "lora": "plain LoRA"}
    afters = sorted({int(key.rsplit("_plus", 1)[1]) for key in results["means"]})
    arms = [arm for arm in labels if any(key.startswith(f"{arm}_T") for key in results["means"])]
    lines = ["| steps after the switch | " + " | ".join(labels[a] for a in arms) + " |", "|---:|" + "---:|" * len(arms)]
    for after in afters:
        means = [results["means"][f"{arm}_T{results['T']}_plus{after}"] for arm in arms]
        cells = [f"{mean['eval_loss']:.3f}" for mean in means]
        lines.append(f"| {after} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="benchmarks/results/dpo_reinit_tiny.json")
    parser.add_argument("--after", type=int, nargs="+", default=[5, 30], help="steps after the switch")
    options = parser.parse_args()
    results = {"T": T, "seeds": list(SEEDS), "ln2": math.log(2), "runs": {}, "means": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for after in options.after:
            for arm in ARMS:
                key = f"{arm}_T{T}_plus{after}"
                runs = [run(arm, seed, T + after, scratch) for seed in SEEDS]
                results["runs"][key] = runs
                results["means"][key] = {name: statistics.mean(r[name] for r in runs) for name in runs[0]}
                print(key, {name: round(value, 4) for name, value in results["means"][key].items()}, flush=True)
    with open(options.output, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
