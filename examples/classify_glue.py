"""GLUE-style classification or regression with an encoder: WeightLoRA, WeightLoRA+, random selection, LoRA, AdaLoRA
and EVA through one recipe, on a GLUE task or your own data.

    python examples/classify_glue.py --task sst2                     # all-MiniLM-L6-v2, local SST-2, CPU
    python examples/classify_glue.py --task mrpc --method lora       # the LoRA baseline (also: adalora, eva, random)
    python examples/classify_glue.py --dataset_name data.jsonl --text_columns text --label_column label
    python examples/classify_glue.py --dataset_name pairs/ --text_columns sentence1 sentence2   # or sentence1,sentence2
    python examples/classify_glue.py --help                          # every flag

This file only parses the flags; the recipe is `wlora_trl.recipes.classify` (its docstring explains the tasks, the
metrics, the data formats and how the methods' budgets are matched). Prints the task's metric before and after.
"""

from wlora_trl.recipes.classify import main, make_parser
from wlora_trl.recipes.common import run_recipe

if __name__ == "__main__":
    run_recipe(main, make_parser)
