"""Fine-tune a causal LM on GSM8K with WeightLoRA: the quickstart recipe.

    python examples/sft_gsm8k.py                       # SmolLM2-135M-Instruct, local data, CPU, ~10 min
    accelerate launch examples/sft_gsm8k.py --plus     # WeightLoRA+
    python examples/sft_gsm8k.py --method lora         # plain LoRA baseline, same settings
    python examples/sft_gsm8k.py --help                # every flag (TRL's SFTConfig and ModelConfig included)
    python examples/sft_gsm8k.py --config my_run.yaml  # the same flags from a YAML file

This file only parses the flags; the recipe is `wlora_trl.recipes.sft` (read its docstring for what it does and
its limits). Results land in --output_dir (default outputs/sft_gsm8k): the PEFT adapter, selection.json,
selection_heatmap.png and eval_results.{json,md}.
"""

from wlora_trl.recipes.common import run_recipe
from wlora_trl.recipes.sft import main, make_parser

if __name__ == "__main__":
    run_recipe(main, make_parser)
