"""WeightLoRA on sequence classification: an encoder fine-tuned on BoolQ (the paper's NLU setting in miniature).

    python examples/classify_boolq.py                  # all-MiniLM-L6-v2, local BoolQ, CPU, a few minutes
    python examples/classify_boolq.py --method lora    # plain LoRA baseline
    python examples/classify_boolq.py --help           # every flag

This file only parses the flags; the recipe is `wlora_trl.recipes.classify_boolq` (its docstring explains the
deterministic train/eval split of BoolQ's validation file and the limits). Prints eval accuracy before and after.
"""

from wlora_trl.recipes.classify_boolq import main, make_parser
from wlora_trl.recipes.common import run_recipe

if __name__ == "__main__":
    run_recipe(main, make_parser)
